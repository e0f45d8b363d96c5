"""Serving an encoder-decoder (T5): requests one at a time, each through the decode core.

The continuous-batching `Engine` keeps one decoder-only KV cache whose rows join and leave
between steps. An encoder-decoder's decoder also reads the encoded prompt of its own request,
and T5's relative position bias wants every row of a step at one length, so here a request
runs alone:

    prompt ids ──▶ encoder (once) ──▶ decoder from the start token, one token per step
                   (`scribelm.generate.seq2seq_generation`: the loop `LM.generate` runs)
                   ──▶ TokenEvents to the client as they come; choice i draws with seed + i

Requests wait in the same bounded line as the `Engine`'s (429 when it is full), with the same
limits and events, so `/v1/completions` (and chat, for a model with a chat template) answer
as for any model and equal `LM.generate`. Not here: batching across requests, the prefix
cache, compiled decoding, prompt scoring (echo / prompt log-probabilities) and structured
output (refused by name).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from scribelm.errors import ScribeError
from scribelm.generate import seq2seq_generation
from scribelm.serve.engine import (
    DEFAULT_MAX_CONTEXT,
    REQUEST_FAILED,
    Engine,
    FinishEvent,
    GenerationRequest,
    _deliver,
    log,
)


class Seq2SeqEngine(Engine):
    """An `Engine` for encoder-decoder models: one request at a time, its choices one after another."""

    encoder_decoder = True

    def __init__(self, lm, *, name: str = "model", max_batch: int = 8, max_queue: int = 64,
                 max_context: int | None = DEFAULT_MAX_CONTEXT, compile: bool = False, prefix_cache_bytes: int = 0) -> None:
        # One cache row is allocated by the base (unused: each generation makes its own decoder cache).
        super().__init__(lm, name=name, max_batch=1, max_queue=max_queue, max_context=max_context, compile=False,
                         prefix_cache_bytes=0)
        self.max_batch = max_batch  # the most choices one request may ask for

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        if request.prompt_logprobs is not None:
            raise ScribeError(f"model {self.name!r} is an encoder-decoder: its prompt is encoded, not scored; "
                              "echo and prompt log-probabilities are not available")
        if request.grammar is not None:
            raise ScribeError(f"model {self.name!r} is an encoder-decoder: structured output is not available for it")
        return super().submit(request)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting:
                        self._cond.wait()
                    if self._stopping:
                        return
                    request = self._waiting.popleft()
                if request.cancelled:
                    continue
                self._active[:] = [SimpleNamespace(request=request)]  # what `stop` tells it was unloaded
                try:
                    self._serve(request)
                except Exception:
                    log.exception("model %r: request %d failed", self.name, request.id)
                    request.fail(REQUEST_FAILED)
                finally:
                    self._active.clear()
                self.last_used = time.monotonic()

    def _serve(self, request: GenerationRequest) -> None:
        stops = sorted(self.eos_ids | request.stop_token_ids)
        for choice in range(request.n):
            gen = seq2seq_generation(self.lm, request.prompt_ids, request.settings, stops, True, seed_offset=choice)
            index = request.choice_offset + choice
            ended = False
            for events in gen:
                if request.cancelled or self._stopping:
                    return
                now = time.monotonic()
                if request.first_token_at is None:
                    request.first_token_at = now
                outbox = []
                for event in events:
                    event.index = index
                    outbox.append((request, event))
                    if event.finished:
                        ended = True
                        outbox.append((request, FinishEvent(index=index, reason=event.finish_reason, text="",
                                                            completion_tokens=len(gen.rows[0].generated))))
                _deliver(outbox)
                self._record_step(now, len(events))
            if not ended:  # nothing to generate (max_tokens 0 with echo): the choice ends at once
                _deliver([(request, FinishEvent(index=index, reason="length", text="", completion_tokens=0))])
                if request.first_token_at is None:
                    request.first_token_at = time.monotonic()
