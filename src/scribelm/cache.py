"""The key/value cache: what attention remembers between decoding steps.

Generating token t+1 needs the keys and values of every earlier token. A
model without a cache recomputes them all at every step (quadratic work);
with one, each step computes keys and values for the new token only and
reads the old ones back.

The cache is preallocated once for the longest sequence the generation may
reach and written by position, as in gpt-fast: no tensor grows, nothing is
concatenated. It stores only the key/value heads (`n_kv_heads`), so
grouped-query models keep a cache `n_heads / n_kv_heads` times smaller.

Layout: keys and values of shape (n_layers, B, n_kv_heads, max_length, head_dim).
`length` counts positions already written; the model advances it after every
forward pass.
"""

from __future__ import annotations

import torch

from scribelm.config import ModelConfig
from scribelm.errors import ScribeError


class ContextOverflowError(ScribeError):
    """More tokens than the cache (or the model's context) can hold."""


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_length = config.context_length if max_length is None else max_length
        if max_length > config.context_length:
            raise ContextOverflowError(
                f"a cache of {max_length} positions exceeds the model's context of {config.context_length}"
            )
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_length, config.head_dim)
        self._set_storage(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        self.length = 0

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor) -> "KVCache":
        """An empty cache whose storage is the given (L, B, n_kv, S_max, hd) tensors, for
        instance views of some rows of a larger cache, which the model then fills in place."""
        cache = cls.__new__(cls)
        cache._set_storage(keys, values)
        cache.length = 0
        return cache

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (L, B, n_kv, S_max, hd)
        self.max_length = keys.shape[3]
        # One view per layer, made once: a decode step then writes by position with no indexing.
        self._layers = [(keys[i], values[i]) for i in range(keys.shape[0])]  # (B, n_kv, S_max, hd) each

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B, n_kv, T, hd) at the current position;
        return all keys/values written so far, (B, n_kv, length + T, hd)."""
        start, steps = self.length, keys.shape[2]
        end = start + steps
        if end > self.max_length:
            raise ContextOverflowError(
                f"the sequence reached {end} tokens but the cache holds {self.max_length}; "
                "generate fewer tokens or shorten the prompt"
            )
        layer_keys, layer_values = self._layers[layer]
        layer_keys.narrow(2, start, steps).copy_(keys)
        layer_values.narrow(2, start, steps).copy_(values)
        return layer_keys.narrow(2, 0, end), layer_values.narrow(2, 0, end)

    def advance(self, steps: int) -> None:
        self.length += steps

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2
