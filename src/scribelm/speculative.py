"""Speculative decoding: guess several tokens, check them all in one forward pass.

A decode step reads every weight of the model to produce one token; on a CPU
(or any memory-bound device) running 6 tokens through the model costs little
more than running 1. So guess the next k tokens cheaply, run

    [last token, d1, d2, ..., dk]  ->  logits at k+1 positions   (one pass, through the cache)

and keep the guesses the model agrees with. Position i's logits are exactly
what a plain step would have seen had d1..di been chosen, so:

    greedy    keep d(i+1) while it is the argmax at position i; at the first
              disagreement emit the model's own token instead. If all k are
              kept, position k's logits give one more token for free.
              The output is token for token that of plain greedy decoding.
    sampling  the speculative-sampling rule (Leviathan et al. 2023, Chen et al.
              2023): with p the (processed) target distribution and q the
              draft's, keep d with probability min(1, p(d)/q(d)); on rejection
              draw from max(p - q, 0), normalised, and stop. Each emitted token
              is then distributed exactly as p: speculation changes the speed,
              never the distribution.

Where the guesses come from:

    prompt_lookup  no second model. The last n tokens (n = 3, then 2, then 1)
                   are looked up in the prompt and the output so far; the
                   tokens that followed their latest earlier occurrence are the
                   draft. A point mass: q(d) = 1, so d is kept with probability
                   p(d) and the residual is p without d. Quoting, editing and
                   summarising a given text copy long runs from the prompt.
    draft          a smaller model with the same tokenizer drafts k tokens one
                   by one from its own cache (sampled from its own processed
                   distribution q, or greedily for a greedy target).

A step whose guesses fail costs more than a plain step (a wider pass, and the
draft's own work), so each row adapts: a row whose guesses all failed stops
guessing for a while: 1 step, then 2, 4, ... up to `MAX_BACKOFF` after each
further failure, the wait halving after a success; and a sampled row (whose
guesses each survive with probability p only) guesses one token more than its
last guesses kept (two more when all were kept, up to num_draft).
Where little matches (free sampling) speculation thus costs next to nothing;
where the text copies, it guesses far every step.

Rejected positions are undone by setting each cache row's length back
(`KVCache.set_length`): rows keep different numbers of tokens, which the
per-row cache lengths allow. Penalties, logit bias, grammar constraints,
stop strings, log-probabilities and max_new_tokens work as in a plain step:
the drafted positions are checked one after another, each after the tokens
before it were accepted into the row.

    spec = Speculator("prompt_lookup", num_draft=5)
    events = spec.step(model, cache, rows)   # after the first token: (row, TokenEvent) pairs, several per row
    row.draft_tokens, row.accepted_draft_tokens

`LM.generate(..., speculative="prompt_lookup")` and `draft=small_lm` wire it in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scribelm.cache import KVCache
from scribelm.decode import DecodeRow, ErrorHandler, TokenEvent, decode_step, feed, feed_many, prefill
from scribelm.errors import ScribeError
from scribelm.sampling import RowSampler, choose_tokens, finite_logits, process_logits, token_logprobs

METHODS = ("prompt_lookup", "draft")
#: Most tokens drafted per step: beyond this a pass costs more than a wrong guess saves.
MAX_DRAFT = 32
#: Most steps a row waits before guessing again after its drafts kept failing.
MAX_BACKOFF = 16


class SpeculationError(ScribeError):
    """Speculative decoding asked for in a way it cannot run."""


def method_name(name: str | None) -> str | None:
    """'prompt-lookup' (the CLI's spelling) or 'prompt_lookup'; 'draft'; None: off."""
    if name is None:
        return None
    method = str(name).replace("-", "_")
    if method not in METHODS:
        raise SpeculationError(f"unknown speculative method {name!r}; choose prompt-lookup or draft")
    return method


# ----------------------------------------------------------------------------- drafting from the context


class NgramIndex:
    """Where each recent n-gram of a token sequence last occurred with something after it.

    `index[n][gram]` is the position right after the latest occurrence of `gram` that is
    followed by at least one token; kept up to date one appended token at a time, so a
    lookup costs O(n), not a scan of the sequence."""

    def __init__(self, max_ngram: int, min_ngram: int) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before `token` now have a continuation
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self.index[n][tuple(self.tokens[end - n : end])] = end
            self.tokens.append(int(token))

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        if k <= 0:
            return []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(self.tokens) < n:
                continue
            start = self.index[n].get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start : start + k]
        return []


