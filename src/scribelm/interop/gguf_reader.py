"""Reading a GGUF file's header with every length checked against the file.

A GGUF file is laid out as

    "GGUF"  version (u32, 2 or 3)  tensor count (u64)  metadata count (u64)
    metadata:  key (u64 length + UTF-8)  value type (u32)  value
    tensors:   name  n_dims (u32)  dims (u64 × n_dims, innermost first)  type (u32)  offset (u64)
    padding to `general.alignment` (default 32), then the tensor data

and every count in it is a claim that may be false: a truncated download, or a
file made to lie. So this reader never trusts one. Before it reads a string, an
array or a tensor it checks that the bytes are there; an array of a billion
entries in a 1 kB file is refused before the first entry is read, and a tensor
whose type and shape need more bytes than the file holds is refused before any
weight is touched. Any such file gets one line saying what is wrong.

The tensor data stays in the file, memory-mapped: `GGUFFile.tensor_bytes`
returns a read-only view of one tensor's bytes, `GGUFFile.float_tensor` its
values decoded with the `gguf` package's reference dequantizers.

    f = read_gguf("model.gguf")
    f.metadata["general.architecture"]          # "llama"
    f.tensors["blk.0.attn_q.weight"].shape      # (64, 64): outermost first, as torch
    w = f.float_tensor("blk.0.attn_q.weight")   # float32 torch tensor
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scribelm.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: no key llama.cpp reads nests at all

# value type -> (struct format, size) for the scalar types
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read as one: truncated, corrupt, or of a kind scribelm does not run."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # outermost first (torch order); GGUF lists the innermost first
    type: Any  # gguf.GGMLQuantizationType
    offset: int  # from the start of the file
    n_bytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # the whole file, uint8, memory-mapped read-only

    def tensor_bytes(self, name: str) -> np.ndarray:
        """One tensor's bytes as stored (a view of the mapped file)."""
        info = self.tensors[name]
        return self.data[info.offset: info.offset + info.n_bytes]

    def float_tensor(self, name: str) -> torch.Tensor:
        """One tensor's values as float32, decoded by the `gguf` package's reference code."""
        import gguf

        info = self.tensors[name]
        raw = self.tensor_bytes(name)
        if info.type == gguf.GGMLQuantizationType.F32:
            values = raw.view(np.float32).reshape(info.shape)
        elif info.type == gguf.GGMLQuantizationType.F16:
            values = raw.view(np.float16).reshape(info.shape).astype(np.float32)
        else:  # BF16 and the block formats: rows of bytes in, rows of floats out
            values = gguf.quants.dequantize(raw.reshape(*info.shape[:-1], -1), info.type)
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(info.shape)  # a copy: the map is read-only

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.metadata.get(key, default)
        if value is not None and not isinstance(value, str):
            raise GGUFError(f"{self.path}: metadata {key} should be text, not {type(value).__name__}")
        return value

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self.metadata.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise GGUFError(f"{self.path}: metadata {key} should be an integer, not {value!r}")
        return None if value is None else int(value)

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self.metadata.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
            raise GGUFError(f"{self.path}: metadata {key} should be a number, not {value!r}")
        return None if value is None else float(value)


