"""The serving engine: many requests, one model, one batch that changes every step.

Continuous batching. A naive server runs one request at a time; a static
batcher waits for B requests, runs them together and waits for the slowest.
Here requests join and leave the running batch between decode steps:

    loop (a background thread):
      admit waiting requests while there are free slots:
          prefill their prompts together (right-padded), writing keys/values
          straight into free slots of the SlotCache, and sample each first token
          (time to first token); a request with n choices copies its slot n-1 times
      one decode step for every active sequence together:
          ids (B, 1), positions (B, 1), mask (B, 1, 1, S) -> logits (B, V)
          each row sampled with its own settings and seed
      sequences that finished (EOS, stop string, max_tokens, cancelled) leave;
      the last row moves into the freed slot, so the active rows stay 0..B-1

Each row of the SlotCache has its own length (a sequence that joined later is
shorter): the decode step writes row b's new key at position lengths[b] and
masks keys beyond it, so every row computes exactly what it would alone.

Requests come from asyncio (the HTTP server) and go back to it as events:
the engine thread calls `loop.call_soon_threadsafe` to put each token on the
request's asyncio queue. A client that disconnects cancels its request and its
slot is freed before the next step. A failure in one request's own work (its
settings, its sampling, its text) ends that request with an `ErrorEvent`; the
others in the batch go on. The waiting line is bounded: when it is
full, `submit` raises `QueueFullError` (HTTP 429 with Retry-After).

`ModelPool` keeps several models, each with its own engine, loaded on first use
and unloaded after an idle time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scribelm.cache import KVCache
from scribelm.config import ModelConfig
from scribelm.errors import ScribeError
from scribelm.sampling import IncrementalDetokenizer, RowSampler, SamplingSettings, choose_tokens, token_logprobs


#: Positions per cache slot unless asked otherwise: the cache holds max_batch x this many,
#: and a model's full context (128k for Llama 3) would not fit in memory at any useful batch.
DEFAULT_MAX_CONTEXT = 8192
#: What a client is told when its own request failed inside the engine; the detail goes to the log.
REQUEST_FAILED = "generation failed for this request; the server log has the details"

log = logging.getLogger("scribelm.serve")


class QueueFullError(ScribeError):
    """The engine's waiting line is full; try again later."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ContextLengthError(ScribeError):
    """Prompt plus requested tokens do not fit the model's context."""


class EngineStoppedError(ScribeError):
    """The engine was shut down (the model was unloaded)."""


class ModelLoadError(ScribeError):
    """A served model's files could not be loaded; the message names the model, never its files."""


# ----------------------------------------------------------------------------- the slot cache


