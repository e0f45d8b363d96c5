"""Engine events -> OpenAI's JSON: whole responses, server-sent event chunks, and log-probs
in OpenAI's two shapes (chat: per token with bytes; completions: parallel lists).

With `echo` and `logprobs`, a completion's log-probs start with the prompt's tokens
(the first one's is null) and go on with the generated ones, as OpenAI's legacy API did.
JSON has no -Infinity: an impossible token reports -9999.0, as OpenAI's API does."""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any

from fastapi.responses import Response

from scribelm.serve.engine import FinishEvent, PromptLogprobsEvent, TokenEvent

IMPOSSIBLE_LOGPROB = -9999.0


def finite_logprob(value: float | None) -> float | None:
    """-inf (a token the model cannot produce) as OpenAI reports it; None stays None."""
    return value if value is None or math.isfinite(value) else IMPOSSIBLE_LOGPROB


def json_response(body: dict) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), media_type="application/json")


def int_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class CallResponse:
    """The state of one HTTP generation call: texts, logprobs and finish reasons per choice."""

    def __init__(self, *, chat: bool, model: str, total_choices: int, prompts: list[list[int]], tokenizer) -> None:
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.texts = [""] * total_choices
        self.reasons: list[str | None] = [None] * total_choices
        self.tokens = [0] * total_choices
        self.logprobs: list[list[TokenEvent]] = [[] for _ in range(total_choices)]
        self.prompt_logprobs: list[PromptLogprobsEvent | None] = [None] * total_choices  # echo + logprobs
        self.finished = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache
        self.draft_tokens = self.accepted_draft_tokens = 0  # speculative decoding: guessed, and kept
        self.first_token_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def record(self, event) -> None:
        if isinstance(event, PromptLogprobsEvent):
            self.prompt_logprobs[event.index] = event
        elif isinstance(event, TokenEvent):
            self.texts[event.index] += event.text
            if event.logprob is not None:
                self.logprobs[event.index].append(event)
        elif isinstance(event, FinishEvent):
            self.texts[event.index] += event.text
            self.reasons[event.index] = event.reason
            self.tokens[event.index] = event.completion_tokens
            self.draft_tokens += event.draft_tokens
            self.accepted_draft_tokens += event.accepted_draft_tokens
            self.finished += 1

    def usage(self, prompt_tokens: int) -> dict:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": prompt_tokens + self.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        if self.draft_tokens:  # speculative decoding, in the fields OpenAI's predicted outputs report
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": self.accepted_draft_tokens,
                "rejected_prediction_tokens": self.draft_tokens - self.accepted_draft_tokens,
            }
        return usage

    # -- logprobs in OpenAI's two shapes ----------------------------------------------
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, events: list[TokenEvent]) -> dict:
        content = []
        for e in events:
            text, raw = self._token(e.token_id)
            top = []
            for tid, lp in e.top_logprobs or []:
                t, b = self._token(tid)
                top.append({"token": t, "logprob": finite_logprob(lp), "bytes": b})
            content.append({"token": text, "logprob": finite_logprob(e.logprob), "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, events: list[TokenEvent], offset: int = 0,
                             prompt: PromptLogprobsEvent | None = None) -> dict:
        """Parallel lists; `prompt` (echo) puts the prompt's tokens first."""
        steps = []  # (token id, logprob, top)
        if prompt is not None:
            tops = prompt.top_logprobs or [None] * len(prompt.token_ids)
            steps += zip(prompt.token_ids, prompt.logprobs, tops)
        steps += ((e.token_id, e.logprob, e.top_logprobs) for e in events)
        tokens, lps, tops, offsets = [], [], [], []
        position = offset
        for token_id, logprob, top in steps:
            text, _ = self._token(token_id)
            tokens.append(text)
            lps.append(finite_logprob(logprob))
            tops.append({self._token(tid)[0]: finite_logprob(lp) for tid, lp in top} if top else None)
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    # -- whole responses ------------------------------------------------------------
    def response(self, prompt_tokens: int) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            lp = None
            if self.logprobs[i] or self.prompt_logprobs[i] is not None:
                lp = self._chat_logprobs(self.logprobs[i]) if self.chat else \
                    self._completion_logprobs(self.logprobs[i], prompt=self.prompt_logprobs[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": lp, "finish_reason": self.reasons[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.reasons[i]})
        return {
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
            "model": self.model, "system_fingerprint": "scribelm", "choices": choices, "usage": self.usage(prompt_tokens),
        }

    # -- streaming ---------------------------------------------------------------------
    def stream_choice(self, event) -> dict | None:
        """The choice object of one chunk, or None when the event carries nothing to send."""
        if isinstance(event, PromptLogprobsEvent):  # echo with logprobs: the prompt and its log-probs first
            text = self.tokenizer.decode(event.token_ids)
            return {"index": event.index, "text": text, "logprobs": self._completion_logprobs([], prompt=event),
                    "finish_reason": None}
        if isinstance(event, TokenEvent):
            if not event.text and event.logprob is None:
                return None
            lp = None
            if event.logprob is not None:
                lp = self._chat_logprobs([event]) if self.chat else self._completion_logprobs([event])
            if self.chat:
                return {"index": event.index, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}
            return {"index": event.index, "text": event.text, "logprobs": lp, "finish_reason": None}
        if isinstance(event, FinishEvent):
            if self.chat:
                delta = {"content": event.text} if event.text else {}
                return {"index": event.index, "delta": delta, "logprobs": None, "finish_reason": event.reason}
            return {"index": event.index, "text": event.text, "logprobs": None, "finish_reason": event.reason}
        return None

    def chunk_line(self, choice: dict | None, include_usage: bool, usage: dict | None = None) -> str:
        chunk = {
            "id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion", "created": self.created,
            "model": self.model, "system_fingerprint": "scribelm", "choices": [choice] if choice is not None else [],
        }
        if include_usage:
            chunk["usage"] = usage
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"
