"""Chat and instruction data for supervised fine-tuning, with assistant-only loss masks.

A fine-tuning example is a conversation. Two JSONL shapes are read, one
record per line:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"instruction": "...", "input": "...", "output": "..."}          # Alpaca-style; "input" may be empty

An instruction record becomes the conversation user = instruction (+ input),
assistant = output. Every conversation is rendered with the model's own chat
template, so training sees exactly the text `tokenizer.encode_chat` gives
the model at generation time.

The model should learn to write the assistant's turns, not to predict the
user's, so only assistant tokens carry a target; every other position gets
IGNORE_INDEX (-100), which cross-entropy skips:

    text     <|user|>add 2 3<|end|>\\n<|assistant|>5<|end|>\\n
    target    -100 ...               -100           5  <|end|> \\n

Where an assistant turn sits in the rendered text is found from the template
itself: rendering the conversation up to the turn (with the generation
prompt) and through it gives the turn's character span, and tokens whose
characters overlap that span are trained on. The ids are those of
`tokenizer.encode_chat`, so special-token strings inside messages are plain
text here too.

Short examples waste most of a context window, so they are packed: several
examples share one row, each with positions restarting at 0 and an attention
mask that is block-diagonal (and causal), so no token ever sees another
example. The whole file is read, validated and tokenized before training;
the first malformed line is reported with its line number.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scribelm.errors import ScribeError, TokenizerError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
OVERFLOW_POLICIES = ("truncate", "skip", "error")


class DatasetError(ScribeError, ValueError):
    """A data file (or record) that cannot be used for fine-tuning."""


# --------------------------------------------------------------------------- reading records


def read_jsonl(path: str | os.PathLike, validate=None) -> list[tuple[int, Any]]:
    """All records of a JSONL file as (line number, record); blank lines are skipped.

    `validate(record, where)` checks (and may convert) each record as it is read,
    so the first bad line is the one reported, whatever is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    records = []
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                                   "each line must hold one JSON object") from None
            records.append((lineno, validate(record, f"{path}:{lineno}") if validate else record))
    if not records:
        raise DatasetError(f"{path} holds no records; write one JSON object per line")
    return records


