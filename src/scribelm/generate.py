"""The generation loop: prompts in, tokens (and text) out.

    prefill   run the whole prompt through the model once, writing every
              position's keys and values into a preallocated `KVCache`
    decode    then one token per step: feed the last token, read the cache,
              get the next-token logits, pick a token (`scribelm.sampling`)

Several prompts of different lengths run as one batch: they are left-padded
to the same length, the padding is masked out of attention, and each row's
positions count from its own first real token, so each row generates exactly
what it would alone (greedy). A row stops on EOS, a stop token id, a stop
string (the text before it is kept), or `max_new_tokens` ("length").

API (what `LM.generate`, `LM.stream`, `LM.chat` and the serving code use):

    gen = BatchGeneration(model, tokenizer, prompt_ids_list, settings_list)
    for events in gen:                   # one list per decode step
        for e in events:                 # TokenEvent(row, token_id, text, logprob, top, finished)
            pieces[e.row].append(e.text)
    gen.completions                      # one Completion per row, filled in as rows finish

    beam_search(model, tokenizer, prompt_ids, settings) -> list[Completion], best first

    generate(lm, "prompt" | ["p1", "p2"], return_details=False, **settings)
    stream(lm, "prompt", **settings)     # yields text deltas
    chat(lm, [{"role": "user", "content": "hi"}], stream=False, **settings)

A `Completion` holds `text`, `token_ids` (a stop token id that ended the row
is included, its text is not), `finish_reason` ("stop" or "length", as in
OpenAI's API), `stop_reason` (the stop string or token id), `prompt_tokens`,
`logprobs` (list of `TokenLogprob`, when asked) and `score` (beam search).

Context overflow: a prompt longer than the model's context is an error,
unless `context_overflow="slide"`: then only the most recent tokens are kept
and, whenever the context fills during generation, the oldest quarter is
dropped and the rest is run through the model again (positions restart at
0, so this works for every position type).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from scribelm.cache import ContextOverflowError, KVCache
from scribelm.errors import ScribeError, reject_unknown_fields
from scribelm.quant import weight_bytes
from scribelm.sampling import (
    IncrementalDetokenizer,
    RowSampler,
    SamplingError,
    SamplingSettings,
    apply_penalties,
    choose_tokens,
    token_logprobs,
)

#: Tokens that close an assistant turn in common chat formats (ours is <|end|>).
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[dict[str, Any]] = field(default_factory=list)  # [{"token_id", "token", "logprob"}], best first


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: sum(logprob) / length ** length_penalty

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenEvent:
    """One row's output at one decode step."""

    row: int
    token_id: int
    text: str  # the text delta this token releases ('' when held back)
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token_id, logprob), best first
    finished: bool = False


