"""The key/value cache: what attention remembers between decoding steps.

Generating token t+1 needs the keys and values of every earlier token. A
model without a cache recomputes them all at every step (quadratic work);
with one, each step computes keys and values for the new token only and
reads the old ones back.

The cache is preallocated once for the longest sequence the generation may
reach and written by position, as in gpt-fast: no tensor grows, nothing is
concatenated. It stores only the key/value heads (`n_kv_heads`), so
grouped-query models keep a cache `n_heads / n_kv_heads` times smaller.

Layout: keys and values of shape (n_layers, B, n_kv_heads, max_length, head_dim)
and `lengths`, the positions written in each row. Rows may hold sequences
of different lengths (prompts of different lengths, or a server's requests
that joined at different times): a forward pass over rows 0..B-1 then
writes row b's new keys at its own position `lengths[b]`, counts its
positions from there, and masks the keys beyond them, so every row computes
exactly what it would alone. When all rows share one length (the common
case) the step writes one slice and needs no mask.

Slot operations serve a batch whose members come and go: `rows(first, n)` is
a cache over some rows (prefill new prompts in place), `set_length`,
`copy_row` (several choices of one prompt; filling a freed row) and
`reorder` (beam search).

The model speaks to the cache through three calls per forward pass:
`prepare(rows, steps)` (where the new positions go), `update(layer, k, v)`
(write, and read back everything written) and `advance(steps)`.
"""

from __future__ import annotations

import torch

from scribelm.config import ModelConfig
from scribelm.errors import ScribeError


class ContextOverflowError(ScribeError):
    """More tokens than the cache (or the model's context) can hold."""