# ----------------------------------------------------------------------------- the acceptance rule


def accept_or_resample(p: torch.Tensor, draft: int, q: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[int, bool]:
    """The speculative-sampling rule for one drafted token: (token, whether it is the draft).

    p (V,): the target's distribution; q (V,): the draft's, or None for a point mass on
    `draft`. Keep the draft with probability min(1, p/q); else draw from max(p - q, 0),
    normalised. The token returned is distributed exactly as p."""
    p_draft = float(p[draft])
    q_draft = 1.0 if q is None else float(q[draft])
    u = float(torch.rand((), generator=generator, device=p.device))
    if q_draft > 0.0 and u * q_draft < p_draft:
        return draft, True
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q).clamp(min=0.0)
    total = float(residual.sum())
    if not total > 0.0:  # p <= q everywhere up to rounding: p == q, and the draft was kept above but for rounding
        residual, total = p, float(p.sum())
    return int(torch.multinomial(residual / total, 1, generator=generator)[0]), False


def _distribution(logits: torch.Tensor, sampler: RowSampler) -> torch.Tensor | None:
    """softmax of the row's processed logits (V,), or None if that is no distribution (all removed, NaN)."""
    probs = finite_logits(process_logits(logits[None], [sampler])[0]).softmax(-1)
    total = float(probs.sum())
    if not (abs(total - 1.0) < 1e-3 and bool(torch.isfinite(probs).all())):
        return None
    return probs


def _plain_greedy(row: DecodeRow) -> bool:
    """A row whose tokens are the raw argmax: nothing to process, so all positions are checked at once."""
    s = row.sampler
    return (row.settings.is_greedy and s.seen is None and s.counts is None and s.bias is None
            and row.constraint is None and not row.settings.logprobs)


# ----------------------------------------------------------------------------- the speculator


class RowState:
    """What a speculator keeps for one row (as `DecodeRow.speculation`): it follows the row,
    so rows may move between cache slots (a server's do) and rows never share state."""

    def __init__(self) -> None:
        self.index: NgramIndex | None = None  # prompt lookup
        self.wait = 0  # steps left without guessing
        self.length = 0  # tokens to guess next time (0: num_draft)
        self.next_wait = 1  # the wait after the next round of failed guesses
        self.draft_slot: int | None = None  # the draft cache row that holds this row's tokens
        self.draft_sampler: RowSampler | None = None  # the draft's sampler for a sampled row


