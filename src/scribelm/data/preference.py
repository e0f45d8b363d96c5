"""Preference pairs for DPO: a prompt, a chosen reply and a rejected one.

One JSON object per line:

    {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "chosen": "...", "rejected": "..."}

The prompt is a user message (a string) or a whole conversation; each reply
is the assistant's next turn. Both continuations are rendered with the chat
template and tokenized like supervised data, with targets only on the final
assistant turn, so the sum of target log-probabilities is log π(reply | prompt).
A batch stacks the chosen rows over the rejected rows, one forward pass for both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from scribelm.data.chat import (
    IGNORE_INDEX,
    DatasetError,
    Example,
    _check_overflow,
    _epoch_order,
    _rank_and_world,
    _split,
    _warn_overflow,
    check_messages,
    make_example,
    read_jsonl,
    tokenize_conversation,
)
from scribelm.errors import TokenizerError


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    line: int = 0
    # log π_ref(chosen | prompt), log π_ref(rejected | prompt), once computed
    reference_logps: tuple[float, float] | None = None


def record_to_pair(record: Any, where: str = "record", tokenizer=None) -> tuple[list[dict[str, str]], str, str]:
    """A preference record -> (prompt messages, chosen text, rejected text), validated."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DatasetError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected' "
                           f"(missing {', '.join(missing)})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise DatasetError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages")
    replies = []
    for key in ("chosen", "rejected"):
        value = record[key]
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            value = value["content"]  # {"role": "assistant", "content": ...}
        if not isinstance(value, str):
            raise DatasetError(f"{where}: '{key}' must be a string (the assistant's reply)")
        if not value.strip():
            raise DatasetError(f"{where}: '{key}' is an empty assistant turn; fill in the reply or drop the record")
        replies.append(value)
    check_messages(messages + [{"role": "assistant", "content": replies[0]}], where, tokenizer)
    return messages, replies[0], replies[1]


@dataclass
class PreferenceDataset:
    pairs: list[PreferencePair]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def examples(self) -> list[PreferencePair]:  # the name the shared split helper uses
        return self.pairs

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, tokenizer, *, max_length: int,
                   overflow: str = "truncate") -> "PreferenceDataset":
        records = read_jsonl(path, validate=lambda record, where: (record_to_pair(record, where, tokenizer), record)[1])
        return cls.from_records([r for _, r in records], tokenizer, max_length=max_length, overflow=overflow,
                                lines=[n for n, _ in records], source=str(path))

    @classmethod
    def from_records(cls, records: Sequence[Any], tokenizer, *, max_length: int, overflow: str = "truncate",
                     lines: Sequence[int] | None = None, source: str = "record") -> "PreferenceDataset":
        _check_overflow(overflow)
        lines = list(lines) if lines is not None else list(range(1, len(records) + 1))
        pairs, stats = [], {"records": len(records), "examples": 0, "truncated": 0, "skipped": 0}
        for line, record in zip(lines, records):
            where = f"{source}:{line}" if source != "record" else f"record {line}"
            prompt, chosen, rejected = record_to_pair(record, where, tokenizer)
            made = []
            for reply in (chosen, rejected):
                try:
                    ids, trainable = tokenize_conversation(
                        tokenizer, prompt + [{"role": "assistant", "content": reply}], train_on="last")
                except TokenizerError as err:
                    raise DatasetError(f"{where}: {err}") from None
                made.append(make_example(ids, trainable, max_length, overflow, line, where))
            outcomes = {outcome for _, outcome in made}
            if "skipped" in outcomes:
                stats["skipped"] += 1
                continue
            if "truncated" in outcomes:
                stats["truncated"] += 1
            stats["examples"] += 1
            pairs.append(PreferencePair(made[0][0], made[1][0], line))
        _warn_overflow(stats, max_length)
        if not pairs:
            raise DatasetError(f"{source}: no usable preference pairs (all {stats['skipped']} were skipped); "
                               "raise max_length or shorten the prompts")
        return cls(pairs, stats)

    def split(self, val_fraction: float, seed: int = 0) -> tuple["PreferenceDataset", "PreferenceDataset"]:
        return _split(self, val_fraction, seed)


def collate_pairs(pairs: Sequence[PreferencePair], *, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pairs -> ids (2B, T) and targets (2B, T): rows 0..B-1 chosen, B..2B-1 rejected
    (right-padded, so causal attention never reaches padding); reference_logps (2B,)
    when every pair has them."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(e) for e in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(rows):
        ids[r, : len(e)] = torch.tensor(e.ids)
        targets[r, : len(e)] = torch.tensor(e.targets)
    batch = {"ids": ids, "targets": targets}
    if all(p.reference_logps is not None for p in pairs):
        batch["reference_logps"] = torch.tensor([p.reference_logps[0] for p in pairs] +
                                                [p.reference_logps[1] for p in pairs], dtype=torch.float32)
    return batch


class PreferenceLoader:
    """Batches of preference pairs, shuffled per epoch with (seed, epoch), resumable."""

    def __init__(self, dataset: PreferenceDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 pad_id: int = 0, epochs: int | None = 1, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.shuffle, self.seed, self.pad_id = dataset, batch_size, shuffle, seed, pad_id
        self.epochs = epochs
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.sequence_length = max(max(len(p.chosen), len(p.rejected)) for p in dataset.pairs)
        self.epoch, self.batch_index = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (on this process)."""
        return math.ceil(len(self.dataset) // self.world_size / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of this epoch, then further epochs up to `epochs` (None: without end)."""
        while self.epochs is None or self.epoch < self.epochs:
            order = _epoch_order(len(self.dataset), self.shuffle, self.seed, self.epoch, self.rank, self.world_size)
            while self.batch_index < len(self):
                chosen = order[self.batch_index * self.batch_size: (self.batch_index + 1) * self.batch_size]
                self.batch_index += 1
                yield collate_pairs([self.dataset.pairs[i] for i in chosen], pad_id=self.pad_id)
            self.epoch, self.batch_index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_index, self.seed = int(state["epoch"]), int(state["batch_index"]), int(state["seed"])
