"""A model behind an OpenAI-compatible completions server, as an evaluation backend.

    backend = CompletionsBackend("http://localhost:8080/v1", model="my-model")
    evaluate(backend, load_tasks(["kjv_cloze"]))

Scoring uses the legacy completions protocol that evaluation harnesses rely on
(OpenAI's original API; `scribe serve`, llama.cpp's server and vLLM speak it):

    POST /v1/completions {"prompt": [context + continuation, ...], "echo": true, "max_tokens": 1,
                          "logprobs": 1, "temperature": 0}
    -> choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}

With `echo` the prompt's own tokens come back with their log-probabilities
(the first is null: nothing precedes it); the one token generated after the
prompt (`max_tokens: 1`, as lm-eval's `local-completions` asks, since not every
server takes 0) is cut off by its text offset. The continuation's tokens are those
that start at or after the end of the context (trailing spaces of the context
count as the continuation's, as in local scoring); a token that straddles the
boundary counts as the continuation's. A token is greedy when no alternative
in its top log-probabilities beats it. Rolling log-likelihood sends the whole
document and sums every token after the first (the server tokenizes, so the
first token has nothing to condition on). Generation sends `stop` strings
and cuts at them again locally.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from scribelm.errors import ScribeError
from scribelm.evaluate.scoring import RollingScore

MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`


class RemoteError(ScribeError):
    """The server could not be reached or answered something unusable."""


def _continuation_start(text_offsets: Sequence[int], tokens: Sequence[str], boundary: int) -> int:
    """Index of the first token that reaches past `boundary` (characters of the prompt)."""
    for i, (offset, token) in enumerate(zip(text_offsets, tokens)):
        if offset >= boundary or offset + len(token) > boundary:
            return i
    return len(tokens)


def parse_echo_logprobs(choice: Mapping[str, Any], context: str, prompt: str) -> tuple[float, bool]:
    """(summed log-probability of the continuation, whether it is greedy) from one echoed choice
    of `prompt` = context + continuation; tokens the server generated after the prompt are left out."""
    logprobs = choice.get("logprobs") or {}
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    offsets, tops = logprobs.get("text_offset"), logprobs.get("top_logprobs")
    if not tokens or values is None or offsets is None:
        raise RemoteError("the server's answer has no prompt log-probabilities (logprobs.tokens, token_logprobs, "
                          "text_offset); it must support echo with logprobs")
    start = _continuation_start(offsets, tokens, len(context.rstrip()))
    end = next((i for i, offset in enumerate(offsets) if offset >= len(prompt)), len(tokens))  # generated: not ours
    total, greedy = 0.0, True
    for i in range(start, end):
        if values[i] is None:
            raise RemoteError("the server gave no log-probability for a continuation token (an empty context "
                              "cannot be scored remotely)")
        total += float(values[i])
        if tops and tops[i]:
            greedy = greedy and float(values[i]) >= max(float(v) for v in tops[i].values())
    return total, greedy


class CompletionsBackend:
    """Scores through `POST {base_url}/completions`; `model` is the name the server knows."""

    def __init__(self, base_url: str, *, model: str | None = None, batch_size: int = 16, timeout_s: float = 600.0,
                 api_key: str | None = None) -> None:
        if not re.match(r"^https?://", base_url):
            raise ScribeError(f"--base-url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.batch_size, self.timeout_s, self.api_key = model, batch_size, timeout_s, api_key

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.model is not None:
            body = {"model": self.model, **body}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 (http(s) only)
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                detail = detail.strip()[:200]
            raise RemoteError(f"{self.url} answered {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise RemoteError(f"cannot reach {self.url}: {getattr(err, 'reason', err)}") from None
        except ValueError:
            raise RemoteError(f"{self.url} did not answer JSON") from None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list):
            raise RemoteError(f"{self.url} answered without choices")
        return answer

    def _batched(self, prompts: list[str], body: dict[str, Any], progress) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            choices = self._post({"prompt": chunk, **body})["choices"]
            if len(choices) != len(chunk):
                raise RemoteError(f"{self.url} answered {len(choices)} choices for {len(chunk)} prompts")
            out += sorted(choices, key=lambda c: c.get("index", 0))
            if progress:
                progress(len(chunk))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress=None) -> list[tuple[float, bool]]:
        if any(not ctx for ctx, _ in pairs):
            raise RemoteError("a server cannot score a continuation after an empty context (the first token of a "
                              "prompt gets no log-probability); drop acc_mutual_info for remote models")
        echo = {"echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0}
        choices = self._batched([ctx + cont for ctx, cont in pairs], echo, progress)
        return [parse_echo_logprobs(choice, ctx, ctx + cont) for choice, (ctx, cont) in zip(choices, pairs)]

    def rolling_loglikelihood(self, texts: Sequence[str], progress=None) -> list[RollingScore]:
        echo = {"echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0}
        out = []
        for text, choice in zip(texts, self._batched(list(texts), echo, progress)):
            logprobs = choice.get("logprobs") or {}
            offsets = logprobs.get("text_offset") or []
            values = [v for v, offset in zip(logprobs.get("token_logprobs") or [], offsets) if offset < len(text)]
            total = sum(float(v) for v in values[1:] if v is not None)
            out.append(RollingScore(total, len(values), len(re.split(r"\s+", text)), len(text.encode("utf-8"))))
        return out

    def generate_until(self, requests: Sequence[tuple[str, Mapping[str, Any]]], progress=None) -> list[str]:
        from scribelm.evaluate.scoring import _generation_settings

        out = []
        for context, kwargs in requests:
            s = _generation_settings(kwargs or {}, 256)
            body = {"prompt": context, "max_tokens": s["max_new_tokens"], "temperature": s["temperature"]}
            if s["stop"]:
                body["stop"] = s["stop"][:MAX_STOP_STRINGS]
            text = self._post(body)["choices"][0].get("text") or ""
            for stop in s["stop"]:  # a server may ignore stops beyond its limit
                text = text.split(stop)[0]
            out.append(text)
            if progress:
                progress(1)
        return out