def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return ""
    return tokenizer.token_bytes(int(token_id)).decode("utf-8", errors="replace")


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: all of them (`quant.weight_bytes`) but the
    token and position embedding tables, of which a step reads one row, unless the
    unembedding shares the table and so reads all of it."""
    total = weight_bytes(model)
    unembedding = getattr(model.unembedding, "weight", None)  # a quantized unembedding has its own tensors
    for table in (model.token_embedding, model.position_embedding):
        if table is not None and table.weight is not unembedding:
            total -= table.weight.numel() * table.weight.element_size()
    return total


def stop_ids_for(tokenizer, settings: SamplingSettings, extra: Sequence[int] = ()) -> set[int]:
    ids = set(settings.stop_token_ids) | set(extra)
    if tokenizer is not None and tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return ids


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _check_prompt(ids: Sequence[int], vocab_size: int, index: int) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ScribeError(
            f"prompt {index} is empty and there is no BOS token to start from; give some text or a tokenizer with a BOS token"
        )
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ScribeError(f"prompt {index} holds token id {bad[0]}, outside the model's vocabulary (0..{vocab_size - 1})")
    return ids


# ----------------------------------------------------------------------------- batched sampling / greedy


class BatchGeneration:
    """Generate for several prompts at once, one `SamplingSettings` per row.

    Iterating runs the loop and yields, per decode step, the `TokenEvent`s of
    rows still running. `completions` holds the results once iteration ends
    (or `run()` does both)."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: Sequence[Sequence[int]],
        settings: SamplingSettings | Sequence[SamplingSettings],
        *,
        skip_special_tokens: bool = True,
        extra_stop_ids: Sequence[int] = (),
        seed_offsets: Sequence[int] | None = None,
    ) -> None:
        if not prompts:
            raise ScribeError("no prompts to generate from")
        if isinstance(settings, SamplingSettings):
            settings = [settings] * len(prompts)
        if len(settings) != len(prompts):
            raise SamplingError(f"{len(prompts)} prompts but {len(settings)} settings")
        for s in settings:
            if s.num_beams > 1:
                raise SamplingError("BatchGeneration samples or decodes greedily; use beam_search for num_beams > 1")
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        self.context = config.context_length
        self.settings = list(settings)
        self.prompts = [_check_prompt(p, config.vocab_size, i) for i, p in enumerate(prompts)]
        for i, (p, s) in enumerate(zip(self.prompts, self.settings)):
            if len(p) > self.context:
                if s.context_overflow != "slide":
                    which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                    raise ContextOverflowError(
                        f"{which} is {len(p)} tokens but the model's context is {self.context}; shorten it, or "
                        "keep only its most recent tokens with --slide (in Python: context_overflow='slide')"
                    )
                self.prompts[i] = p[-self._window_keep():]
        self.device = next(model.parameters()).device
        offsets = seed_offsets or [0] * len(prompts)
        self.samplers = [
            RowSampler(s, config.vocab_size, prompt_ids=p, device=self.device, seed_offset=o)
            for s, p, o in zip(self.settings, self.prompts, offsets)
        ]
        skip = tokenizer.special_ids if (tokenizer is not None and skip_special_tokens) else set()
        self.detokenizers = [
            IncrementalDetokenizer(tokenizer, stop=s.stop, skip_ids=skip) if tokenizer is not None else None
            for s in self.settings
        ]
        if tokenizer is None and any(s.stop for s in self.settings):
            raise SamplingError("stop strings need a tokenizer to turn tokens into text")
        self.stop_ids = [stop_ids_for(tokenizer, s, extra_stop_ids) for s in self.settings]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[TokenLogprob] | None] = [[] if s.logprobs else None for s in self.settings]
        self.completions: list[Completion | None] = [None] * len(prompts)
        self._started = False

    def _window_keep(self) -> int:
        return max(1, self.context - max(1, self.context // 4))

    def run(self) -> list[Completion]:
        for _ in self:
            pass
        return self.completions  # type: ignore[return-value]

    # -- the loop ---------------------------------------------------------------------
    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[TokenEvent]]:
        if self._started:
            raise ScribeError("a BatchGeneration runs once; make a new one")
        self._started = True
        B = len(self.prompts)
        active = [True] * B
        for b, s in enumerate(self.settings):
            if s.max_new_tokens == 0:
                self._finish(b, "length", None)
                active[b] = False
        if not any(active):
            return
        sliding = any(s.context_overflow == "slide" for s in self.settings)
        longest = max(len(p) for p in self.prompts)
        budget = max(s.max_new_tokens for s in self.settings)
        cache_length = self.context if sliding else min(self.context, longest + budget)
        self.cache = KVCache(self.model.config, B, cache_length, device=self.device, dtype=_model_dtype(self.model))
        logits = self._prefill([list(p) for p in self.prompts])

        want_logprobs = any(s.logprobs for s in self.settings)
        top_n = max(s.top_logprobs for s in self.settings)
        while True:
            chosen = choose_tokens(logits, self.samplers)  # (B,)
            lp = top_ids = top_lps = None
            if want_logprobs:
                lp, top_ids, top_lps = token_logprobs(logits, chosen, top_n)
                lp = lp.tolist()
                if top_ids is not None:
                    top_ids, top_lps = top_ids.tolist(), top_lps.tolist()
            chosen_list = chosen.tolist()
            events = []
            for b in range(B):
                if not active[b]:
                    continue
                token = chosen_list[b]
                self.samplers[b].observe(token)
                self.generated[b].append(token)
                event = TokenEvent(row=b, token_id=token, text="")
                if self.logprobs[b] is not None:
                    n = self.settings[b].top_logprobs
                    top = list(zip(top_ids[b][:n], top_lps[b][:n])) if n else []
                    event.logprob, event.top = lp[b], top
                    self.logprobs[b].append(TokenLogprob(
                        token, token_text(self.tokenizer, token), lp[b],
                        [{"token_id": i, "token": token_text(self.tokenizer, i), "logprob": v} for i, v in top],
                    ))
                detok = self.detokenizers[b]
                if token in self.stop_ids[b]:
                    event.text = detok.flush() if detok else ""
                    self._finish(b, "stop", token)
                else:
                    event.text = detok.push(token) if detok else ""
                    if detok is not None and detok.stopped:
                        self._finish(b, "stop", detok.stop_string)
                    elif len(self.generated[b]) >= self.settings[b].max_new_tokens:
                        event.text += detok.flush() if detok else ""
                        self._finish(b, "length", None)
                    elif self.cache.length >= self.cache.max_length and self.settings[b].context_overflow != "slide":
                        event.text += detok.flush() if detok else ""
                        self._finish(b, "length", None)
                event.finished = self.completions[b] is not None
                active[b] = not event.finished
                events.append(event)
            yield events
            if not any(active):
                return
            if self.cache.length >= self.cache.max_length:
                # Only sliding rows are still running: keep their most recent tokens and go on.
                logits = self._prefill([
                    (self.prompts[b] + self.generated[b])[-self._window_keep():] if active[b] else [0] for b in range(B)
                ])
                continue
            logits = self._step(chosen)

    def _prefill(self, rows: list[list[int]]) -> torch.Tensor:
        """Run the (left-padded) prompts through the model from an empty cache; last-position logits (B, V)."""
        B = len(rows)
        self.cache.reset()
        lengths = [len(r) for r in rows]
        P = max(lengths)
        ids = torch.zeros(B, P, dtype=torch.long)
        self._mask: torch.Tensor | None = None
        if min(lengths) != P:
            self._mask = torch.zeros(B, self.cache.max_length, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            ids[b, P - len(r):] = torch.tensor(r, dtype=torch.long)
            if self._mask is not None:
                self._mask[b, P - len(r):P] = 1
        ids = ids.to(self.device)
        self._positions = torch.tensor(lengths, device=self.device)[:, None]  # (B, 1): next position per row
        hidden = self.model.hidden_states(
            ids, attention_mask=None if self._mask is None else self._mask[:, :P], cache=self.cache
        )  # (B, P, C)
        return self.model.unembedding(hidden[:, -1])  # (B, V)

    def _step(self, last: torch.Tensor) -> torch.Tensor:
        """Feed each row's last token (B,); next-token logits (B, V)."""
        S = self.cache.length + 1
        mask = None
        if self._mask is not None:
            self._mask[:, S - 1] = 1
            mask = self._mask[:, :S]
        hidden = self.model.hidden_states(last[:, None], attention_mask=mask, positions=self._positions, cache=self.cache)
        self._positions += 1
        return self.model.unembedding(hidden[:, -1])  # (B, V)

    def _finish(self, b: int, reason: str, stop_reason: str | int | None) -> None:
        detok = self.detokenizers[b]
        self.completions[b] = Completion(
            text=detok.text if detok else "",
            token_ids=list(self.generated[b]),
            finish_reason=reason,
            stop_reason=stop_reason,
            prompt_tokens=len(self.prompts[b]),
            logprobs=self.logprobs[b],
        )


# ----------------------------------------------------------------------------- beam search


@torch.inference_mode()
def beam_search(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    extra_stop_ids: Sequence[int] = (),
    skip_special_tokens: bool = True,
) -> list[Completion]:
    """Keep the `num_beams` best partial sequences at every step; return the best
    `num_return_sequences` finished ones, best first.

    Score of a finished sequence: sum of its tokens' log-probabilities divided by
    its length (generated tokens, the stop token included) ** length_penalty.
    At each step the 2·num_beams best extensions are considered: one that ends
    (stop token) becomes a finished hypothesis if it ranks among the top
    num_beams, the others continue. The search ends when every new token is
    spent, or when num_beams hypotheses are finished and either
    `early_stopping` is set or no running beam can still beat the worst of them
    (judged at the current length, as Hugging Face does). Penalties and
    logit_bias apply; temperature and truncation do not (beam search is
    deterministic)."""
    config = model.config
    K, V = settings.num_beams, config.vocab_size
    prompt = _check_prompt(prompt_ids, V, 0)
    if len(prompt) > config.context_length:
        raise ContextOverflowError(
            f"the prompt is {len(prompt)} tokens but the model's context is {config.context_length}; shorten it"
        )
    stop_ids = stop_ids_for(tokenizer, settings, extra_stop_ids)
    device = next(model.parameters()).device
    max_new = settings.max_new_tokens
    lp_exp = settings.length_penalty
    dtype = _model_dtype(model)
    cache = KVCache(config, K, min(config.context_length, len(prompt) + max(max_new, 1)), device=device, dtype=dtype)
    # Every beam starts from the same prompt: prefill it once, then give each beam a copy of its keys and values.
    prompt_cache = KVCache(config, 1, len(prompt), device=device, dtype=dtype)
    hidden = model.hidden_states(torch.tensor([prompt], device=device), cache=prompt_cache)[:, -1]  # (1, C)
    logits = model.unembedding(hidden).expand(K, -1)  # (K, V)
    cache.keys[:, :, :, :len(prompt)] = prompt_cache.keys  # (L, 1, KV, P, hd) broadcast to (L, K, KV, P, hd)
    cache.values[:, :, :, :len(prompt)] = prompt_cache.values
    cache.advance(len(prompt))
    del prompt_cache
    samplers = [RowSampler(settings, V, prompt_ids=prompt, device=device) for _ in range(K)]
    beam_scores = torch.full((K,), float("-inf"), device=device)
    beam_scores[0] = 0.0  # all beams start identical: let only the first one expand
    beams: list[list[int]] = [[] for _ in range(K)]
    finished: list[tuple[float, list[int], str | None]] = []  # (score, tokens, finish_reason)

    def normalised(total: float, length: int) -> float:
        return total / (max(length, 1) ** lp_exp)

    def worst_kept() -> float:
        return sorted(s for s, _, _ in finished)[-K] if len(finished) >= K else float("-inf")

    done = False
    for step in range(max_new):
        processed = apply_penalties(logits.float().clone(), samplers)
        candidates = processed.log_softmax(-1) + beam_scores[:, None]  # (K, V)
        top = candidates.view(-1).topk(min(2 * K, K * V))
        next_beams: list[tuple[int, int, float]] = []  # (source beam, token, total log-prob)
        for rank, (total, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            if total == float("-inf"):
                break
            source, token = divmod(flat, V)
            if token in stop_ids:
                if rank < K:
                    finished.append((normalised(total, step + 1), beams[source] + [token], "stop"))
                continue
            next_beams.append((source, token, total))
            if len(next_beams) == K:
                break
        length = step + 1
        if len(finished) >= K:
            best_running = max((normalised(t, length) for _, _, t in next_beams), default=float("-inf"))
            if settings.early_stopping or best_running <= worst_kept():
                done = True
        if not next_beams:
            done = True
        if done:
            break
        while len(next_beams) < K:  # fewer live candidates than beams: pad with dead copies
            next_beams.append((next_beams[0][0], next_beams[0][1], float("-inf")))
        source_idx = torch.tensor([s for s, _, _ in next_beams], device=device)
        n = cache.length
        cache.keys[:, :, :, :n] = cache.keys[:, source_idx, :, :n]
        cache.values[:, :, :, :n] = cache.values[:, source_idx, :, :n]
        old = [(s.seen.clone() if s.seen is not None else None, s.counts.clone() if s.counts is not None else None) for s in samplers]
        for k, (source, token, _) in enumerate(next_beams):
            if old[source][0] is not None:
                samplers[k].seen.copy_(old[source][0])
            if old[source][1] is not None:
                samplers[k].counts.copy_(old[source][1])
            samplers[k].observe(token)
        beams = [beams[s] + [t] for s, t, _ in next_beams]
        beam_scores = torch.tensor([t for _, _, t in next_beams], device=device)
        if step == max_new - 1 or cache.length >= cache.max_length:
            break
        tokens = torch.tensor([t for _, t, _ in next_beams], device=device)[:, None]  # (K, 1)
        logits = model.unembedding(model.hidden_states(tokens, cache=cache)[:, -1])  # (K, V)
    if not done:
        for k in range(K):
            if beam_scores[k].item() > float("-inf") and beams[k]:
                finished.append((normalised(beam_scores[k].item(), len(beams[k])), beams[k], "length"))
    finished.sort(key=lambda f: f[0], reverse=True)
    skip = tokenizer.special_ids if (tokenizer is not None and skip_special_tokens) else set()
    results = []
    for score, tokens, reason in finished[: settings.num_return_sequences]:
        stop_reason: str | int | None = tokens[-1] if reason == "stop" else None
        text = ""
        if tokenizer is not None:
            detok = IncrementalDetokenizer(tokenizer, stop=settings.stop, skip_ids=skip)
            for t in tokens:
                if t in stop_ids:
                    break
                detok.push(t)
                if detok.stopped:
                    reason, stop_reason = "stop", detok.stop_string
                    break
            detok.flush()
            text = detok.text
        results.append(Completion(text, tokens, reason, stop_reason, len(prompt), None, score))
    return results


# ----------------------------------------------------------------------------- LM-level API


def resolve_settings(lm, settings: SamplingSettings | None = None, **overrides: Any) -> SamplingSettings:
    """The checkpoint's generation.json defaults, then `settings`, then keyword overrides."""
    reject_unknown_fields(overrides, SamplingSettings, "generation setting", SamplingError)
    if settings is not None:
        base = settings.to_dict()
    else:
        defaults = getattr(lm, "generation_config", None) or {}
        known = {f.name for f in fields(SamplingSettings)}  # generation.json may hold other keys too
        base = {k: v for k, v in defaults.items() if k in known} if isinstance(defaults, Mapping) else {}
    base.update({k: v for k, v in overrides.items() if v is not None or k in ("seed", "logit_bias")})
    return SamplingSettings(**base)


def encode_prompt(lm, prompt: str | Sequence[int], *, add_bos: bool | None = None) -> list[int]:
    """A prompt as ids: text is encoded (with BOS if asked or if the checkpoint says
    so); an empty prompt starts from BOS alone; a list of ids is used as given."""
    tokenizer = lm.tokenizer
    if not isinstance(prompt, str):
        ids = [int(i) for i in prompt]
    else:
        if tokenizer is None:
            raise ScribeError("this model has no tokenizer, so it cannot read text prompts; pass token ids instead")
        if add_bos is None:
            add_bos = bool((getattr(lm, "generation_config", None) or {}).get("add_bos_token", False))
        ids = tokenizer.encode(prompt)
        if add_bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
    if not ids and tokenizer is not None and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]
    if not ids:
        raise ScribeError("the prompt is empty and the tokenizer has no BOS token to start from; give some text")
    return ids


def generate(
    lm,
    prompt_or_prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    return_details: bool = False,
    add_bos: bool | None = None,
    skip_special_tokens: bool = True,
    settings: SamplingSettings | None = None,
    extra_stop_ids: Sequence[int] = (),
    **overrides: Any,
):
    """Text in, text out; a list in, a list out (a list of ints is one prompt of token
    ids). With num_return_sequences > 1 each prompt gives a list. return_details=True
    gives `Completion`s instead of str."""
    s = resolve_settings(lm, settings, **overrides)
    single = isinstance(prompt_or_prompts, str) or (
        isinstance(prompt_or_prompts, Sequence) and len(prompt_or_prompts) > 0
        and all(isinstance(i, int) for i in prompt_or_prompts)
    )
    prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
    if not prompts:
        raise ScribeError("no prompts given; pass a string or a non-empty list of strings")
    ids = [encode_prompt(lm, p, add_bos=add_bos) for p in prompts]
    n = s.num_return_sequences
    lm.model.eval()
    per_prompt: list[list[Completion]] = []
    if s.num_beams > 1:
        for p in ids:
            per_prompt.append(beam_search(lm.model, lm.tokenizer, p, s, extra_stop_ids=extra_stop_ids,
                                          skip_special_tokens=skip_special_tokens))
    else:
        rows = [p for p in ids for _ in range(n)]
        offsets = [i for _ in ids for i in range(n)]
        done = BatchGeneration(lm.model, lm.tokenizer, rows, s, skip_special_tokens=skip_special_tokens,
                               extra_stop_ids=extra_stop_ids, seed_offsets=offsets).run()
        per_prompt = [done[i * n:(i + 1) * n] for i in range(len(ids))]
    shaped = [c if return_details else [x.text for x in c] for c in per_prompt]
    out = [c[0] if n == 1 else c for c in shaped]
    return out[0] if single else out


def stream(
    lm,
    prompt: str | Sequence[int],
    *,
    add_bos: bool | None = None,
    skip_special_tokens: bool = True,
    settings: SamplingSettings | None = None,
    extra_stop_ids: Sequence[int] = (),
    **overrides: Any,
) -> Iterator[str]:
    """Yield the text of one generation piece by piece; concatenated, it equals `generate`'s text.
    Bad settings or prompts raise here, before the first piece is asked for."""
    s = resolve_settings(lm, settings, **overrides)
    if s.num_beams > 1 or s.num_return_sequences > 1:
        raise SamplingError("streaming gives one sequence; use generate() for beam search or several return sequences")
    ids = encode_prompt(lm, prompt, add_bos=add_bos)
    lm.model.eval()
    gen = BatchGeneration(lm.model, lm.tokenizer, [ids], s, skip_special_tokens=skip_special_tokens,
                          extra_stop_ids=extra_stop_ids)
    return _text_deltas(gen)


def _text_deltas(gen: BatchGeneration) -> Iterator[str]:
    for events in gen:
        for e in events:
            if e.text:
                yield e.text


_stream = stream  # `chat` has a parameter of the same name


def chat_stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn for this tokenizer (besides EOS)."""
    if tokenizer is None:
        return []
    return [i for i in (tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS) if i is not None]


def chat(lm, messages: Sequence[dict[str, str]], *, stream: bool = False, **settings: Any):
    """Answer a conversation [{role, content}, ...] as the assistant (the tokenizer's
    chat template renders it). Returns the reply, or an iterator of deltas with stream=True."""
    if lm.tokenizer is None:
        raise ScribeError("this model has no tokenizer, so it cannot chat")
    ids = lm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    stops = chat_stop_ids(lm.tokenizer)
    if stream:
        return _stream(lm, ids, extra_stop_ids=stops, **settings)
    return generate(lm, ids, extra_stop_ids=stops, **settings)