def record_to_messages(record: Any, where: str = "record", tokenizer=None) -> list[dict[str, str]]:
    """A chat or instruction record -> a validated list of {role, content} messages."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DatasetError(f"{where}: message {i} must be an object with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
    elif "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DatasetError(f"{where}: an instruction record needs a string '{key}'")
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise DatasetError(f"{where}: 'input' must be a string (or absent)")
        prompt = record["instruction"] + ("\n\n" + extra if extra.strip() else "")
        out = []
        if isinstance(record.get("system"), str) and record["system"]:
            out.append({"role": "system", "content": record["system"]})
        out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise DatasetError(
            f"{where}: unknown record shape (keys: {', '.join(sorted(record)) or 'none'}); "
            "expected {\"messages\": [...]} or {\"instruction\", \"input\", \"output\"}"
        )
    check_messages(out, where, tokenizer)
    return out


def check_messages(messages: Sequence[dict[str, str]], where: str = "record", tokenizer=None) -> None:
    """Refuse conversations the trainer cannot learn from: empty or missing assistant turns, and
    roles the chat template does not know (it is rendered once to find out; without a tokenizer,
    the roles of the default template are the known ones)."""
    for i, m in enumerate(messages):
        if tokenizer is None and m["role"] not in ROLES:
            raise DatasetError(f"{where}: message {i} has role {m['role']!r}; the chat template knows "
                               f"{', '.join(ROLES)}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DatasetError(f"{where}: message {i} is an empty assistant turn; remove the record or fill in the reply")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: no assistant turn, so there is nothing to learn; add the reply")
    if tokenizer is not None:
        try:
            _render(tokenizer, messages, add_generation_prompt=False)
        except TokenizerError as err:
            raise DatasetError(f"{where}: {err}") from None


# --------------------------------------------------------------------------- tokenizing with a loss mask


def _render(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool):
    """The conversation as `tokenizer.encode_chat` renders it (an empty list: only what the
    template writes before the first message, e.g. the generation prompt)."""
    return tokenizer.render_chat(list(messages), add_generation_prompt=add_generation_prompt)


def tokenize_conversation(
    tokenizer, messages: Sequence[dict[str, str]], *, train_on: str = "all"
) -> tuple[list[int], list[bool]]:
    """Render and tokenize a conversation; returns (ids, trainable) where trainable[j]
    says whether token j belongs to an assistant turn that is learned.

    train_on: "all" assistant turns, or only the "last" one (preference data).
    """
    if not tokenizer.chat_template:
        raise TokenizerError("this tokenizer has no chat template; fine-tuning on chat data needs one "
                             "(set chat_template in tokenizer_config.json)")
    rendered = _render(tokenizer, messages, add_generation_prompt=False)
    full = rendered.text
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True).text
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False).text
        if not (through.startswith(before) and full.startswith(through)):
            raise DatasetError(
                "the chat template renders a conversation differently from its prefixes, so assistant turns "
                "cannot be located; use a template where each turn is appended to the text before it"
            )
        spans.append((len(before), len(through)))
    # The same ids as encode_chat: the template's markup as control tokens, message text as plain text.
    ids, offsets = tokenizer.encode_rendered(rendered)
    trainable = [any(start < hi and end > lo for lo, hi in spans) for start, end in offsets]
    return ids, trainable


@dataclass
class Example:
    """One tokenized conversation, already shifted for next-token prediction:
    targets[t] is the token that should follow ids[t], or IGNORE_INDEX."""

    ids: list[int]
    targets: list[int]
    line: int = 0  # where it came from, for messages

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def make_example(ids: list[int], trainable: list[bool], max_length: int, overflow: str, line: int = 0,
                 where: str = "record") -> tuple[Example | None, str]:
    """Shift (ids, trainable) into an Example of at most `max_length` positions.

    Returns (example or None, outcome) with outcome "ok", "truncated" or "skipped".
    """
    outcome = "ok"
    if len(ids) - 1 > max_length:
        if overflow == "error":
            raise DatasetError(f"{where}: {len(ids) - 1} tokens do not fit the context of {max_length}; "
                               "shorten it, or pass overflow='truncate' or 'skip'")
        if overflow == "skip":
            return None, "skipped"
        ids, trainable = ids[: max_length + 1], trainable[: max_length + 1]
        outcome = "truncated"
    targets = [ids[j + 1] if trainable[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)]
    if all(t == IGNORE_INDEX for t in targets):
        return None, "skipped"  # nothing left to learn (the reply was cut off entirely)
    return Example(ids=ids[:-1], targets=targets, line=line), outcome


@dataclass
class ChatDataset:
    """Tokenized fine-tuning examples plus counts of what happened while reading them."""

    examples: list[Example]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, tokenizer, *, max_length: int, overflow: str = "truncate",
                   train_on: str = "all") -> "ChatDataset":
        """Read, validate and tokenize a chat or instruction JSONL file.

        Conversations longer than `max_length` tokens are truncated (or skipped, or
        refused: `overflow`), and counted in `stats`; a warning says how many.
        """
        records = read_jsonl(path, validate=lambda record, where: (record_to_messages(record, where, tokenizer), record)[1])
        return cls.from_records([r for _, r in records], tokenizer, max_length=max_length, overflow=overflow,
                                train_on=train_on, lines=[n for n, _ in records], source=str(path))

    @classmethod
    def from_records(cls, records: Sequence[Any], tokenizer, *, max_length: int, overflow: str = "truncate",
                     train_on: str = "all", lines: Sequence[int] | None = None, source: str = "record") -> "ChatDataset":
        _check_overflow(overflow)
        if max_length < 2:
            raise DatasetError(f"max_length must be at least 2, got {max_length}")
        lines = list(lines) if lines is not None else list(range(1, len(records) + 1))
        examples, stats = [], {"records": len(records), "examples": 0, "truncated": 0, "skipped": 0,
                               "tokens": 0, "target_tokens": 0}
        for line, record in zip(lines, records):
            where = f"{source}:{line}" if source != "record" else f"record {line}"
            messages = record_to_messages(record, where, tokenizer)
            try:
                ids, trainable = tokenize_conversation(tokenizer, messages, train_on=train_on)
            except TokenizerError as err:
                raise DatasetError(f"{where}: {err}") from None
            example, outcome = make_example(ids, trainable, max_length, overflow, line, where)
            if outcome != "ok":
                stats[outcome] += 1
            if example is not None:
                stats["examples"] += 1
                examples.append(example)
                stats["tokens"] += len(example)
                stats["target_tokens"] += example.n_targets
        _warn_overflow(stats, max_length)
        if not examples:
            raise DatasetError(f"{source}: no usable examples (all {stats['skipped']} were skipped); "
                               "raise max_length or shorten the conversations")
        return cls(examples, stats)

    def split(self, val_fraction: float, seed: int = 0) -> tuple["ChatDataset", "ChatDataset"]:
        """A held-out split: (train, validation), at least one example each."""
        return _split(self, val_fraction, seed)


def _check_overflow(overflow: str) -> None:
    if overflow not in OVERFLOW_POLICIES:
        raise DatasetError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")


def _warn_overflow(stats: dict[str, int], max_length: int) -> None:
    if stats["truncated"] or stats["skipped"]:
        warnings.warn(
            f"{stats['truncated']} example(s) truncated and {stats['skipped']} skipped: longer than the "
            f"context of {max_length} tokens", stacklevel=3,
        )


def _split(dataset, val_fraction: float, seed: int):
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    n = len(dataset.examples)
    if n < 2:
        raise DatasetError(f"{n} example(s) cannot be split into training and validation; add data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val = [dataset.examples[i] for i in sorted(order[:n_val])]
    train = [dataset.examples[i] for i in sorted(order[n_val:])]
    return type(dataset)(train, dict(dataset.stats)), type(dataset)(val, dict(dataset.stats))


# --------------------------------------------------------------------------- packing and batching


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's slice of the data under torchrun (RANK / WORLD_SIZE), or (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    return rank, max(world_size, 1)


def _epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Indices for one epoch: shuffled with (seed, epoch), then every world_size-th from rank,
    the same count on every process so they step together."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    per_rank = n // world_size
    if per_rank == 0:
        raise DatasetError(f"{n} rows cannot be shared among {world_size} processes; add data or use fewer processes")
    return order[rank::world_size][:per_rank]


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_length` tokens (first-fit decreasing).

    Longest first, each into the first row with room; rows come back in the
    order they were opened. Typically fills rows to well over 90%.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        if n > max_length:
            raise DatasetError(f"an example of {n} tokens does not fit a row of {max_length}")
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(index)
                room[r] -= n
                break
        else:
            rows.append([index])
            room.append(max_length - n)
    return rows


def collate(examples: Sequence[Sequence[Example]], *, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows of examples -> a batch dict.

    Each row holds one or more examples laid end to end. The batch has
    ids (B, T), targets (B, T) with IGNORE_INDEX on prompts and padding, and,
    where any row holds more than one example, positions (B, T) restarting at
    0 for each example and attention_mask (B, T, T) True where query t may
    see key s (same example; the model adds causality). A row of one example
    needs neither: right padding comes after every real token, so causal
    attention never reaches it.
    """
    B = len(examples)
    T = max(sum(len(e) for e in row) for row in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)  # 0 = padding, k = k-th example of the row
    packed = any(len(row) > 1 for row in examples)
    for b, row in enumerate(examples):
        at = 0
        for k, e in enumerate(row, start=1):
            n = len(e)
            ids[b, at: at + n] = torch.tensor(e.ids)
            targets[b, at: at + n] = torch.tensor(e.targets)
            positions[b, at: at + n] = torch.arange(n)
            segments[b, at: at + n] = k
            at += n
    batch = {"ids": ids, "targets": targets}
    if packed:
        batch["positions"] = positions
        batch["attention_mask"] = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # (B, T, T)
    return batch


