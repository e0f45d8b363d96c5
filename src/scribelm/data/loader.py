"""Token shards to training batches, with a position that can be saved.

The split's shards are one long stream of token ids. It is cut into windows
of T + 1 tokens (stride T); a window gives the input ids (its first T) and
the targets (its last T, the same ids shifted by one):

    stream   … 17 9 4 88 3 51 …
    ids          9 4 88 3            (B, T)
    targets      4 88 3 51           (B, T)

Training visits every window once per epoch, in an order shuffled by
(seed, epoch), starting the cut at an offset drawn per epoch so a small
corpus does not show the model the same windows epoch after epoch. A batch
is B consecutive windows of that order per process; under torchrun, rank r
takes windows [r·B, (r+1)·B) of each global batch of world_size·B, so N
processes with B each see exactly what one process with N·B sees.

The loader's position is (epoch, batch in epoch): `state_dict()` and
`load_state_dict()` are all the Trainer needs to resume exactly where it
stopped. Validation loaders (`shuffle=False, loop=False`) read every window
in order, once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from scribelm.data.prepare import DataError, read_manifest, read_split


class TokenStream:
    """The shards of one split as one indexable sequence of ids, memory-mapped."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])  # start of each shard

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """ids[start : start + length] as int64, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - int(self.offsets[shard])
            piece = self.arrays[shard][local: local + length - filled]
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out


class TokenBatchLoader:
    """Batches of `{"ids": (B, T), "targets": (B, T)}` from a prepared data directory."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        sequence_length: int,
        *,
        shuffle: bool = True,
        loop: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or sequence_length < 1:
            raise DataError(f"batch_size and sequence_length must be positive, got {batch_size} and {sequence_length}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.data_dir)
        self.vocab_size = int(self.manifest["vocab_size"])
        self.stream = TokenStream(read_split(self.data_dir, split))
        n = len(self.stream)
        if not shuffle and not loop and n > 1:
            sequence_length = min(sequence_length, n - 1)  # a small validation split still gets evaluated
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.shuffle, self.loop, self.seed = shuffle, loop, seed
        self.rank, self.world_size = rank, world_size
        if n < sequence_length + 1:
            raise DataError(
                f"the {split} split of {self.data_dir} has {n} tokens, fewer than one window of "
                f"sequence_length + 1 = {sequence_length + 1}; use a shorter sequence_length or more text"
            )
        self.windows = (n - 1) // sequence_length
        global_batch = batch_size * world_size
        if loop and self.windows // global_batch == 0:
            raise DataError(
                f"the {split} split of {self.data_dir} holds {self.windows} windows of {sequence_length} tokens, "
                f"fewer than one global batch of {global_batch}; lower batch_size or sequence_length"
            )
        self.epoch = 0
        self.batch_index = 0  # global batches already taken in this epoch

    # -- position -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "batch_size": self.batch_size * self.world_size, "sequence_length": self.sequence_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sequence_length") != self.sequence_length or state.get("batch_size") != self.batch_size * self.world_size:
            raise DataError(
                f"the checkpoint's data position is for global batch {state.get('batch_size')} × sequence "
                f"{state.get('sequence_length')}, this run uses {self.batch_size * self.world_size} × "
                f"{self.sequence_length}; resume with the same batch settings"
            )
        self.epoch, self.batch_index, self.seed = int(state["epoch"]), int(state["batch_index"]), int(state["seed"])

    # -- batches --------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.loop:
            return self.windows // global_batch
        return -(-self.windows // global_batch)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, int]:
        """Window order and the offset where this epoch's cut starts."""
        if not self.shuffle:
            return np.arange(self.windows), 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        spare = len(self.stream) - 1 - self.windows * self.sequence_length  # tokens left over by the cut
        offset = int(torch.randint(0, spare + 1, (1,), generator=generator)) if spare > 0 else 0
        order = torch.randperm(self.windows, generator=generator).numpy()
        return order, offset

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.loop:  # evaluation: always from the start
            self.epoch, self.batch_index = 0, 0
        T = self.sequence_length
        while True:
            order, offset = self._epoch_plan(self.epoch)
            global_batch = self.batch_size * self.world_size
            while self.batch_index < self.batches_per_epoch:
                first = self.batch_index * global_batch + self.rank * self.batch_size
                chosen = order[first: first + self.batch_size]
                self.batch_index += 1
                if len(chosen) == 0:
                    continue  # the last, short validation batch had nothing left for this rank
                rows = np.stack([self.stream.read(offset + int(w) * T, T + 1) for w in chosen])  # (B, T+1)
                window = torch.from_numpy(rows)
                yield {"ids": window[:, :-1], "targets": window[:, 1:]}
            if not self.loop:
                return
            self.epoch += 1
            self.batch_index = 0