class _RowLengths:
    """What both caches keep the same way: (L, B, n_kv, S, hd) `keys`/`values` and, per row,
    the positions written (`_lengths`, host-side), advanced after each forward pass over the
    first `_rows` rows."""

    keys: torch.Tensor
    values: torch.Tensor
    _lengths: list[int]
    _rows: int

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) positions written in each row."""
        return torch.tensor(self._lengths, dtype=torch.long)

    @property
    def length(self) -> int:
        """Positions written in the longest row."""
        return max(self._lengths)

    def row_length(self, row: int) -> int:
        return self._lengths[row]

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def advance(self, steps: int) -> None:
        for row in range(self._rows):
            self._lengths[row] += steps

    def reset(self) -> None:
        self._lengths = [0] * self.batch_size

    def set_length(self, row: int, length: int) -> None:
        """Say that row `row` holds `length` positions (after a padded prefill, or to free it: 0)."""
        self._lengths[row] = int(length)


class KVCache(_RowLengths):
    accepts_padding = True  # right-padded prompts in one pass: padded keys sit past each row's length

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

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor) -> "KVCache":
        """An empty cache whose storage is the given (L, B, n_kv, S_max, hd) tensors, for
        instance views of some rows of a larger cache, which the model then fills in place."""
        cache = cls.__new__(cls)
        cache._set_storage(keys, values)
        return cache

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (L, B, n_kv, S_max, hd)
        self.max_length = keys.shape[3]
        # One view per layer, made once: a decode step then writes by position with no indexing.
        self._layers = [(keys[i], values[i]) for i in range(keys.shape[0])]  # (B, n_kv, S_max, hd) each
        # Host-side bookkeeping (a list, not a tensor): deciding a step's shape never waits for the device.
        self._lengths = [0] * keys.shape[1]
        self._rows = keys.shape[1]  # rows of the forward pass in progress
        self._end = 0  # positions it reads: the longest row's, new ones included
        self._start: int | None = 0  # its common start position, or None when rows differ
        self._write: torch.Tensor | None = None  # (B, T) write positions when rows differ
        self.row_mask: torch.Tensor | None = None  # (B, 1, T, S) the keys each query sees, when rows differ

    # -- the model's side ---------------------------------------------------------------
    def prepare(self, rows: int, steps: int) -> tuple[int | None, torch.Tensor | None, torch.Tensor | None]:
        """Get ready to write `steps` new positions in rows 0..rows-1.

        Returns (start, None, None) when the rows share one length `start`; otherwise
        (None, positions (B, T), mask (B, 1, T, S)): each row's new positions and the
        keys each query may see (its own row's, up to itself)."""
        if rows > self.batch_size:
            raise ScribeError(f"a batch of {rows} rows does not fit a cache of {self.batch_size}")
        lengths = self._lengths[:rows]
        longest = max(lengths)
        if longest + steps > self.max_length:
            raise ContextOverflowError(
                f"the sequence reached {longest + steps} tokens but the cache holds {self.max_length}; "
                "generate fewer tokens or shorten the prompt"
            )
        self._rows, self._end = rows, longest + steps
        if min(lengths) == longest:
            self._start, self._write, self.row_mask = longest, None, None
            return longest, None, None
        device = self.keys.device
        self._start = None
        self._write = torch.tensor(lengths, device=device)[:, None] + torch.arange(steps, device=device)  # (B, T)
        keys_seen = torch.arange(longest + steps, device=device)  # (S,)
        mask = keys_seen[None, None, :] <= self._write[:, :, None]  # (B, T, S)
        self.row_mask = mask[:, None]  # kept: a fast layer recognises it (scribelm.accel.native_stack)
        return None, self._write, self.row_mask

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B, n_kv, T, hd) at each row's position;
        return all keys/values written so far, (B, n_kv, S, hd), S = longest row + T."""
        layer_keys, layer_values = self._layers[layer]
        B, steps = keys.shape[0], keys.shape[2]
        if B != layer_keys.shape[0]:
            layer_keys, layer_values = layer_keys[:B], layer_values[:B]
        if self._start is not None:
            start, end = self._start, self._start + steps
            layer_keys.narrow(2, start, steps).copy_(keys)
            layer_values.narrow(2, start, steps).copy_(values)
            return layer_keys.narrow(2, 0, end), layer_values.narrow(2, 0, end)
        rows = torch.arange(B, device=keys.device)[:, None]  # (B, 1)
        layer_keys[rows, :, self._write] = keys.transpose(1, 2)  # (B, T, n_kv, hd) at (row, position)
        layer_values[rows, :, self._write] = values.transpose(1, 2)
        return layer_keys[:, :, : self._end], layer_values[:, :, : self._end]

    # -- slot operations ----------------------------------------------------------------
    def rows(self, first: int, count: int = 1) -> "KVCache":
        """An empty cache over rows first..first+count-1 of this one's storage, for prefilling
        prompts in place; then `set_length` each row here."""
        return KVCache.over(self.keys[:, first : first + count], self.values[:, first : first + count])

    def copy_row(self, source: int, target: int) -> None:
        n = self._lengths[source]
        self.keys[:, target, :, :n] = self.keys[:, source, :, :n]
        self.values[:, target, :, :n] = self.values[:, source, :, :n]
        self._lengths[target] = n

    def reorder(self, sources: torch.Tensor) -> None:
        """Row b takes the contents of row sources[b] (beam search: each beam continues one)."""
        n = self.length
        self.keys[:, :, :, :n] = self.keys[:, sources, :, :n]
        self.values[:, :, :, :n] = self.values[:, sources, :, :n]
        self._lengths = [self._lengths[int(s)] for s in sources.tolist()]


class RollingKVCache(_RowLengths):
    """The cache of a sliding-window model: keys and values of the last `window` positions only.

    With sliding-window attention (Mistral v0.1) a query at position p sees keys p-W+1..p,
    so nothing older is ever read again: position p is stored in slot p mod W, overwriting
    p-W, and the cache stays W positions long however long the sequence grows. Memory is
    bounded by W, not by the sequence.

    One new token (decoding) is written into its slot first and attends the whole buffer,
    in slot order (attention does not care about the order of keys; RoPE was applied before
    caching). Several new tokens (a prompt, a chunk of one) attend the held positions in
    order followed by their own, and the last W of those are then kept. `key_positions`
    says which position each returned key holds, from which the model builds the mask.

    Rows may hold different lengths, as in `KVCache`, for decoding one token per row: row
    b's token goes into its own slot `lengths[b] mod W` at position `lengths[b]`, and a
    (B, 1, 1, S) mask hides the slots it has not written yet. Several new tokens need rows
    of one length and no padding: padding written after a short prompt would overwrite
    slots of that prompt's last W positions, so such prompts go in one row at a time
    (`accepts_padding` is False; `decode.prefill` does this).

    `max_length` is the most positions a row may reach (the room checks of the decode core),
    not the storage: that is min(window, max_length) slots.
    Layout: (n_layers, B, n_kv_heads, slots, head_dim) keys and values.
    """

    accepts_padding = False  # see above: prompts of different lengths are prefilled row by row

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if config.sliding_window is None:
            raise ScribeError("a rolling cache is for sliding-window models; this config has no sliding_window")
        max_length = config.context_length if max_length is None else max_length
        if max_length > config.context_length:
            raise ContextOverflowError(
                f"a cache of {max_length} positions exceeds the model's context of {config.context_length}"
            )
        shape = (config.n_layers, batch_size, config.n_kv_heads, min(config.sliding_window, max_length),
                 config.head_dim)
        self._set_storage(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                          config.sliding_window, max_length)

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, window: int, max_length: int) -> "RollingKVCache":
        """An empty cache whose storage is the given (L, B, n_kv, slots, hd) tensors (views of
        some rows of a larger one, filled in place)."""
        cache = cls.__new__(cls)
        cache._set_storage(keys, values, window, max_length)
        return cache

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor, window: int, max_length: int) -> None:
        self.keys, self.values = keys, values  # (L, B, n_kv, slots, hd)
        self.window, self.max_length = window, max_length
        self.context_length = max_length
        self._lengths = [0] * keys.shape[1]  # positions seen per row; a row holds its last min(length, W)
        self._rows = keys.shape[1]
        self._start: int | None = 0  # the common length of the rows in the pass, or None when they differ
        self._slots: torch.Tensor | None = None  # (B,) each row's write slot when they differ

    # -- the model's side ---------------------------------------------------------------
    def prepare(self, rows: int, steps: int) -> tuple[int | None, torch.Tensor | None, torch.Tensor | None]:
        """(start, None, None) when rows 0..rows-1 share one length; else, for one new token
        per row, (None, positions (B, 1), mask (B, 1, 1, S)): each row's position and the
        slots it has written (S = the slots returned by `update`)."""
        if rows > self.batch_size:
            raise ScribeError(f"a batch of {rows} rows does not fit a cache of {self.batch_size}")
        lengths = self._lengths[:rows]
        longest = max(lengths)
        if longest + steps > self.max_length:
            raise ContextOverflowError(f"the sequence reached {longest + steps} tokens but the cache holds "
                                       f"{self.max_length} positions; generate fewer tokens or shorten the prompt")
        self._rows = rows
        if min(lengths) == longest:
            self._start, self._slots = longest, None
            return longest, None, None
        if steps != 1:
            raise ScribeError("a rolling cache takes several new tokens only in rows of one length; "
                              "prefill prompts of different lengths one row at a time")
        device = self.keys.device
        self._start = None
        positions = torch.tensor(lengths, device=device)  # (B,) each row's new position
        W = self.window
        self._slots = positions % W
        held = min(longest + 1, self.keys.shape[3])
        slots = torch.arange(held, device=device)  # (S,)
        # slot s of row b holds the latest position <= the row's new one that is ≡ s (mod W); < 0: never written
        key_positions = positions[:, None] - (positions[:, None] - slots[None, :]) % W  # (B, S)
        return None, positions[:, None], (key_positions >= 0)[:, None, None, :]

    def key_positions(self, steps: int, device: torch.device | None = None) -> torch.Tensor:
        """(S,) the position of each key `update` returns for `steps` new tokens, in its order
        (rows of one length)."""
        length = self._start
        held = min(length, self.window)
        if steps == 1:
            newest = length  # the new token's position; slot s holds the latest position ≡ s (mod W)
            slots = torch.arange(min(length + 1, self.window), device=device)
            return slots + (newest - slots) // self.window * self.window
        return torch.arange(length - held, length + steps, device=device)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep this step's keys/values (B, n_kv, T, hd); return the keys/values to attend, (B, n_kv, S, hd)."""
        B, steps = keys.shape[0], keys.shape[2]
        layer_keys, layer_values = self.keys[layer, :B], self.values[layer, :B]  # (B, n_kv, slots, hd)
        W = self.window
        if self._start is None:  # rows differ; one token each, at its own slot
            rows = torch.arange(B, device=keys.device)
            layer_keys[rows, :, self._slots] = keys[:, :, 0]
            layer_values[rows, :, self._slots] = values[:, :, 0]
            n = min(max(self._lengths[:B]) + 1, layer_keys.shape[2])
            return layer_keys[:, :, :n], layer_values[:, :, :n]
        length = self._start
        if steps == 1:
            slot = length % W
            layer_keys[:, :, slot] = keys[:, :, 0]
            layer_values[:, :, slot] = values[:, :, 0]
            n = min(length + 1, W)
            return layer_keys[:, :, :n], layer_values[:, :, :n]
        held = min(length, W)
        order = (torch.arange(length - held, length, device=keys.device)) % W  # held slots, oldest first
        all_keys = torch.cat((layer_keys[:, :, order], keys), dim=2)  # (B, n_kv, held + T, hd)
        all_values = torch.cat((layer_values[:, :, order], values), dim=2)
        kept = min(held + steps, layer_keys.shape[2])
        slots = torch.arange(length + steps - kept, length + steps, device=keys.device) % W
        layer_keys[:, :, slots] = all_keys[:, :, -kept:]
        layer_values[:, :, slots] = all_values[:, :, -kept:]
        return all_keys, all_values

    # -- slot operations (as KVCache's) ---------------------------------------------------
    def rows(self, first: int, count: int = 1) -> "RollingKVCache":
        return RollingKVCache.over(self.keys[:, first : first + count], self.values[:, first : first + count],
                                   self.window, self.max_length)

    def copy_row(self, source: int, target: int) -> None:
        self.keys[:, target] = self.keys[:, source]
        self.values[:, target] = self.values[:, source]
        self._lengths[target] = self._lengths[source]

    def reorder(self, sources: torch.Tensor) -> None:
        """Row b takes the contents of row sources[b] (beam search)."""
        self.keys.copy_(self.keys[:, sources])
        self.values.copy_(self.values[:, sources])
        self._lengths = [self._lengths[int(s)] for s in sources.tolist()]