class SFTLoader:
    """Batches of a ChatDataset, epoch after epoch, resumable.

    pack=True packs examples into rows of `max_length` tokens (fixed once);
    otherwise each row holds one example. Rows are shuffled each epoch with
    (seed, epoch), so a resumed run sees the same order as an uninterrupted
    one. Iteration runs for `epochs` epochs (None: without end, for a trainer
    that stops after a number of steps) from the current position.
    """

    def __init__(self, dataset: ChatDataset, batch_size: int, *, max_length: int | None = None, pack: bool = True,
                 shuffle: bool = True, seed: int = 0, pad_id: int = 0, epochs: int | None = 1,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.shuffle, self.seed, self.pad_id = dataset, batch_size, shuffle, seed, pad_id
        self.epochs = epochs
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        lengths = [len(e) for e in dataset.examples]
        self.max_length = max_length or max(lengths)
        self.sequence_length = self.max_length  # what the trainer's FLOP estimate reads
        self.rows = pack_examples(lengths, self.max_length) if pack else [[i] for i in range(len(lengths))]
        self.epoch, self.batch_index = 0, 0

    def __len__(self) -> int:
        """Batches per epoch (on this process)."""
        return math.ceil(len(self.rows) // self.world_size / self.batch_size)

    @property
    def fill(self) -> float:
        """Share of row slots that hold real tokens (packing efficiency)."""
        used = sum(len(e) for e in self.dataset.examples)
        return used / (len(self.rows) * self.max_length)

    def _order(self, epoch: int) -> list[int]:
        return _epoch_order(len(self.rows), self.shuffle, self.seed, epoch, self.rank, self.world_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            while self.batch_index < len(self):
                chosen = order[self.batch_index * self.batch_size: (self.batch_index + 1) * self.batch_size]
                self.batch_index += 1
                yield collate([[self.dataset.examples[i] for i in self.rows[r]] for r in chosen], pad_id=self.pad_id)
            self.epoch, self.batch_index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_index, self.seed = int(state["epoch"]), int(state["batch_index"]), int(state["seed"])
