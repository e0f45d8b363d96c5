"""The prefix (prompt) cache: keys/values of recent prompts, reused by prompts that start the same way.

A chat client resends the whole conversation every turn: the same system
prompt and history, and a few new tokens at the end. Prefilling all of it
again is most of the time to first token. The keys and values of a position
depend only on the tokens up to it, so a prompt that starts with tokens seen
before can copy their keys/values and prefill only the rest.

Prompts are cut into blocks of BLOCK tokens and each full block is named by a
hash chained over everything before it (as vLLM's automatic prefix caching):

    block i's key = blake2b(key of block i-1 || token ids of block i)

so equal keys mean equal prefixes, and a lookup walks the chain until the first
block that is not stored. Each stored block holds its keys and values,
(n_layers, n_kv_heads, BLOCK, head_dim) each. The store is bounded by a byte
budget and evicts the least recently used block first; a lookup refreshes the
blocks it uses deepest first, so a chain's ancestors stay more recent than its
descendants and eviction takes the leaves first. At least one prompt token is
always prefilled (its logits start generation).

Only the engine thread touches the cache; nothing here locks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from scribelm.cache import KVCache

__all__ = ["BLOCK", "PrefixCache"]

BLOCK = 16  # tokens per block: small enough to share most of a prefix, large enough to hash cheaply


def block_keys(ids: Sequence[int], block: int = BLOCK) -> list[bytes]:
    """The chained key of every full block of `ids`."""
    keys, previous = [], b""
    for start in range(0, len(ids) - block + 1, block):
        digest = hashlib.blake2b(previous + array("q", ids[start : start + block]).tobytes(), digest_size=16).digest()
        keys.append(digest)
        previous = digest
    return keys


class PrefixCache:
    """Blocks of keys/values by chained prefix hash, at most `budget_bytes` in all, least recently used out first."""

    def __init__(self, budget_bytes: int, block: int = BLOCK) -> None:
        self.budget_bytes, self.block = budget_bytes, block
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.lookups = self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored blocks of the longest cached prefix of `ids` that leaves at least one token to prefill."""
        self.lookups += 1
        found = []
        for key in block_keys(ids[: len(ids) - 1], self.block):
            entry = self._blocks.get(key)
            if entry is None:
                break
            found.append((key, entry))
        for key, _ in reversed(found):  # deepest first: the ancestors end up the most recent
            self._blocks.move_to_end(key)
        if found:
            self.hits += 1
        return [entry for _, entry in found]

    def load(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], cache: KVCache, row: int) -> int:
        """Copy blocks into the start of a cache row; returns the positions now filled."""
        for i, (keys, values) in enumerate(blocks):
            start = i * self.block
            cache.keys[:, row, :, start : start + self.block] = keys
            cache.values[:, row, :, start : start + self.block] = values
        filled = len(blocks) * self.block
        cache.set_length(row, filled)
        return filled

    def store(self, ids: Sequence[int], cache: KVCache, row: int) -> None:
        """Keep the full blocks of a prompt just prefilled into `row` that are not stored yet."""
        if self.budget_bytes <= 0:
            return
        keys = block_keys(ids, self.block)
        new = [(i, k) for i, k in enumerate(keys) if k not in self._blocks]
        for i, key in reversed(new):  # deepest first, as in lookup
            start = i * self.block
            k = cache.keys[:, row, :, start : start + self.block].clone()  # (L, n_kv, BLOCK, hd)
            v = cache.values[:, row, :, start : start + self.block].clone()
            size = (k.numel() * k.element_size()) * 2
            if size > self.budget_bytes:
                return
            self._blocks[key] = (k, v)
            self.nbytes += size
        for i, key in reversed(list(enumerate(keys))):  # the ones already stored are fresh again too
            self._blocks.move_to_end(key)
        while self.nbytes > self.budget_bytes:
            _, (k, v) = self._blocks.popitem(last=False)
            self.nbytes -= (k.numel() * k.element_size()) * 2
            self.evictions += 1
