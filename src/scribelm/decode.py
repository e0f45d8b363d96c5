"""The decode core: one step of every running sequence, from logits to events.

Both `LM.generate` / `LM.stream` (scribelm.generate) and the serving engine
(scribelm.serve.engine) run the same loop around a `KVCache` whose rows each
have their own length:

    logits (B, V) of each row's last position  = model(ids, cache=cache, last_only=True)
        │ processors (penalties, bias, temperature, top-k/p, min-p)   scribelm.sampling
        │ choose: greedy, or a draw from each row's own generator
        │ log-probabilities of the chosen token (and the top n), when asked
        ▼
    each row: observe the token, check stops (EOS / stop token id, stop string,
    max_new_tokens, a full cache), release text incrementally  ->  TokenEvent

`prefill` puts new prompts into rows of the cache (right-padded, several at
once) and gives their first logits; `decode_step` turns one step's logits
into events; `feed` runs the chosen tokens through the model for the next
step (`feed_many` several per row: speculative decoding checks its guesses
so, `scribelm.speculative`, and sets each row's length back after). The
callers add only what is theirs: generation adds left-over rules (sliding
context) and results; the engine adds scheduling (which rows are admitted,
cancelled, moved).

A failure inside one row's own work (its sampling, its text) can be confined
to that row: `decode_step(..., on_error=...)` then reports the row and goes
on with the others, which is what a server needs; without `on_error` it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from scribelm.cache import KVCache
from scribelm.sampling import IncrementalDetokenizer, RowSampler, SamplingSettings, choose_tokens, token_logprobs

#: What a row's work may report to `decode_step`'s on_error: (the row, the exception).
ErrorHandler = Callable[["DecodeRow", Exception], None]


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[dict[str, Any]] = field(default_factory=list)  # [{"token_id", "token", "logprob"}], best first


@dataclass
class TokenEvent:
    """One generated token of one sequence.

    `index` numbers the sequence (a row of a generation, a choice of a served
    request); `text` is the visible text this token releases ('' when held
    back; at the end it includes whatever was held back)."""

    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token_id, logprob), best first
    finish_reason: str | None = None  # "stop" | "length" once the sequence ended with this token
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return ""
    return tokenizer.token_bytes(int(token_id)).decode("utf-8", errors="replace")


def stop_ids_for(tokenizer, settings: SamplingSettings, extra: Sequence[int] = ()) -> set[int]:
    ids = set(settings.stop_token_ids) | set(extra)
    if tokenizer is not None and tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return ids


class DecodeRow:
    """One sequence's decode state: its sampler, its text, its stops, what it generated."""

    def __init__(
        self,
        index: int,
        prompt_ids: Sequence[int],
        settings: SamplingSettings,
        *,
        tokenizer,
        vocab_size: int,
        device: torch.device | str = "cpu",
        stop_ids: Sequence[int] = (),
        skip_ids: Sequence[int] = (),
        seed_offset: int = 0,
        record_logprobs: bool = False,
        defer_text: bool = False,
    ) -> None:
        self.index, self.settings = index, settings
        #: Decode the text once, when the row ends (its last event carries all of it), not token by
        #: token: for callers that stream nothing. Stop strings need the running text, so not with them.
        self.defer_text = defer_text and not settings.stop
        self.prompt_ids = list(prompt_ids)
        self.sampler = RowSampler(settings, vocab_size, prompt_ids=self.prompt_ids, device=device, seed_offset=seed_offset)
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer, stop=settings.stop, skip_ids=skip_ids) if tokenizer is not None else None
        self.stop_ids = frozenset(stop_ids_for(tokenizer, settings, stop_ids))
        self.generated: list[int] = []
        #: TokenLogprob of every token, when asked (LM.generate's details keep them).
        self.logprobs: list[TokenLogprob] | None = [] if (record_logprobs and settings.logprobs) else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        #: What the row may write (a `scribelm.structured.GrammarConstraint`); None: anything.
        self.constraint = None
        #: Speculative decoding (`scribelm.speculative`): tokens drafted for this row, and how many were kept.
        self.draft_tokens = 0
        self.accepted_draft_tokens = 0
        self.speculation = None  # the speculator's own state for this row

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def accept(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None, room: bool) -> TokenEvent:
        """Record the chosen token; the event says what text it releases and whether the row ended.
        `room`: whether the cache can take this token for another step."""
        self.sampler.observe(token)
        self.generated.append(token)
        if self.constraint is not None and token not in self.stop_ids:
            self.constraint.consume(token)
        event = TokenEvent(self.index, token, "", logprob, top)
        if self.logprobs is not None:
            self.logprobs.append(TokenLogprob(
                token, token_text(self.tokenizer, token), logprob,
                [{"token_id": i, "token": token_text(self.tokenizer, i), "logprob": v} for i, v in top or []],
            ))
        detok = self.detokenizer
        if self.defer_text and self.constraint is None:
            return self._accept_deferred(token, event, room)
        if token in self.stop_ids:
            event.text = detok.flush() if detok else ""
            self.finish("stop", token)
        else:
            event.text = detok.push(token) if detok else ""
            if detok is not None and detok.stopped:
                self.finish("stop", detok.stop_string)
            elif self.constraint is not None and self.constraint.finished:  # the grammar allows nothing more
                event.text += detok.flush() if detok else ""
                self.finish("stop")
            elif len(self.generated) >= self.settings.max_new_tokens or not room:
                event.text += detok.flush() if detok else ""
                self.finish("length")
        event.finish_reason, event.stop_reason = self.finish_reason, self.stop_reason
        return event

    def _accept_deferred(self, token: int, event: TokenEvent, room: bool) -> TokenEvent:
        """`accept` without running text: the same stops (no stop strings here), and the whole
        text, the same as pushed token by token, on the last event."""
        if token in self.stop_ids:
            self.finish("stop", token)
        elif len(self.generated) >= self.settings.max_new_tokens or not room:
            self.finish("length")
        if self.done and self.detokenizer is not None:
            shown = self.generated[:-1] if self.finish_reason == "stop" else self.generated  # a stop token shows no text
            event.text = self.detokenizer.push_many(shown) + self.detokenizer.flush()
        event.finish_reason, event.stop_reason = self.finish_reason, self.stop_reason
        return event


