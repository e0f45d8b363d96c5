"""Raw text to token shards: read, clean, dedupe, split, tokenize, write.

    inputs (.txt/.md/..., .jsonl, .parquet, directories of them)
      │ stream documents          text: paragraphs (blank-line separated) or whole files
      │                           jsonl: the "text" field of each line; parquet: the "text" column
      │ normalize                 \\r\\n and \\r -> \\n; strip surrounding whitespace
      │ drop empty + exact duplicates (blake2b of the normalized text; counted)
      │ split                     the same hash decides train or validation: stable under reordering
      │ tokenize + EOS            <|eos|> after every document, so the model learns where texts end
      ▼
    DATA_DIR/
      train_00000.bin ...         flat little-endian uint16 (vocab <= 65536) or uint32 token ids,
      validation_00000.bin        memory-mappable with numpy, no header
      tokenizer.json              the tokenizer the ids belong to
      manifest.json               token and byte counts, bytes per token, sources, tokenizer hash

Nothing is held in memory but one batch of documents and one shard's
buffer, so corpora larger than memory work. Every input file is scanned in
full before any work (a NUL byte or invalid UTF-8 anywhere is refused with
its line number). The output directory is written to a temporary sibling and
swapped into place when complete (`scribelm.io.atomic_directory`): a failure
(a binary file, a bad JSON line, a full disk) leaves an earlier DATA_DIR
untouched, and a directory holding anything scribelm did not write, or one of
the inputs, is never replaced. The same inputs give byte-identical shards.
Reading the inputs (the first four steps) is `scribelm.data.sources`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scribelm.data.sources import DataError, SourceStats, find_input_files, is_validation, iter_clean_documents
from scribelm.io import atomic_directory, read_json_object

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "scribelm-shards"
SPLITS = ("train", "validation")
TEXT_UNITS = ("paragraph", "file")


# ----------------------------------------------------------------------------- output


def check_output_apart(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> None:
    """Refuse an output directory that is an input, lies inside one (a later run would
    read the shards back as text) or contains one (replacing it would delete the input)."""
    out = Path(out_dir).expanduser().resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if source == out:
            raise DataError(f"the output {out_dir} is also an input; write the shards to another directory with -o")
        if source.is_dir() and source in out.parents:
            raise DataError(f"the output {out_dir} lies inside the input directory {item}; "
                            "write the shards outside the corpus with -o")
        if out in source.parents:
            raise DataError(f"the output {out_dir} contains the input {item}, and writing it would replace "
                            "that input; write the shards to another directory with -o")


def train_tokenizer_on(inputs: Sequence[str | os.PathLike], vocab_size: int, *, val_fraction: float = 0.01,
                       text_field: str = "text", text_unit: str = "paragraph", min_frequency: int = 2):
    """A byte-level BPE trained on the training split only, so validation text stays unseen."""
    from scribelm.tokenizer import Tokenizer

    files = find_input_files(inputs)
    documents = (text for text, digest in iter_clean_documents(files, text_field=text_field, text_unit=text_unit)
                 if not is_validation(digest, val_fraction))
    return Tokenizer.train(documents, vocab_size, min_frequency=min_frequency)


# ----------------------------------------------------------------------------- shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass
class _ShardWriter:
    directory: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    text_bytes: int = 0
    documents: int = 0
    _buffer: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0
    # The newest document waits here, so a tiny corpus whose hashes sent nothing
    # to validation can still move one document there.
    pending: tuple[np.ndarray, int] | None = None

    def add(self, ids: np.ndarray, text_bytes: int) -> None:
        if self.pending is not None:
            self._commit(*self.pending)
        self.pending = (ids, text_bytes)

    def take_pending(self) -> tuple[np.ndarray, int] | None:
        pending, self.pending = self.pending, None
        return pending

    def _commit(self, ids: np.ndarray, text_bytes: int) -> None:
        self._buffer.append(ids)
        self._buffered += len(ids)
        self.tokens += len(ids)
        self.text_bytes += text_bytes
        self.documents += 1
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, count: int) -> None:
        data = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        head, rest = data[:count], data[count:]
        name = f"{self.split}_{len(self.shards):05d}.bin"
        # A file object, not ndarray.tofile: that reports a full disk without its errno.
        with open(self.directory / name, "wb") as out:
            out.write(memoryview(np.ascontiguousarray(head.astype(self.dtype, copy=False))))
        self.shards.append({"file": name, "tokens": int(len(head))})
        self._buffer = [rest] if len(rest) else []
        self._buffered = len(rest)

    def close(self) -> None:
        if self.pending is not None:
            self._commit(*self.pending)
            self.pending = None
        if self._buffered:
            self._flush(self._buffered)

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "text_bytes": self.text_bytes, "documents": self.documents,
            "bytes_per_token": self.text_bytes / self.tokens if self.tokens else None, "shards": self.shards,
        }


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    val_fraction: float = 0.01,
    text_field: str = "text",
    text_unit: str = "paragraph",
    shard_tokens: int = 100_000_000,
    batch_documents: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into shards in `out_dir`; returns the manifest.

    `progress(bytes_done, bytes_total)` is called as input is consumed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text_unit must be one of {', '.join(TEXT_UNITS)}; got {text_unit!r}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    eos = tokenizer.eos_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-text token (<|eos|>); train it with `scribe tokenizer train`")
    check_output_apart(inputs, out_dir)
    files = find_input_files(inputs)
    total_bytes = sum(f.stat().st_size for f in files)
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(min(done[0], total_bytes), total_bytes)

    dtype = token_dtype(tokenizer.vocab_size)
    stats: list[SourceStats] = []
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, kind="shards") as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        batch: list[tuple[str, bytes]] = []

        def flush() -> None:
            encoded = tokenizer.encode_batch([text for text, _ in batch])
            for (text, digest), ids in zip(batch, encoded):
                split = "validation" if is_validation(digest, val_fraction) else "train"
                tokens = np.asarray(ids + [eos], dtype=np.int64)
                writers[split].add(tokens, len(text.encode("utf-8")))
            batch.clear()

        for item in iter_clean_documents(files, text_field=text_field, text_unit=text_unit, stats=stats, on_bytes=on_bytes):
            batch.append(item)
            if len(batch) >= batch_documents:
                flush()
        if batch:
            flush()
        train, val = writers["train"], writers["validation"]
        kept = train.documents + val.documents + (train.pending is not None) + (val.pending is not None)
        if kept == 0:
            raise DataError("the inputs hold no text (every document was empty or a duplicate)")
        if val_fraction > 0 and val.documents == 0 and val.pending is None:
            if kept < 2:
                raise DataError("only one document survived cleaning; a validation split needs at least two "
                                "(separate documents with blank lines, or use --val-fraction 0)")
            writers["validation"].add(*train.take_pending())
        if train.documents == 0 and train.pending is None:
            if val.documents + (val.pending is not None) < 2:
                raise DataError("no document is left for training; give more text")
            train.add(*val.take_pending())
        for w in writers.values():
            w.close()
        tokenizer.save(tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": 1,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": eos,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "val_fraction": val_fraction,
            "text_field": text_field,
            "text_unit": text_unit,
            "splits": {s: writers[s].summary() for s in SPLITS},
            "documents": sum(s.documents for s in stats),
            "empty_dropped": sum(s.empty for s in stats),
            "duplicates_dropped": sum(s.duplicates for s in stats),
            "sources": [vars(s) for s in stats],
        }
        t = manifest["splits"]["train"]
        manifest["bytes_per_token"] = t["bytes_per_token"]
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    data_dir = Path(data_dir)
    file = data_dir / MANIFEST_FILE
    manifest = read_json_object(
        file, DataError, missing=f"{data_dir} has no {MANIFEST_FILE}; create it with `scribe prepare INPUT... -o {data_dir}`",
        invalid_hint="; re-run `scribe prepare`",
    )
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{file} is not a scribelm shard manifest; re-run `scribe prepare`")
    return manifest


def read_split(data_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The memory-mapped shards of one split."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir} has no split {split!r}; it has {', '.join(manifest['splits'])}")
    dtype = np.dtype(manifest["dtype"])
    arrays = []
    for shard in manifest["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; re-run `scribe prepare`")
        expected = shard["tokens"] * dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes, expected {expected}; re-run `scribe prepare`")
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return arrays


def check_tokenizer_matches(manifest: dict[str, Any], tokenizer=None, model_vocab_size: int | None = None,
                            data_dir: str | os.PathLike = "data") -> None:
    """Refuse a tokenizer or a model vocabulary that is not the one the shards were made with."""
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != manifest["tokenizer_sha256"]:
        raise DataError(
            f"the tokenizer is not the one {data_dir} was prepared with (vocab {tokenizer.vocab_size} vs "
            f"{manifest['vocab_size']}, different hash); use {Path(data_dir) / 'tokenizer.json'} or re-run `scribe prepare`"
        )
    if model_vocab_size is not None and model_vocab_size < manifest["vocab_size"]:
        raise DataError(
            f"the data in {data_dir} uses a vocabulary of {manifest['vocab_size']} tokens but the model has "
            f"vocab_size {model_vocab_size}; set the model's vocab_size to {manifest['vocab_size']}"
        )