class _Cursor:
    """Reads forward through the mapped header; every read checks the bytes exist."""

    def __init__(self, data: np.ndarray, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0
        self.size = len(data)
        self._bytes = memoryview(data)  # sliced per read: slicing the memmap itself makes a new array each time

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path} is not a complete GGUF file: {what} (at byte {self.pos} of {self.size}); "
                         "the file is truncated or corrupt, download or export it again")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, the file has {self.size - self.pos} left")
        view = self._bytes[self.pos: self.pos + n]
        self.pos += n
        return view

    def scalar(self, value_type: int, what: str):
        fmt, size = _SCALARS[value_type]
        value = struct.unpack(fmt, self.take(size, what))[0]
        # float32 as the shortest decimal that reads back to it: 1e-05, not 9.99999974e-06
        return float(str(np.float32(value))) if value_type == 6 else value

    def string(self, what: str) -> str:
        length = self.scalar(10, f"the length of {what}")
        raw = self.take(length, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, value_type: int, what: str, depth: int = 0) -> Any:
        if value_type in _SCALARS:
            return self.scalar(value_type, what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type = self.scalar(4, f"the item type of {what}")
            count = self.scalar(10, f"the length of {what}")
            if item_type in _SCALARS:
                size = _SCALARS[item_type][1]
                raw = self.take(count * size, f"{what} ({count} items)")
                values = np.frombuffer(raw, dtype=_NUMPY[item_type]).copy()
                return values.astype(bool) if item_type == 7 else values
            least = {_STRING: 8, _ARRAY: 12}.get(item_type)
            if least is None:
                raise self.fail(f"{what} has items of unknown type {item_type}")
            if depth >= MAX_NESTING:
                raise self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
            if count * least > self.size - self.pos:  # before reading one item
                raise self.fail(f"{what} claims {count} items, more than the rest of the file can hold")
            return [self.value(item_type, f"item {i} of {what}", depth + 1) for i in range(count)]
        raise self.fail(f"{what} has unknown value type {value_type}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; the data stays mapped, unread."""
    import gguf

    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise GGUFError(f"{path} is not a GGUF file: {size} bytes, shorter than GGUF's 24-byte header")
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as err:
        raise GGUFError(f"cannot read {path}: {err.strerror or err}") from None
    cursor = _Cursor(data, path)
    if bytes(cursor.take(4, "the magic bytes")) != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    version = cursor.scalar(4, "the version")
    if version not in VERSIONS:
        raise GGUFError(f"{path} is GGUF version {version}; scribelm reads versions {' and '.join(map(str, VERSIONS))}")
    n_tensors = cursor.scalar(10, "the tensor count")
    n_keys = cursor.scalar(10, "the metadata count")
    if n_keys * 13 + n_tensors * 25 > size:  # each entry takes at least that many bytes
        raise cursor.fail(f"it claims {n_keys} metadata entries and {n_tensors} tensors, more than fit in the file")

    metadata: dict[str, Any] = {}
    for _ in range(n_keys):
        key = cursor.string("a metadata key")
        value_type = cursor.scalar(4, f"the type of {key}")
        if key in metadata:
            raise cursor.fail(f"metadata key {key} appears twice")
        metadata[key] = cursor.value(value_type, f"metadata {key}")

    known_types = {t.value: t for t in gguf.GGMLQuantizationType}
    table: list[tuple[str, tuple[int, ...], Any, int]] = []
    for _ in range(n_tensors):
        name = cursor.string("a tensor name")
        n_dims = cursor.scalar(4, f"the rank of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name} claims {n_dims} dimensions (GGUF has 1 to {MAX_DIMS})")
        dims = [cursor.scalar(10, f"the shape of {name}") for _ in range(n_dims)]
        type_id = cursor.scalar(4, f"the type of {name}")
        if type_id not in known_types:
            raise GGUFError(f"{path}: tensor {name} has tensor type {type_id}, which the gguf package does not know")
        offset = cursor.scalar(10, f"the offset of {name}")
        table.append((name, tuple(reversed(dims)), known_types[type_id], offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment is {alignment!r}, not a power of two")
    start = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, offset in table:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name} appears twice")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in shape) or shape[-1] % block:
            raise GGUFError(f"{path}: tensor {name} has shape {list(shape)}, which {qtype.name} blocks of {block} "
                            "values do not tile")
        n_bytes = int(np.prod(shape, dtype=object)) // block * type_size
        begin = start + offset
        if offset % alignment or begin + n_bytes > size:
            raise GGUFError(
                f"{path}: tensor {name} ({qtype.name}, shape {list(shape)}) needs bytes {begin}..{begin + n_bytes} "
                f"but the file has {size}; the file is truncated or lies about its tensors"
            )
        tensors[name] = TensorInfo(name, shape, qtype, begin, n_bytes)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, data=data)
