"""One decode step as one compiled graph (the gpt-fast lesson).

An eager decode step runs a few hundred small PyTorch calls from Python for
a handful of real products; at batch 1 that overhead is a large part of the
step. `torch.compile` can capture the whole step as one graph and fuse the
small operations, but only if the step has the same shapes every time:

    eager step    reads the cache up to the longest row (S grows every step),
                  writes each row at its own position
    static step   reads the whole preallocated cache (S = max_length) and
                  masks the keys past each row's position; the token ids and
                  positions come in as tensors; every row of the cache takes
                  part (rows without a sequence compute on, unread)

so one graph serves every step of a generation or a server, whatever the
lengths. The cache bookkeeping (lengths) stays outside the graph, in Python.

    step = compiled_step_for(model)     # one per model; compiles on the first call (and per cache shape)
    logits = step(cache, tokens)        # (B, V) for rows 0..B-1; cache lengths advance

`LM.generate(..., compile=True)`, `scribe generate --compile` and `scribe serve
--compile` use it; generation then sizes its cache in powers of two
(`static_cache_length`) so that a few graphs serve all lengths.

The numbers are the eager step's up to float rounding (the attention reads
masked keys instead of a shorter cache), so greedy tokens match; a test
checks it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from scribelm.cache import ContextOverflowError, KVCache


class _StaticRows:
    """The model's cache protocol over whole preallocated storage: each row written at its
    own position (B, 1), every key read, those past each row's position masked."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.values, self.positions = keys, values, positions  # (L, B, n_kv, S_max, hd) x2, (B, 1)

    def prepare(self, rows: int, steps: int):
        seen = torch.arange(self.keys.shape[3], device=self.keys.device)  # (S_max,)
        mask = seen[None, None, None, :] <= self.positions[:, None, :, None]  # (B, 1, 1, S_max)
        return None, self.positions, mask

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None]  # (B, 1)
        self.keys[layer][rows, :, self.positions] = keys.transpose(1, 2)  # (B, 1, n_kv, hd) at (row, position)
        self.values[layer][rows, :, self.positions] = values.transpose(1, 2)
        return self.keys[layer], self.values[layer]

    def advance(self, steps: int) -> None:
        pass  # lengths are kept by the KVCache, outside the graph


class CompiledStep:
    """A decode step over a `KVCache`, compiled once by `torch.compile` (see the module docstring)."""

    def __init__(self, model, *, mode: str | None = None) -> None:
        self.model = model
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.model(ids, cache=_StaticRows(keys, values, positions), last_only=True)[:, 0]  # (B, V)

    def __call__(self, cache: KVCache, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each of rows 0..len(tokens)-1 at its own position; their next-token
        logits (B, V). All rows of the cache run (the shape never changes); only these advance."""
        B, rows = len(tokens), cache.batch_size
        lengths = [cache.row_length(b) for b in range(rows)]
        if max(lengths[:B]) >= cache.max_length:
            raise ContextOverflowError(
                f"the sequence reached {max(lengths[:B]) + 1} tokens but the cache holds {cache.max_length}; "
                "generate fewer tokens or shorten the prompt"
            )
        device = cache.keys.device
        ids = torch.zeros(rows, 1, dtype=torch.long)
        ids[:B, 0] = torch.tensor(list(tokens), dtype=torch.long)
        positions = torch.tensor([min(n, cache.max_length - 1) for n in lengths], dtype=torch.long)[:, None]  # (rows, 1)
        logits = self._compiled(ids.to(device), positions.to(device), cache.keys, cache.values)
        for b in range(B):
            cache.set_length(b, lengths[b] + 1)
        return logits[:B]


_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledStep]" = weakref.WeakKeyDictionary()


def compiled_step_for(model) -> CompiledStep:
    """The model's compiled step, made once and kept while the model lives."""
    step = _STEPS.get(model)
    if step is None:
        step = _STEPS[model] = CompiledStep(model)
    return step


def static_cache_length(needed: int, context: int) -> int:
    """A cache length for a compiled step: the next power of two (at least 64) that holds
    `needed` positions, within the context; each distinct length is one more graph."""
    length = 64
    while length < needed:
        length *= 2
    return min(length, context)