class Speculator:
    """Drafts tokens for the rows of one cache and verifies them in one pass per step.

    method: "prompt_lookup" or "draft" (then `draft_model`, a model with the same
    vocabulary). num_draft: most tokens guessed per step. The speculator keeps per-row
    state on each row (`RowState`) and, for a draft model, a cache of its own whose row b
    follows cache row b: a row that moved or is new there has its tokens prefilled into
    the draft cache first."""

    def __init__(self, method: str = "prompt_lookup", num_draft: int = 5, *, draft_model=None,
                 max_ngram: int = 3, min_ngram: int = 1) -> None:
        method = method_name(method)
        if method is None:
            raise SpeculationError("give a speculative method: prompt_lookup or draft")
        if isinstance(num_draft, bool) or not isinstance(num_draft, int) or not 1 <= num_draft <= MAX_DRAFT:
            raise SpeculationError(f"num_draft must be a whole number from 1 to {MAX_DRAFT}, got {num_draft!r}")
        if not 1 <= min_ngram <= max_ngram:
            raise SpeculationError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}..{max_ngram}")
        if method == "draft" and draft_model is None:
            raise SpeculationError("draft-model speculation needs a draft model (draft=...)")
        if method == "prompt_lookup" and draft_model is not None:
            raise SpeculationError("a draft model was given but the method is prompt_lookup; use method 'draft'")
        self.method, self.num_draft = method, num_draft
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.draft_model = draft_model
        self._draft_cache: KVCache | None = None
        self._draft_base: dict[int, int] = {}  # cache row -> the draft cache's length before this step's drafts
        self._cache_rows, self._cache_length = 1, None  # the draft cache's shape, when known ahead (`for_cache`)

    def for_cache(self, rows: int, length: int) -> "Speculator":
        """Size the draft model's cache for a target cache of this shape (a server's slots)."""
        self._cache_rows, self._cache_length = rows, length
        self._draft_cache = None
        return self

    def check(self, model) -> None:
        """Refuse a target this speculator cannot serve (a draft model of another vocabulary)."""
        if self.draft_model is None:
            return
        target, draft = model.config, self.draft_model.config
        if draft.vocab_size != target.vocab_size:
            raise SpeculationError(f"the draft model's vocabulary ({draft.vocab_size} tokens) differs from the "
                                   f"model's ({target.vocab_size}); a draft model must share the tokenizer")
        if not getattr(draft, "causal", True) or getattr(self.draft_model, "is_encoder_decoder", False):
            raise SpeculationError("the draft model must be a decoder-only model that generates text")
        here, there = next(model.parameters()).device, next(self.draft_model.parameters()).device
        if here != there:
            raise SpeculationError(f"the draft model is on {there} but the model on {here}; load both on one device")

    # -- one step ---------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, model, cache: KVCache, rows: Sequence[DecodeRow], *,
             on_error: ErrorHandler | None = None) -> list[tuple[DecodeRow, TokenEvent]]:
        """Rows b = cache row b, each having emitted at least one token that is not yet in
        the cache; returns (row, event) pairs, each row's in order (several per row)."""
        running = [b for b, r in enumerate(rows) if not r.done]
        if not running:
            return []
        lengths = [cache.row_length(b) for b in range(len(rows))]
        # Every row of the pass writes 1 + K positions; the fullest running row bounds K.
        room = min(cache.max_length - lengths[b] - 1 for b in running)
        limits = {b: 0 if self._waiting(rows[b]) else
                  max(0, min(self._state(rows[b]).length or self.num_draft, room,
                             rows[b].settings.max_new_tokens - len(rows[b].generated) - 1))
                  for b in running}
        drafts, q = self._propose(rows, running, limits)
        K = max((len(drafts[b]) for b in running), default=0)
        if K == 0:  # nothing guessed: exactly a plain step
            return self._plain_step(model, cache, rows, running, lengths, on_error)
        tokens = [[rows[b].last_token] + drafts[b] if b in drafts else [0] for b in range(len(rows))]
        for b, r in enumerate(rows):  # finished rows go along (one batch) at a position that fits
            if r.done:
                cache.set_length(b, min(lengths[b], cache.max_length - K - 1))
        logits = feed_many(model, cache, tokens)  # (B, 1 + K, V)
        events: list[tuple[DecodeRow, TokenEvent]] = []
        for b in running:
            row = rows[b]
            try:
                kept = self._verify_row(row, logits[b], drafts[b], q.get(b), lengths[b], cache.max_length, events)
            except Exception as err:
                if on_error is None:
                    raise
                on_error(row, err)
                kept = 0
            cache.set_length(b, lengths[b] + 1 + kept)  # the emitted last token is fed next step
            self._keep_draft_cache(b, kept, len(drafts[b]))
            if drafts[b]:
                self._record(row, kept, len(drafts[b]))
        return events

    @staticmethod
    def _state(row: DecodeRow) -> RowState:
        if row.speculation is None:
            row.speculation = RowState()
        return row.speculation

    def _waiting(self, row: DecodeRow) -> bool:
        """Whether the row sits this step out (its recent drafts all failed); counts the wait down."""
        state = self._state(row)
        if state.wait == 0:
            return False
        state.wait -= 1
        return True

    def _record(self, row: DecodeRow, kept: int, drafted: int) -> None:
        """A sampled row guesses about as far as its last guesses held (all kept: two further);
        after a round of failures a row waits twice as long as before, a success halves the wait."""
        state = self._state(row)
        if not row.settings.is_greedy:  # each guess survives with probability p only: long runs are rare
            state.length = min(self.num_draft, kept + 2) if kept == drafted else kept + 1
        if kept:
            state.wait, state.next_wait = 0, max(1, state.next_wait // 2)
        else:
            state.wait, state.next_wait = state.next_wait, min(2 * state.next_wait, MAX_BACKOFF)

    def _plain_step(self, model, cache, rows, running, lengths, on_error):
        for b, r in enumerate(rows):
            if r.done:
                cache.set_length(b, min(lengths[b], cache.max_length - 1))
        logits = feed(model, cache, [r.generated[-1] if r.generated else 0 for r in rows])  # (B, V)
        room = [lengths[b] + 1 < cache.max_length for b in running]
        return decode_step([rows[b] for b in running], logits[running], room, on_error=on_error)

    def _verify_row(self, row: DecodeRow, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                    length: int, max_length: int, events: list) -> int:
        """Check row's drafts against its logits (1 + k, V); append its events; the drafts kept."""
        k = len(drafts)
        row.draft_tokens += k
        fast = _plain_greedy(row)
        best = logits[: k + 1].argmax(-1).tolist() if fast else None  # (k + 1,)
        for i in range(k + 1):
            draft = drafts[i] if i < k else None
            if fast:
                token = best[i]
            elif draft is None:
                token = int(choose_tokens(self._masked(row, logits[i]), [row.sampler])[0])
            else:
                token = self._judge(row, logits[i], draft, None if q is None else q[i])
            kept = draft is not None and token == draft
            event = row.accept(token, *self._logprobs(row, logits[i], token), length + 1 + i < max_length)
            events.append((row, event))
            if kept:
                row.accepted_draft_tokens += 1
            if event.finished or not kept:
                return i + 1 if kept else i
        return k

    @staticmethod
    def _masked(row: DecodeRow, logits: torch.Tensor) -> torch.Tensor:
        if row.constraint is None:
            return logits[None]
        masked = logits.clone()
        row.constraint.mask_(masked)
        return masked[None]

    def _judge(self, row: DecodeRow, logits: torch.Tensor, draft: int, q: torch.Tensor | None) -> int:
        """The token at a drafted position: the draft if the rule keeps it, else the model's own."""
        masked = self._masked(row, logits)
        if row.settings.is_greedy:
            return int(choose_tokens(masked, [row.sampler])[0])
        p = _distribution(masked[0], row.sampler)
        if p is None:  # no distribution to compare with: what a plain step would do
            return int(choose_tokens(masked, [row.sampler])[0])
        token, _ = accept_or_resample(p, draft, q, row.sampler.generator)
        return token

    @staticmethod
    def _logprobs(row: DecodeRow, logits: torch.Tensor, token: int):
        if not row.settings.logprobs:
            return None, None
        n = row.settings.top_logprobs
        lp, top_ids, top_lps = token_logprobs(logits[None], torch.tensor([token], device=logits.device), n)
        top = list(zip(top_ids[0].tolist(), top_lps[0].tolist())) if top_ids is not None and n else None
        return float(lp[0]), top

    # -- drafting -----------------------------------------------------------------------
    def _propose(self, rows, running, limits) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Drafts per running row (cache row -> tokens) and, for sampled draft-model rows, q (k, V)."""
        if self.method == "prompt_lookup":
            drafts = {}
            for b in running:
                index = self._index_for(rows[b])
                drafts[b] = index.propose(limits[b])
            return drafts, {}
        return self._draft_with_model(rows, running, limits)

    def _index_for(self, row: DecodeRow) -> NgramIndex:
        state = self._state(row)
        if state.index is None:
            state.index = NgramIndex(self.max_ngram, self.min_ngram)
            state.index.extend(row.prompt_ids)
        state.index.extend(row.generated[len(state.index.tokens) - len(row.prompt_ids):])
        return state.index

    def _draft_with_model(self, rows, running, limits):
        model = self.draft_model
        self._draft_base = {}
        nothing: tuple[dict[int, list[int]], dict[int, torch.Tensor]] = ({b: [] for b in running}, {})
        cache = self._draft_cache
        B = len(rows)
        if cache is None or cache.batch_size < B:
            longest = max(len(r.prompt_ids) + r.settings.max_new_tokens for r in rows) + MAX_DRAFT
            size = min(model.config.context_length, longest if self._cache_length is None else self._cache_length)
            cache = self._draft_cache = KVCache(model.config, max(B, self._cache_rows), size,
                                                device=next(model.parameters()).device,
                                                dtype=next(model.parameters()).dtype)
            for r in rows:
                self._state(r).draft_slot = None
        drafting = [b for b in running
                    if limits[b] > 0 and len(rows[b].prompt_ids) + len(rows[b].generated) + 1 < cache.max_length]
        for b, r in enumerate(rows):
            state = self._state(r)
            if b not in drafting:  # it goes along at position 0 (one batch); its draft row is made afresh when needed
                cache.set_length(b, 0)
                state.draft_slot = None
            elif state.draft_slot != b:  # new here, or moved from another slot: its tokens but the last, afresh
                cache.set_length(b, 0)
                state.draft_slot = b
                known = (r.prompt_ids + r.generated)[:-1]
                if known:
                    prefill(model, cache, b, [known])
        if not drafting:
            return nothing
        # what each drafting row's cache row lacks: the tokens after its length, the last emitted one included
        behind = {b: (rows[b].prompt_ids + rows[b].generated)[cache.row_length(b):] for b in drafting}
        T0 = max(len(t) for t in behind.values())
        # the catch-up pass writes T0 positions in every row, then K - 1 single steps follow
        room = cache.max_length - max(cache.row_length(b) for b in drafting) - T0
        K = min(max(limits[b] for b in drafting), room + 1)
        if K <= 0:
            for b in drafting:
                self._state(rows[b]).draft_slot = None
                cache.set_length(b, 0)
            return nothing
        catch_up = [behind.get(b, [0]) for b in range(B)]
        starts = [cache.row_length(b) for b in range(B)]
        logits = feed_many(model, cache, catch_up)  # (B, T0, V)
        base = self._draft_base = {}
        for b in range(B):
            cache.set_length(b, starts[b] + len(catch_up[b]))
            if b in behind:
                base[b] = starts[b] + len(catch_up[b])
        current = logits[torch.arange(B), torch.tensor([len(t) - 1 for t in catch_up])]  # (B, V)
        drafts: dict[int, list[int]] = {b: [] for b in running}
        dists: dict[int, list[torch.Tensor]] = {b: [] for b in drafting}
        for j in range(K):
            chosen = [0] * B
            best = current.argmax(-1).tolist()  # (B,) the greedy rows' guesses, in one call
            for b in drafting:
                if j < limits[b]:
                    if rows[b].settings.is_greedy:
                        token, dist = best[b], None
                    else:
                        token, dist = self._draft_token(rows[b], current[b])
                    chosen[b] = token
                    drafts[b].append(token)
                    if dist is not None:
                        dists[b].append(dist)
            if j == K - 1:
                break
            current = feed(model, cache, chosen)  # (B, V)
        for b in range(B):
            if b not in base:
                cache.set_length(b, 0)
        q = {b: torch.stack(d) for b, d in dists.items() if d}
        return drafts, q

    def _draft_token(self, row: DecodeRow, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The draft's token from its logits (V,) and, for a sampled row, the distribution q it came from."""
        if row.settings.is_greedy:
            return int(logits.argmax()), None
        state = self._state(row)
        sampler = state.draft_sampler
        if sampler is None:
            # the draft's q needs no penalties (any q keeps p exact); its own reproducible generator
            settings = row.settings.replace(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                            logit_bias=None,
                                            seed=int(torch.randint(0, 2**62, (1,), generator=row.sampler.generator)))
            sampler = state.draft_sampler = RowSampler(settings, logits.shape[-1], device=logits.device)
        q = _distribution(logits, sampler)
        if q is None:  # no distribution (a broken draft): a point mass on its argmax is still a valid q
            token = int(finite_logits(logits.float()).argmax())
            point = torch.zeros_like(logits, dtype=torch.float32)
            point[token] = 1.0
            return token, point
        return int(torch.multinomial(q, 1, generator=sampler.generator)[0]), q

    def _keep_draft_cache(self, b: int, kept: int, drafted: int) -> None:
        """The draft cache holds the row up to its last emitted token (excluded) plus the drafts
        fed to draft the next ones; keep the part the target accepted."""
        if self._draft_cache is None or b not in self._draft_base:
            return
        self._draft_cache.set_length(b, self._draft_base[b] + min(kept, max(drafted - 1, 0)))