# ----------------------------------------------------------------------------- the model's side


#: Prompts longer than this are run through the cache this many tokens at a time: activations
#: and attention scores then grow with the chunk, not with the prompt (a 32K-token prompt never
#: holds a 32K × 32K score matrix), and only the last positions are unembedded.
PREFILL_CHUNK = 512


def prefill(model, cache: KVCache, first: int, prompts: Sequence[Sequence[int]],
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run prompts into cache rows first.. (right-padded, from empty rows); logits of each
    prompt's last token (k, V). With the causal mask a real token never sees the padding
    after it, and each row's length is set to its own prompt's, so padding is never read.
    A prompt longer than `chunk` tokens goes in chunk by chunk (`prefill_in_chunks`).
    A cache that cannot hold padding (a sliding-window model's `RollingKVCache`) takes
    prompts of different lengths one row at a time."""
    device = cache.keys.device
    lengths = [len(p) for p in prompts]
    if min(lengths) != max(lengths) and not cache.accepts_padding:
        return torch.cat([prefill(model, cache, first + j, [p], chunk) for j, p in enumerate(prompts)])
    P = max(lengths)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)  # (k, P)
    for j, p in enumerate(prompts):
        ids[j, : lengths[j]] = torch.tensor(list(p), dtype=torch.long)
    padding = None
    if min(lengths) != P:
        padding = (torch.arange(P)[None, :] < torch.tensor(lengths)[:, None]).to(device)  # (k, P): picks each last token
    rows = cache.rows(first, len(prompts))
    if P > chunk:
        logits = prefill_in_chunks(model, rows, ids.to(device), padding, torch.tensor(lengths), chunk)
    else:
        logits = model(ids.to(device), cache=rows, attention_mask=padding, last_only=True)
    for j, n in enumerate(lengths):
        cache.set_length(first + j, n)
    return logits[:, 0]  # (k, V)


def prefill_in_chunks(model, cache, ids: torch.Tensor, padding: torch.Tensor | None, lengths: torch.Tensor,
                      chunk: int) -> torch.Tensor:
    """ids (k, P) through an empty cache `chunk` positions at a time; logits of each row's
    last real token (k, 1, V). Each chunk attends the cached chunks before it and itself;
    a row's final hidden state is taken from the chunk its last token falls in."""
    last = (lengths - 1).to(ids.device)  # (k,) each row's last real position
    final = None  # (k, C) hidden state at each row's last position
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        mask = None if padding is None else padding[:, :end]  # (k, S) cached and new positions
        hidden = model.hidden_states(ids[:, start:end], cache=cache, attention_mask=mask)  # (k, t, C)
        if final is None:
            final = hidden.new_zeros(hidden.shape[0], hidden.shape[2])
        inside = ((last >= start) & (last < end)).nonzero().flatten()  # rows whose prompt ends here
        final[inside] = hidden[inside, last[inside] - start]
    return model.unembedding(final[:, None])  # (k, 1, V)


def feed(model, cache: KVCache, tokens: Sequence[int]) -> torch.Tensor:
    """One token per row 0..B-1, each at its own row's next position; next-token logits (B, V)."""
    ids = torch.tensor(list(tokens), dtype=torch.long, device=cache.keys.device)[:, None]  # (B, 1)
    return model(ids, cache=cache, last_only=True)[:, 0]


def feed_many(model, cache: KVCache, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """Several tokens per row 0..B-1 (row b: tokens[b], at least one), right-padded to the
    longest, each row from its own next position; logits of every position (B, T, V).
    Each row's length then counts the padding too: the caller sets the length it keeps
    (a padded position is never read, as no real token comes after it in the row).
    Speculative decoding verifies drafted tokens this way (`scribelm.speculative`)."""
    T = max(len(t) for t in tokens)
    ids = torch.zeros(len(tokens), T, dtype=torch.long)  # (B, T)
    for b, row in enumerate(tokens):
        ids[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return model(ids.to(cache.keys.device), cache=cache)  # (B, T, V)


# ----------------------------------------------------------------------------- one step


def decode_step(
    rows: Sequence[DecodeRow],
    logits: torch.Tensor,
    room: Sequence[bool],
    *,
    on_error: ErrorHandler | None = None,
) -> list[tuple[DecodeRow, TokenEvent]]:
    """Choose a token for every row from its logits (B, V) and turn each into an event;
    returns (row, event) pairs.

    room[b]: whether row b's cache can take another token. With `on_error`, a row whose
    own work fails is reported there and gets no event; the others go on."""
    chosen = _choose(rows, _constrained(rows, logits), on_error)  # log-probs below stay the model's own
    top_n = max((r.settings.top_logprobs for r, c in zip(rows, chosen) if r.settings.logprobs and c >= 0), default=-1)
    lp = top_ids = top_lps = None
    if top_n >= 0:
        try:
            picked = torch.tensor([max(c, 0) for c in chosen], dtype=torch.long, device=logits.device)
            lp, top_ids, top_lps = token_logprobs(logits, picked, top_n)
            lp = lp.tolist()
            if top_ids is not None:
                top_ids, top_lps = top_ids.tolist(), top_lps.tolist()
        except Exception as err:
            if on_error is None:
                raise
            for b, r in enumerate(rows):
                if r.settings.logprobs and chosen[b] >= 0:
                    on_error(r, err)
                    chosen[b] = -1
    events = []
    for b, row in enumerate(rows):
        if chosen[b] < 0:
            continue
        logprob = top = None
        if row.settings.logprobs:
            n = row.settings.top_logprobs
            logprob = lp[b]
            top = list(zip(top_ids[b][:n], top_lps[b][:n])) if n else None
        try:
            events.append((row, row.accept(chosen[b], logprob, top, room[b])))
        except Exception as err:
            if on_error is None:
                raise
            on_error(row, err)
    return events


def _constrained(rows: Sequence[DecodeRow], logits: torch.Tensor) -> torch.Tensor:
    """The logits with each constrained row's disallowed tokens at -inf (a copy); unchanged when no row is."""
    if all(r.constraint is None for r in rows):
        return logits
    logits = logits.clone()
    for b, r in enumerate(rows):
        if r.constraint is not None:
            r.constraint.mask_(logits[b])
    return logits


def _choose(rows: Sequence[DecodeRow], logits: torch.Tensor, on_error: ErrorHandler | None) -> list[int]:
    """Each row's next token id; -1 for a row whose sampling failed (reported to on_error)."""
    samplers = [r.sampler for r in rows]
    if on_error is None:
        return choose_tokens(logits, samplers).tolist()
    try:
        return choose_tokens(logits, samplers).tolist()
    except Exception:
        pass  # find the culprit row by row; the others go on
    chosen = []
    for b, r in enumerate(rows):
        try:
            chosen.append(int(choose_tokens(logits[b : b + 1], [r.sampler])[0]))
        except Exception as err:
            on_error(r, err)
            chosen.append(-1)
    return chosen