def new_cache(config: ModelConfig, batch_size: int, max_length: int | None = None, *,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              rolling: bool = True) -> "KVCache | RollingKVCache":
    """The cache generation should use: a `RollingKVCache` of W slots for a sliding-window
    model whose window is shorter than the sequences (and `rolling`), else a `KVCache`."""
    length = config.context_length if max_length is None else max_length
    if rolling and config.sliding_window is not None and config.sliding_window < length:
        return RollingKVCache(config, batch_size, max_length, device=device, dtype=dtype)
    return KVCache(config, batch_size, max_length, device=device, dtype=dtype)


class PastKeyValues:
    """The cache as values rather than state, for export graphs (ONNX), where writing into
    a preallocated tensor does not trace: past keys/values come in as tensors
    (n_layers, B, n_kv_heads, P, head_dim), every row P positions long, and each layer's
    keys/values with the new positions appended are collected in `presents`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # (L, B, n_kv, P, hd)
        self.present_keys: list[torch.Tensor] = []
        self.present_values: list[torch.Tensor] = []

    def prepare(self, rows: int, steps: int) -> tuple[None, torch.Tensor, torch.Tensor]:
        past = self.keys.shape[3]
        new = torch.arange(steps, device=self.keys.device) + past  # (T,)
        seen = torch.arange(past + steps, device=self.keys.device)  # (S,)
        mask = seen[None, :] <= new[:, None]  # (T, S): causal over past and new
        return None, new.expand(rows, steps), mask[None, None]  # positions (B, T), mask (1, 1, T, S)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat((self.keys[layer], keys), dim=2)  # (B, n_kv, P + T, hd)
        values = torch.cat((self.values[layer], values), dim=2)
        self.present_keys.append(keys)
        self.present_values.append(values)
        return keys, values

    def advance(self, steps: int) -> None:
        pass  # nothing is kept: the caller passes the presents back in as the next past

    def presents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_layers, B, n_kv_heads, P + T, head_dim) keys and values."""
        return torch.stack(self.present_keys), torch.stack(self.present_values)
