"""The serving engine: many requests, one model, one batch that changes every step.

Continuous batching. A naive server runs one request at a time; a static
batcher waits for B requests, runs them together and waits for the slowest.
Here requests join and leave the running batch between decode steps:

    loop (a background thread):
      admit waiting requests while there are free slots:
          prefill their prompts together (right-padded), writing keys/values
          straight into free rows of the KVCache, and sample each first token
          (time to first token); a request with n choices copies its row n-1 times
      one decode step for every active sequence together:
          ids (B, 1) -> logits (B, V), each row sampled with its own settings and seed
      sequences that finished (EOS, stop string, max_tokens, cancelled) leave;
      the last row moves into the freed slot, so the active rows stay 0..B-1

Chunked prefill. A 4,000-token prompt prefilled in one forward pass would
stall every running stream for the whole pass. With `prefill_chunk` set, each
turn of the loop prefills at most that many prompt tokens before its decode
step: waiting short prompts first, then the next chunk of one long prompt,
which is built up in the cache's last row (out of the decode batch) and joins
the batch when its last chunk gives its first token. Running streams then
wait at most one chunk's forward pass between tokens (see `_LongPrompt`).

The step itself (prefill, feed, choose, stops, text, events) is the decode
core, `scribelm.decode`, the same one `LM.generate` runs; each row of the
cache has its own length (a sequence that joined later is shorter), so every
row computes exactly what it would alone. What is here is scheduling.

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
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scribelm.cache import KVCache, new_cache
from scribelm.chat_templates import apply_fallback_template
from scribelm.decode import DecodeRow, TokenEvent, decode_step, feed, prefill
from scribelm.errors import ScribeError
from scribelm.sampling import SamplingSettings
from scribelm.serve.prefix_cache import PrefixCache
from scribelm.serve.scoring import PromptLogprobsEvent, prefill_scored
from scribelm.structured import GrammarConstraint

__all__ = [  # TokenEvent is the decode core's: one event type for the library and the server
    "ContextLengthError", "Engine", "EngineStoppedError", "ErrorEvent", "FinishEvent", "GenerationRequest",
    "ModelLoadError", "ModelPool", "PromptLogprobsEvent", "QueueFullError", "TokenEvent",
]


#: Positions per cache slot unless asked otherwise: the cache holds max_batch x this many,
#: and a model's full context (128k for Llama 3) would not fit in memory at any useful batch.
DEFAULT_MAX_CONTEXT = 8192
#: Bytes of prompt keys/values kept for reuse per model unless asked otherwise.
DEFAULT_PREFIX_CACHE_BYTES = 256 << 20
#: Prompt tokens prefilled per turn of the loop unless asked otherwise (0: whole prompts at once).
DEFAULT_PREFILL_CHUNK = 256
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


# ----------------------------------------------------------------------------- requests and events


@dataclass
class FinishEvent:
    """A choice ended; it follows the choice's last `TokenEvent` (whose text includes all that was held back)."""

    index: int
    reason: str  # "stop" or "length"
    text: str  # always '' now: the last TokenEvent carries the end of the text
    completion_tokens: int
    draft_tokens: int = 0  # speculative decoding: tokens guessed for this choice
    accepted_draft_tokens: int = 0  # ... and kept


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
    prompt_logprobs: int | None = None  # score the prompt's own tokens too, with this many alternatives (echo)
    grammar: str | None = None  # llguidance grammar every choice must follow (structured output)
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
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
    """Hand events to their requests' event loops, by way of the courier thread (in order)."""
    if items:
        _courier().put(items)


_outbox: "queue.SimpleQueue[list[tuple[GenerationRequest, Any]]] | None" = None
_outbox_lock = threading.Lock()


def _courier() -> "queue.SimpleQueue":
    """The queue of the thread that wakes the event loops, started on first use.

    Waking an event loop from another thread is a write to its wake-up socket; the engine
    thread that does it then waits to get the interpreter lock back while the loop turns
    the event into bytes (and a woken thread may take its core). A decode step at one
    client lost about a tenth of its time so. The engine only puts the step's events in
    this queue (no system call while nothing waits on it); the courier wakes the loops,
    which then work while the engine is in the model's native code, where it holds no lock."""
    global _outbox
    if _outbox is None:
        with _outbox_lock:
            if _outbox is None:
                outbox: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=_carry, args=(outbox,), name="scribe-courier", daemon=True).start()
                _outbox = outbox
    return _outbox