class SlotCache:
    """Keys/values of up to `max_slots` sequences, each with its own length.

    Layout: (n_layers, max_slots, n_kv_heads, max_length, head_dim), like
    KVCache, plus `lengths` (max_slots,). It honours the protocol the model's
    attention uses — `update(layer, k, v)`, `advance(steps)`, `length` — for a
    decode step over rows 0..B-1 prepared by `begin_decode(B)`.
    """

    def __init__(self, config: ModelConfig, max_slots: int, max_length: int, *, device=None, dtype=torch.float32) -> None:
        shape = (config.n_layers, max_slots, config.n_kv_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (L, slots, KV, S_max, hd)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(max_slots, dtype=torch.long, device=device)  # (slots,)
        self.max_length = max_length
        self.length = 0  # the step's query position as the model sees it: max length over the batch
        self._rows = 0
        self._write: torch.Tensor | None = None  # (B,) write position of each row this step
        self._row_index: torch.Tensor | None = None

    def slot_writer(self, slot: int, count: int = 1) -> KVCache:
        """A KVCache whose storage is slots slot..slot+count-1, for prefilling prompts in place."""
        # views: the prefill writes into the slots
        return KVCache.over(self.keys[:, slot : slot + count], self.values[:, slot : slot + count])

    def set_length(self, slot: int, length: int) -> None:
        self.lengths[slot] = length

    def copy_slot(self, source: int, target: int) -> None:
        n = int(self.lengths[source])
        self.keys[:, target, :, :n] = self.keys[:, source, :, :n]
        self.values[:, target, :, :n] = self.values[:, source, :, :n]
        self.lengths[target] = n

    def begin_decode(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a one-token step over rows 0..rows-1: their positions (B, 1) and mask (B, 1, 1, S)."""
        write = self.lengths[:rows].clone()  # (B,)
        if int(write.max()) >= self.max_length:
            raise ContextLengthError("a sequence reached the end of its cache slot")
        S = int(write.max()) + 1
        self._rows, self._write = rows, write
        self._row_index = torch.arange(rows, device=write.device)
        self.length = S - 1
        mask = torch.arange(S, device=write.device)[None, :] <= write[:, None]  # (B, S)
        return write[:, None], mask[:, None, None, :]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values (B, KV, 1, hd) written at each row's own position; returns (B, KV, S, hd)."""
        B, S = self._rows, self.length + 1
        self.keys[layer, self._row_index, :, self._write] = keys[:, :, 0]  # (B, KV, hd)
        self.values[layer, self._row_index, :, self._write] = values[:, :, 0]
        return self.keys[layer, :B, :, :S], self.values[layer, :B, :, :S]

    def advance(self, steps: int) -> None:
        self.lengths[: self._rows] += steps

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


# ----------------------------------------------------------------------------- requests and events


@dataclass
class TokenEvent:
    """One generated token of one choice; `text` is the new visible text (may be '')."""

    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    index: int
    reason: str  # "stop" or "length"
    text: str  # text held back until the end (flushed), may be ''
    completion_tokens: int


@dataclass
class ErrorEvent:
    """The request failed; it gets no further events (other requests in the batch go on)."""

    message: str


_ids = itertools.count(1)


@dataclass
class GenerationRequest:
    """A prompt and how to continue it `n` times; events go to an asyncio queue."""

    prompt_ids: list[int]
    settings: SamplingSettings
    n: int = 1
    stop_token_ids: frozenset[int] = frozenset()
    choice_offset: int = 0  # events number choices from here (several prompts share one event queue)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: bool = False
    failed: bool = False
    finished_choices: int = 0

    def cancel(self) -> None:
        """Stop generating (client gone); the engine frees the slots before its next step."""
        self.cancelled = True

    def fail(self, message: str) -> None:
        """End this request with an error event (once); its slots are freed before the next step."""
        if not self.failed:
            self.failed = True
            self.emit(ErrorEvent(message))
        self.cancelled = True

    def emit(self, event) -> None:
        _deliver([(self, event)])


def _deliver(items: list[tuple[GenerationRequest, Any]]) -> None:
    """Hand events to their requests' event loops: one wake-up per loop, however many events."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationRequest, Any]]] = {}
    for request, event in items:
        if request.loop is not None and request.events is not None:
            by_loop.setdefault(request.loop, []).append((request, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the event loop closed: nobody is listening any more
            for request, _ in batch:
                request.cancelled = True


def _put_all(batch: list[tuple[GenerationRequest, Any]]) -> None:
    for request, event in batch:
        request.events.put_nowait(event)


@dataclass
class _Sequence:
    request: GenerationRequest
    index: int
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    last_token: int = -1
    generated: int = 0
    done: bool = False


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Continuous batching over one model; `start()` runs the loop in a daemon thread."""

    PREFILL_TOKENS = 2048  # most padded prompt tokens prefilled in one forward pass

    def __init__(
        self,
        lm,
        *,
        name: str = "model",
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = DEFAULT_MAX_CONTEXT,
    ) -> None:
        if lm.tokenizer is None:
            raise ScribeError(f"model {name!r} has no tokenizer.json; serving needs one to turn text into ids")
        if max_batch < 1 or max_queue < 1:
            raise ScribeError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
        self.lm, self.name = lm, name
        self.model, self.tokenizer, self.config = lm.model, lm.tokenizer, lm.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context_length = min(self.config.context_length, max_context or self.config.context_length)
        self.device = lm.device
        dtype = next(self.model.parameters()).dtype
        try:
            self.cache = SlotCache(self.config, max_batch, self.context_length, device=self.device, dtype=dtype)
        except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
            need = 2 * self.config.n_layers * max_batch * self.config.n_kv_heads * self.context_length * self.config.head_dim
            raise ScribeError(
                f"the KV cache of {max_batch} slots x {self.context_length} positions needs "
                f"{need * torch.finfo(dtype).bits / 8 / 2**30:.1f} GiB and could not be allocated ({err}); "
                "lower --max-batch or --max-context"
            ) from None
        self.eos_ids = frozenset(i for i in (self.tokenizer.eos_id,) if i is not None)
        self.special_ids = frozenset(i for i in self.tokenizer.special_ids if i is not None)
        self._waiting: deque[GenerationRequest] = deque()
        self._active: list[_Sequence] = []  # row b of the cache holds _active[b]
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.last_used = time.monotonic()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens/s
        self._stats_lock = threading.Lock()
        self.steps = 0
        self.generated_tokens = 0
        self.peak_active = 0  # most sequences ever decoded in one step

    # -- facts ----------------------------------------------------------------
    @property
    def active_count(self) -> int:
        """Sequences holding a cache slot now."""
        return len(self._active)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._active or self._waiting)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        with self._stats_lock:  # the engine thread appends while the HTTP side reads
            recent = [(t, n) for t, n in self._recent if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"scribe-engine-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in list(self._waiting) + [s.request for s in self._active]:
            request.emit(ErrorEvent(f"model {self.name!r} was unloaded"))
        self._waiting.clear()
        self._active.clear()

    # -- requests -----------------------------------------------------------------
    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt is empty; give at least one token")
        if prompt_tokens + max_new_tokens > self.context_length:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_length} tokens, but {prompt_tokens + max_new_tokens} "
                f"were requested ({prompt_tokens} in the prompt + {max_new_tokens} for the completion); "
                "shorten the prompt or lower max_tokens"
            )

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue a request; raises QueueFullError when the waiting line is full."""
        if self._stopping:
            raise EngineStoppedError(f"model {self.name!r} is shutting down")
        if request.n > self.max_batch:
            raise ScribeError(f"n={request.n} exceeds the server's batch of {self.max_batch} sequences; ask for fewer choices")
        self.check_fits(len(request.prompt_ids), request.settings.max_new_tokens)
        request.settings.check_vocab(self.config.vocab_size)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                retry = max(1, math.ceil(self._estimated_wait()))
                raise QueueFullError(
                    f"model {self.name!r} has {len(self._waiting)} requests waiting (the limit is {self.max_queue}); retry in {retry} s",
                    retry_after=retry,
                )
            self._waiting.append(request)
            self.last_used = time.monotonic()
            self._cond.notify_all()
        return request

    def _free_rows(self) -> int:
        return self.max_batch - len(self._active)

    def _estimated_wait(self) -> float:
        rate = self.tokens_per_second()
        if rate <= 0:
            return 1.0
        pending = sum(r.settings.max_new_tokens * r.n for r in self._waiting)
        return min(60.0, pending / rate)

    # -- the loop ----------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted = []
                    free = self._free_rows()
                    while self._waiting:
                        head = self._waiting[0]
                        if head.cancelled:
                            self._waiting.popleft()
                            continue
                        if head.n > free:
                            break
                        admitted.append(self._waiting.popleft())
                        free -= head.n
                # A failure of one request's own work (its settings, its sampling, its text) ends that
                # request only (see _prefill and _choose); only a failed shared forward pass fails those
                # who shared it, and the engine then starts over with empty slots.
                for group in self._prefill_groups(admitted):
                    try:
                        self._prefill(group)
                    except Exception:
                        log.exception("model %r: prefill of %d request(s) failed", self.name, len(group))
                        for request in group:
                            request.fail(REQUEST_FAILED)
                        self._drop_finished()
                try:
                    self._drop_finished()
                    if self._active:
                        self._decode_step()
                        self._drop_finished()
                except Exception:
                    log.exception("model %r: decode step over %d sequence(s) failed", self.name, len(self._active))
                    for request in {id(s.request): s.request for s in self._active}.values():
                        request.fail(REQUEST_FAILED)
                    self._reset_slots()
                self.last_used = time.monotonic()

    def _reset_slots(self) -> None:
        """Forget every active sequence; the cache rows are free again."""
        self._active.clear()
        self.cache.lengths.zero_()

    def _new_sequence(self, request: GenerationRequest, index: int) -> _Sequence:
        s = request.settings
        # Choice i of a seeded request draws with seed + i: reproducible, and the choices differ.
        sampler = RowSampler(s, self.config.vocab_size, prompt_ids=request.prompt_ids, device=self.device, seed_offset=index)
        detok = IncrementalDetokenizer(self.tokenizer, stop=s.stop, skip_ids=self.special_ids)
        return _Sequence(request=request, index=request.choice_offset + index, sampler=sampler, detokenizer=detok)

    def _prefill_groups(self, requests: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        """Split newly admitted requests into prefill batches of at most PREFILL_TOKENS padded tokens."""
        groups: list[list[GenerationRequest]] = []
        for request in (r for r in requests if not r.cancelled):
            if groups:
                group = groups[-1]
                longest = max(len(request.prompt_ids), *(len(r.prompt_ids) for r in group))
                if longest * (len(group) + 1) <= self.PREFILL_TOKENS:
                    group.append(request)
                    continue
            groups.append([request])
        return groups

    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Run new prompts together into free slots and pick their first tokens.

        Prompts are right-padded: with the causal mask a real token never sees the
        padding after it, and each slot's length is its own prompt's, so the padded
        keys are never read. Request j prefills slot first+j; its other choices get
        copies of that slot."""
        # Each request's own state first: a request whose settings cannot be honoured fails alone.
        ready: list[tuple[GenerationRequest, list[_Sequence]]] = []
        for r in requests:
            try:
                ready.append((r, [self._new_sequence(r, i) for i in range(r.n)]))
            except Exception:
                log.exception("model %r: request %d could not start", self.name, r.id)
                r.fail(REQUEST_FAILED)
        if not ready:
            return
        requests = [r for r, _ in ready]
        first, k = len(self._active), len(requests)
        lengths = [len(r.prompt_ids) for r in requests]
        ids = torch.zeros(k, max(lengths), dtype=torch.long, device=self.device)  # (k, P)
        for j, r in enumerate(requests):
            ids[j, : lengths[j]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        hidden = self.model.hidden_states(ids, cache=self.cache.slot_writer(first, k))  # (k, P, C)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.unembedding(hidden[torch.arange(k, device=self.device), last])  # (k, V): each prompt's last position
        sequences, rows = [], []
        for j, (r, choices) in enumerate(ready):
            self.cache.set_length(first + j, lengths[j])
            sequences.append(choices[0])
            rows.append(j)
        self._active.extend(sequences)
        for j, (r, choices) in enumerate(ready):
            for extra in choices[1:]:
                self.cache.copy_slot(first + j, len(self._active))
                self._active.append(extra)
                sequences.append(extra)
                rows.append(j)
        self._choose(sequences, logits[rows])

    def _decode_step(self) -> None:
        B = len(self._active)
        self.peak_active = max(self.peak_active, B)
        ids = torch.tensor([[s.last_token] for s in self._active], dtype=torch.long, device=self.device)  # (B, 1)
        positions, mask = self.cache.begin_decode(B)
        logits = self.model(ids, attention_mask=mask, positions=positions, cache=self.cache)[:, -1]  # (B, V)
        self._choose(self._active, logits)

    def _choose(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence from logits (B, V) and send it to its client.

        The rows are chosen together; if that fails, one by one, so that a row whose
        sampling fails ends its own request and no other."""
        live = [i for i, s in enumerate(sequences) if not s.request.cancelled]
        for i, s in enumerate(sequences):
            if s.request.cancelled:
                s.done = True
        if not live:
            return
        rows = [sequences[i] for i in live]
        logits = logits[live] if len(live) != len(sequences) else logits
        chosen_list = self._choose_ids(rows, logits)
        want_top = max((s.request.settings.top_logprobs for s in rows if s.request.settings.logprobs), default=-1)
        chosen_lp = top_ids = top_lp = None
        if want_top >= 0:
            try:
                picked = torch.tensor([max(t, 0) for t in chosen_list], dtype=torch.long, device=logits.device)
                chosen_lp, top_ids, top_lp = token_logprobs(logits, picked, want_top)
            except Exception:
                log.exception("model %r: log-probabilities failed", self.name)
                for s in rows:
                    if s.request.settings.logprobs:
                        s.request.fail(REQUEST_FAILED)
        now = time.monotonic()
        outbox: list[tuple[GenerationRequest, Any]] = []
        for b, s in enumerate(rows):
            if s.request.cancelled or chosen_list[b] < 0:
                s.done = True
                continue
            try:
                outbox.extend(self._advance(s, chosen_list[b], now, b, chosen_lp, top_ids, top_lp))
            except Exception:
                log.exception("model %r: request %d failed at token %d", self.name, s.request.id, s.generated)
                s.done = True
                s.request.fail(REQUEST_FAILED)
        _deliver([(r, e) for r, e in outbox if not r.failed])
        with self._stats_lock:
            self._recent.append((now, len(rows)))
            while self._recent and now - self._recent[0][0] > 30.0:
                self._recent.popleft()
        self.steps += 1
        self.generated_tokens += len(rows)

    def _choose_ids(self, rows: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's next token id; -1 for a row whose sampling failed (its request is failed)."""
        try:
            return choose_tokens(logits, [s.sampler for s in rows]).tolist()
        except Exception:
            pass  # find the culprit row by row; the others go on
        chosen = []
        for b, s in enumerate(rows):
            try:
                chosen.append(int(choose_tokens(logits[b : b + 1], [s.sampler])[0]))
            except Exception:
                log.exception("model %r: sampling failed for request %d", self.name, s.request.id)
                s.request.fail(REQUEST_FAILED)
                chosen.append(-1)
        return chosen

    def _advance(self, s: _Sequence, token: int, now: float, b: int, chosen_lp, top_ids, top_lp) -> list[tuple[GenerationRequest, Any]]:
        """Record one chosen token of one sequence: its events, and whether it finished."""
        s.sampler.observe(token)
        s.generated += 1
        s.last_token = token
        request = s.request
        if request.first_token_at is None:
            request.first_token_at = now
        event = TokenEvent(index=s.index, token_id=token, text="")
        settings = request.settings
        if settings.logprobs:
            event.logprob = _finite_logprob(float(chosen_lp[b]))
            if settings.top_logprobs:
                event.top_logprobs = [(i, _finite_logprob(lp)) for i, lp in
                                      zip(top_ids[b, : settings.top_logprobs].tolist(), top_lp[b, : settings.top_logprobs].tolist())]
        reason = None
        if token in self.eos_ids or token in request.stop_token_ids:
            reason = "stop"
        else:
            event.text = s.detokenizer.push(token)
            if s.detokenizer.stopped:
                reason = "stop"
            elif s.generated >= settings.max_new_tokens:
                reason = "length"
            elif len(request.prompt_ids) + s.generated >= self.context_length:
                reason = "length"
        events: list[tuple[GenerationRequest, Any]] = [(request, event)]
        if reason is not None:
            tail = s.detokenizer.flush() if not s.detokenizer.stopped else ""
            events.append((request, FinishEvent(index=s.index, reason=reason, text=tail, completion_tokens=s.generated)))
            s.done = True
        return events

    def _drop_finished(self) -> None:
        """Remove finished or cancelled rows; the last row moves into each freed slot."""
        b = 0
        while b < len(self._active):
            s = self._active[b]
            if s.done or s.request.cancelled:
                last = len(self._active) - 1
                if b != last:
                    self.cache.copy_slot(last, b)
                    self._active[b] = self._active[last]
                self._active.pop()
                self.cache.set_length(last, 0)
            else:
                b += 1


def _finite_logprob(value: float) -> float:
    """JSON has no -Infinity: an impossible token reports -9999.0, as OpenAI's API does."""
    return value if math.isfinite(value) else -9999.0


# ----------------------------------------------------------------------------- several models


class ModelPool:
    """Named models, each with its own engine, loaded on first use and unloaded when idle.

    `idle_unload` seconds without requests unloads a model (0: never); it is
    loaded again by the next request that names it."""

    def __init__(
        self,
        models: dict[str, str | Path],
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = DEFAULT_MAX_CONTEXT,
        idle_unload: float = 0.0,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        adapters: dict[str, str | Path] | None = None,
    ) -> None:
        self.paths = {name: Path(path) for name, path in models.items()}
        self.adapters = dict(adapters or {})  # name -> LoRA adapter directory, applied unmerged
        self.engine_options: dict[str, Any] = dict(max_batch=max_batch, max_queue=max_queue, max_context=max_context)
        self.idle_unload = idle_unload
        self.device, self.dtype = device, dtype
        self.engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {name: threading.Lock() for name in self.paths}
        self.loaded_at: dict[str, float] = {}
        self.created = time.time()

    def names(self) -> list[str]:
        return list(self.paths)

    def get(self, name: str) -> Engine:
        """The engine of a model, loading it if needed (blocking; call from a worker thread)."""
        if name not in self.paths:
            raise KeyError(name)
        engine = self.engines.get(name)
        if engine is not None:
            engine.last_used = time.monotonic()
            return engine
        with self._loading[name]:
            engine = self.engines.get(name)
            if engine is None:
                from scribelm.lm import load

                started = time.monotonic()
                try:
                    lm = load(self.paths[name], device=self.device, dtype=self.dtype, adapter=self.adapters.get(name))
                    if not isinstance(lm.generation_config, dict):  # e.g. a generation.json that holds a list
                        raise ScribeError(f"{self.paths[name]}: generation.json must hold a JSON object")
                    engine = Engine(lm, name=name, **self.engine_options).start()
                except Exception as err:
                    # The detail (paths, files) is for the operator; clients get ModelLoadError's message.
                    log.error("model %r could not be loaded from %s: %s: %s", name, self.paths[name], type(err).__name__, err)
                    raise ModelLoadError(f"model {name!r} could not be loaded; the server log has the details") from err
                parameters = sum(p.numel() for p in lm.model.parameters())
                log.info("loaded model %s (%s params, %.1f s)", name, f"{parameters:,}", time.monotonic() - started)
                with self._lock:
                    self.engines[name] = engine
                    self.loaded_at[name] = time.time()
        engine.last_used = time.monotonic()
        return engine

    def unload(self, name: str) -> bool:
        with self._lock:
            engine = self.engines.pop(name, None)
            self.loaded_at.pop(name, None)
        if engine is None:
            return False
        engine.stop()
        log.info("unloaded model %s", name)
        return True

    def unload_idle(self) -> list[str]:
        """Unload every model idle for longer than `idle_unload` seconds; returns their names."""
        if self.idle_unload <= 0:
            return []
        now = time.monotonic()
        idle = [n for n, e in list(self.engines.items()) if not e.busy and now - e.last_used > self.idle_unload]
        return [n for n in idle if self.unload(n)]

    def close(self) -> None:
        for name in list(self.engines):
            self.unload(name)