def _carry(outbox: "queue.SimpleQueue") -> None:
    while True:
        items = list(outbox.get())
        while not outbox.empty():  # everything that piled up goes in one wake-up per loop
            items.extend(outbox.get_nowait())
        _wake_loops(items)


def _wake_loops(items: list[tuple[GenerationRequest, Any]]) -> None:
    """One wake-up per event loop, however many events."""
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


class _Sequence(DecodeRow):
    """One choice of one request, running in a row of the cache."""

    def __init__(self, request: GenerationRequest, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.request = request
        self.cancelled = False  # its request went away: free the row, send nothing more

    @property
    def leaving(self) -> bool:
        return self.done or self.cancelled or self.request.cancelled


@dataclass
class _LongPrompt:
    """A prompt longer than one chunk, prefilled a chunk per turn in a row out of the decode batch.

    Its row is the cache's last; the n rows its choices will take are held back from
    admission, so when its last chunk is done the choices join the batch at once."""

    request: GenerationRequest
    choices: list[_Sequence]
    row: int
    done: int = 0  # prompt positions in the row so far


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Continuous batching over one model; `start()` runs the loop in a daemon thread."""

    PREFILL_TOKENS = 2048  # most padded prompt tokens prefilled in one forward pass
    encoder_decoder = False  # serves encoder-decoders (the subclass in serve.seq2seq_engine)

    def __init__(
        self,
        lm,
        *,
        name: str = "model",
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = DEFAULT_MAX_CONTEXT,
        compile: bool = False,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        speculator=None,
    ) -> None:
        if lm.tokenizer is None:
            raise ScribeError(f"model {name!r} has no tokenizer.json; serving needs one to turn text into ids")
        if max_batch < 1 or max_queue < 1:
            raise ScribeError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
        from scribelm.generate import require_decoder

        require_decoder(lm.config)  # an encoder (BERT) cannot generate
        if getattr(lm.model, "is_encoder_decoder", False) and not self.encoder_decoder:
            raise ScribeError(f"model {name!r} is an encoder-decoder (T5); this engine batches decoder-only models, "
                              "serve it with scribelm.serve.seq2seq_engine.Seq2SeqEngine (ModelPool picks it)")
        self.lm, self.name = lm, name
        self.model, self.tokenizer, self.config = lm.model, lm.tokenizer, lm.config
        self.max_batch, self.max_queue = max_batch, max_queue
        if prefill_chunk < 0:
            raise ScribeError(f"prefill_chunk must be 0 (whole prompts) or a number of tokens, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._long: _LongPrompt | None = None  # the long prompt being prefilled, a chunk per turn
        self.context_length = min(self.config.context_length, max_context or self.config.context_length)
        self.device = lm.device
        # Guess several tokens per row and check them in one pass (`scribelm.speculative`); None: one per step.
        self.speculator = speculator
        if speculator is not None:
            if compile:
                raise ScribeError("speculative decoding runs eagerly; serve without --compile to use it")
            speculator.check(self.model)
            speculator.for_cache(max_batch, self.context_length)
        dtype = next(self.model.parameters()).dtype
        try:
            # a sliding-window model's slots hold its window only (RollingKVCache), unless compiled
            self.cache = new_cache(self.config, max_batch, self.context_length, device=self.device, dtype=dtype,
                                   rolling=not compile and speculator is None)  # speculation sets rows back
        except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
            need = 2 * self.config.n_layers * max_batch * self.config.n_kv_heads * self.context_length * self.config.head_dim
            raise ScribeError(
                f"the KV cache of {max_batch} slots x {self.context_length} positions needs "
                f"{need * torch.finfo(dtype).bits / 8 / 2**30:.1f} GiB and could not be allocated ({err}); "
                "lower --max-batch or --max-context"
            ) from None
        # Keys/values of recent prompts, for prompts that start the same way (0 bytes: off).
        # (Not over a rolling cache: its slots hold the last W positions, not a prompt's beginning.)
        reusable = prefix_cache_bytes > 0 and isinstance(self.cache, KVCache)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if reusable else None
        self._step = None  # the decode step: `feed` (eager), or one compiled graph over every slot
        if compile:
            from scribelm.compiled_decode import compiled_step_for

            self._step = compiled_step_for(self.model)
            with torch.inference_mode():  # compile now: a model that cannot be compiled fails to load, not a request
                self._step(self.cache, [0])
            self.cache.reset()
        self.chat_template: str | None = "model" if self.tokenizer.chat_template else None  # which one renders chats
        self.chat_stop: tuple[str, ...] = ()  # strings that end a reply under a chosen (not the model's) template
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
        return bool(self._active or self._waiting or self._long)

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
        prefilling = [self._long.request] if self._long is not None else []
        for request in list(self._waiting) + [s.request for s in self._active] + prefilling:
            request.emit(ErrorEvent(f"model {self.name!r} was unloaded"))
        self._waiting.clear()
        self._active.clear()
        self._long = None

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
        held = self._long.request.n if self._long is not None else 0  # rows the long prompt's choices will take
        return self.max_batch - len(self._active) - held

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
                    while not self._stopping and not self._waiting and not self._active and self._long is None:
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted, started = self._admit()
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
                if started is not None:
                    self._start_long(started)
                if self._long is not None:
                    self._prefill_chunk_of_long(self.prefill_chunk - sum(len(r.prompt_ids) for r in admitted))
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

    def _admit(self) -> tuple[list[GenerationRequest], GenerationRequest | None]:
        """Take waiting requests, in arrival order, that fit the free rows (call under the lock):
        (requests to prefill whole now, a long prompt to prefill chunk by chunk or None).

        Without chunking every request that fits is taken. With it, the whole prompts taken
        in one turn total at most `prefill_chunk` tokens, and one long prompt at a time is
        in progress; the first request that must wait stops admission (no overtaking)."""
        admitted: list[GenerationRequest] = []
        started = None
        free, budget = self._free_rows(), self.prefill_chunk
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                continue
            if head.n > free:
                break
            if budget:
                if self._is_long(head):
                    if self._long is not None or started is not None:
                        break
                    started = self._waiting.popleft()
                    free -= head.n
                    continue
                if admitted and sum(len(r.prompt_ids) for r in admitted) + len(head.prompt_ids) > budget:
                    break
            admitted.append(self._waiting.popleft())
            free -= head.n
        return admitted, started

    def _is_long(self, request: GenerationRequest) -> bool:
        """Prefilled chunk by chunk: a prompt longer than a chunk that generates (scored prompts go in whole)."""
        return (len(request.prompt_ids) > self.prefill_chunk and request.settings.max_new_tokens > 0
                and not _scored(request))

    def _start_long(self, request: GenerationRequest) -> None:
        """Give a long prompt the cache's last row, with its cached prefix, if any, already in place."""
        try:
            choices = [self._new_sequence(request, i) for i in range(request.n)]
        except Exception:
            log.exception("model %r: request %d could not start", self.name, request.id)
            request.fail(REQUEST_FAILED)
            return
        row = self.max_batch - 1  # _free_rows held n rows back: the batch never reaches it before the prompt joins
        self.cache.set_length(row, 0)
        long = _LongPrompt(request, choices, row)
        if self.prefix_cache is not None:
            blocks = self.prefix_cache.lookup(request.prompt_ids)
            if blocks:
                long.done = request.cached_tokens = self.prefix_cache.load(blocks, self.cache, row)
                self.cache.set_length(row, long.done)
        self._long = long

    def _prefill_chunk_of_long(self, budget: int) -> None:
        """The next chunk (at most `budget` tokens) of the long prompt; after the last,
        its choices join the batch with their first tokens."""
        long = self._long
        request, ids = long.request, long.request.prompt_ids
        if request.cancelled:
            self.cache.set_length(long.row, 0)
            self._long = None
            return
        if budget <= 0:  # whole prompts took this turn's tokens
            return
        end = min(len(ids), long.done + budget)
        try:
            view = self.cache.rows(long.row, 1)
            view.set_length(0, long.done)
            chunk = torch.tensor([ids[long.done: end]], dtype=torch.long, device=self.device)  # (1, t)
            if end < len(ids):
                self.model.hidden_states(chunk, cache=view)  # keys/values only: no logits until the last chunk
                long.done = end
                self.cache.set_length(long.row, end)
                return
            logits = self.model(chunk, cache=view, last_only=True)[:, 0]  # (1, V)
        except Exception:
            log.exception("model %r: prefill of request %d failed", self.name, request.id)
            request.fail(REQUEST_FAILED)
            self.cache.set_length(long.row, 0)
            self._long = None
            return
        self._long = None
        first = len(self._active)  # < long.row unless the batch is full up to it: then it is already in place
        self.cache.set_length(long.row, len(ids))
        if first != long.row:
            self.cache.copy_row(long.row, first)
            self.cache.set_length(long.row, 0)
        if self.prefix_cache is not None:
            self.prefix_cache.store(ids, self.cache, first)
        self._active.append(long.choices[0])
        for extra in long.choices[1:]:
            self.cache.copy_row(first, len(self._active))
            self._active.append(extra)
        self._choose(long.choices, logits[[0] * len(long.choices)])  # (n, V), a copy per choice

    def _reset_slots(self) -> None:
        """Forget every active sequence; the cache rows are free again."""
        self._active.clear()
        self.cache.reset()
        if self._long is not None:  # its row was not in the failed step: it goes on
            self.cache.set_length(self._long.row, self._long.done)

    def _new_sequence(self, request: GenerationRequest, index: int) -> _Sequence:
        # Choice i of a seeded request draws with seed + i: reproducible, and the choices differ.
        sequence = _Sequence(
            request, request.choice_offset + index, request.prompt_ids, request.settings, tokenizer=self.tokenizer,
            vocab_size=self.config.vocab_size, device=self.device, stop_ids=self.eos_ids | request.stop_token_ids,
            skip_ids=self.special_ids, seed_offset=index,
        )
        if request.grammar is not None:
            sequence.constraint = GrammarConstraint(self.tokenizer, request.grammar, self.config.vocab_size)
        return sequence

    def _prefill_groups(self, requests: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        """Split newly admitted requests into prefill batches of at most PREFILL_TOKENS padded tokens."""
        groups: list[list[GenerationRequest]] = []
        for request in (r for r in requests if not r.cancelled):
            if groups:
                group = groups[-1]
                if _scored(group[0]) != _scored(request):  # scored prompts keep every position's hidden state
                    groups.append([request])
                    continue
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
        score_only = []  # max_tokens 0: the prompt is scored (or echoed) and nothing is generated
        for r in requests:
            if r.settings.max_new_tokens == 0:
                score_only.append(r)
                continue
            try:
                ready.append((r, [self._new_sequence(r, i) for i in range(r.n)]))
            except Exception:
                log.exception("model %r: request %d could not start", self.name, r.id)
                r.fail(REQUEST_FAILED)
        first = len(self._active)
        if score_only:
            self._score_only(first, score_only)
        if not ready:
            return
        prompts = [r.prompt_ids for r, _ in ready]
        if _scored(ready[0][0]):  # a group is all scored or all plain (_prefill_groups)
            logits, scores = prefill_scored(self.model, self.cache, first, prompts, max(r.prompt_logprobs for r, _ in ready))
            _deliver([(r, self._prompt_event(r, i, score)) for (r, _), score in zip(ready, scores) for i in range(r.n)])
        else:
            logits = self._prefill_reusing_prefixes(first, [r for r, _ in ready])  # (k, V)
        sequences, rows = [], []
        for j, (r, choices) in enumerate(ready):
            sequences.append(choices[0])
            rows.append(j)
        self._active.extend(sequences)
        for j, (r, choices) in enumerate(ready):
            for extra in choices[1:]:
                self.cache.copy_row(first + j, len(self._active))
                self._active.append(extra)
                sequences.append(extra)
                rows.append(j)
        self._choose(sequences, logits[rows])

    def _prefill_reusing_prefixes(self, first: int, requests: list[GenerationRequest]) -> torch.Tensor:
        """`prefill` into rows first..; a prompt whose beginning is in the prefix cache copies those
        keys/values and runs only the rest (alone: its row starts at its own length). Logits (k, V)."""
        prompts = [r.prompt_ids for r in requests]
        if self.prefix_cache is None:
            return prefill(self.model, self.cache, first, prompts)
        hits = [self.prefix_cache.lookup(p) for p in prompts]
        if not any(hits):
            logits = prefill(self.model, self.cache, first, prompts)
        else:
            rows = []
            for j, (request, blocks) in enumerate(zip(requests, hits)):
                row, ids = first + j, request.prompt_ids
                if not blocks:
                    rows.append(prefill(self.model, self.cache, row, [ids]))
                    continue
                done = self.prefix_cache.load(blocks, self.cache, row)
                request.cached_tokens = done
                view = self.cache.rows(row, 1)
                view.set_length(0, done)
                rest = torch.tensor([ids[done:]], dtype=torch.long, device=self.device)  # (1, T)
                rows.append(self.model(rest, cache=view, last_only=True)[:, 0])
                self.cache.set_length(row, len(ids))
            logits = torch.cat(rows)
        for j, ids in enumerate(prompts):
            self.prefix_cache.store(ids, self.cache, first + j)
        return logits

    def _score_only(self, first: int, requests: list[GenerationRequest]) -> None:
        """Requests that generate nothing: their prompts' log-probabilities (when asked) in the free
        rows from `first`, which are free again afterwards; each choice then finishes at once."""
        scored = [r for r in requests if r.prompt_logprobs is not None]
        outbox: list[tuple[GenerationRequest, Any]] = []
        if scored:
            try:
                _, scores = prefill_scored(self.model, self.cache, first, [r.prompt_ids for r in scored],
                                           max(r.prompt_logprobs for r in scored))
            finally:
                for j in range(len(scored)):
                    self.cache.set_length(first + j, 0)
            outbox += [(r, self._prompt_event(r, i, score)) for r, score in zip(scored, scores) for i in range(r.n)]
        for r in requests:
            outbox += [(r, FinishEvent(index=r.choice_offset + i, reason="length", text="", completion_tokens=0))
                       for i in range(r.n)]
            if r.first_token_at is None:
                r.first_token_at = time.monotonic()
        _deliver(outbox)

    @staticmethod
    def _prompt_event(request: GenerationRequest, choice: int, score) -> PromptLogprobsEvent:
        logprobs, top = score
        if top is not None:
            top = [None if t is None else t[: request.prompt_logprobs] for t in top]
        return PromptLogprobsEvent(request.choice_offset + choice, list(request.prompt_ids), logprobs,
                                   top if request.prompt_logprobs else None)

    def _decode_step(self) -> None:
        B = len(self._active)
        self.peak_active = max(self.peak_active, B)
        if self.speculator is not None:  # it runs the model itself: several tokens per row
            self._speculate(self._active)
            return
        tokens = [s.last_token for s in self._active]
        logits = feed(self.model, self.cache, tokens) if self._step is None else self._step(self.cache, tokens)  # (B, V)
        self._choose(self._active, logits)

    def _choose(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """One decode-core step over these sequences (logits (B, V)), and their events to their clients.

        A sequence whose own work fails ends its own request and no other."""
        live = [i for i, s in enumerate(sequences) if not s.request.cancelled]
        for s in sequences:
            if s.request.cancelled:
                s.cancelled = True
        if not live:
            return
        rows = [sequences[i] for i in live]
        logits = logits[live] if len(live) != len(sequences) else logits
        room = [True] * len(rows)  # submit() checked that prompt + max_tokens fits a row
        self._emit(decode_step(rows, logits, room, on_error=self._row_failed), len(rows))

    def _speculate(self, sequences: list[_Sequence]) -> None:
        """A speculative step over all of this step's rows (cache row b = sequences[b]): the
        speculator runs the model itself, several tokens per row; a cancelled row sits out."""
        for s in sequences:
            if s.request.cancelled:
                s.cancelled = True
                s.finish("cancelled")
        if all(s.request.cancelled for s in sequences):
            return
        stepped = self.speculator.step(self.model, self.cache, sequences, on_error=self._row_failed)
        self._emit(stepped, len(stepped))

    def _row_failed(self, row: DecodeRow, err: Exception) -> None:
        log.error("model %r: request %d failed at token %d", self.name, row.request.id, len(row.generated), exc_info=err)
        row.cancelled = True
        row.request.fail(REQUEST_FAILED)

    def _emit(self, stepped, tokens: int) -> None:
        """A step's (sequence, event) pairs to their clients (a finished sequence's FinishEvent
        after its last token), and `tokens` generated into the statistics."""
        now = time.monotonic()
        outbox: list[tuple[GenerationRequest, Any]] = []
        for s, event in stepped:
            request = s.request
            if request.failed:
                continue
            if request.first_token_at is None:
                request.first_token_at = now
            outbox.append((request, event))
            if event.finished:
                outbox.append((request, FinishEvent(index=s.index, reason=event.finish_reason, text="",
                                                    completion_tokens=len(s.generated), draft_tokens=s.draft_tokens,
                                                    accepted_draft_tokens=s.accepted_draft_tokens)))
        _deliver([(r, e) for r, e in outbox if not r.failed])
        self._record_step(now, tokens)

    def _record_step(self, now: float, tokens: int) -> None:
        """One decode step that generated `tokens`, for tokens/s (the last 30 s) and the counters."""
        with self._stats_lock:
            self._recent.append((now, tokens))
            while self._recent and now - self._recent[0][0] > 30.0:
                self._recent.popleft()
        self.steps += 1
        self.generated_tokens += tokens

    def _drop_finished(self) -> None:
        """Remove finished or cancelled rows; the last row moves into each freed slot."""
        b = 0
        while b < len(self._active):
            s = self._active[b]
            if s.leaving:
                last = len(self._active) - 1
                if b != last:
                    self.cache.copy_row(last, b)
                    self._active[b] = self._active[last]
                self._active.pop()
                self.cache.set_length(last, 0)
            else:
                b += 1


def _scored(request: GenerationRequest) -> bool:
    return request.prompt_logprobs is not None


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
        compile: bool = False,
        chat_template=None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        speculative: str | None = None,
        draft: str | Path | None = None,
        num_draft: int | None = None,
    ) -> None:
        #: Speculative decoding for every model served: (method, draft model directory or None, num_draft).
        self.speculation = (speculative, draft, num_draft) if speculative or draft else None
        self.chat_template = chat_template  # a ChatTemplate for models that have none of their own
        self.paths = {name: Path(path) for name, path in models.items()}
        self.adapters = dict(adapters or {})  # name -> LoRA adapter directory, applied unmerged
        self.engine_options: dict[str, Any] = dict(max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                                                   compile=compile, prefix_cache_bytes=prefix_cache_bytes)
        self.prefill_chunk = prefill_chunk
        self.idle_unload = idle_unload
        self.device, self.dtype = device, dtype
        self.engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {name: threading.Lock() for name in self.paths}
        self.loaded_at: dict[str, float] = {}
        self.created = time.time()

    def names(self) -> list[str]:
        return list(self.paths)

    def loaded(self, name: str) -> Engine | None:
        """The engine of a model that is loaded now (marked used), else None; never blocks."""
        engine = self.engines.get(name)
        if engine is not None:
            engine.last_used = time.monotonic()
        return engine

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
                    from scribelm.serve.embeddings import EmbeddingModel, is_embedding_only

                    if is_embedding_only(lm):  # an encoder (BERT): /v1/embeddings only, no decode engine
                        engine = EmbeddingModel(lm, name=name, max_queue=self.engine_options["max_queue"])
                    else:
                        in_use = apply_fallback_template(lm.tokenizer, self.chat_template)
                        kind, extra = Engine, {}
                        if getattr(lm.model, "is_encoder_decoder", False):  # T5: one request at a time
                            from scribelm.serve.seq2seq_engine import Seq2SeqEngine

                            kind = Seq2SeqEngine
                            if self.speculation is not None:
                                log.warning("model %r is an encoder-decoder: served without speculative decoding", name)
                        else:
                            extra["speculator"] = self._speculator(lm)
                            extra["prefill_chunk"] = self.prefill_chunk  # an encoder-decoder runs requests whole
                        engine = kind(lm, name=name, **extra, **self.engine_options)
                        engine.chat_template = in_use
                        if in_use is not None and in_use != "model":  # the chosen template's turn ends stop a reply
                            engine.chat_stop = tuple(self.chat_template.stop)
                    engine.start()
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

    def _speculator(self, lm):
        """A fresh speculator for one model's engine (its draft model loaded), or None."""
        if self.speculation is None:
            return None
        from scribelm.generate import make_speculator
        from scribelm.lm import load

        method, draft, num_draft = self.speculation
        draft_lm = load(draft, device=self.device, dtype=self.dtype) if draft is not None else None
        return make_speculator(lm, method, draft_lm, num_draft)

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
