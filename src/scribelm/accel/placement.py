"""Weights in huge pages: `place_weights(model)` moves a CPU model's large tensors into one
block of memory that the kernel backs with 2 MiB pages.

A decode step reads every weight once, so its speed is the speed at which the
CPU streams hundreds of megabytes through its caches. With the usual 4 KiB
pages that stream needs a new address translation every 4 KiB, and the page
walks it misses in the TLB cost about a third of the bandwidth: on a 2-core
Xeon a plain read of 400 MB runs at ~21 GB/s from 4 KiB pages and ~30 GB/s from
2 MiB pages (and the whole 100M-parameter decode step gets that much faster,
benchmarks/decode_quant.py). PyTorch allocates with malloc, which gets 4 KiB
pages unless transparent huge pages are set to "always"; Linux's default is
"madvise", which gives huge pages only to memory that asks for them.

So this pass allocates one buffer for all the weights, aligned to 2 MiB, asks
for huge pages on it (`madvise(MADV_HUGEPAGE)`) before it is touched, and
copies each tensor's storage in, one storage at a time (so the old copy is
freed as the new one fills: memory does not double). Parameters keep their
identity, names, shapes, strides and values; only their storage moves, and
tensors that shared a storage (packed q/k/v, a tied unembedding) still share
it. Nothing changes where the system has no transparent huge pages (not
Linux, or THP "never"): the pass then does nothing.

`accelerate` applies it; quantization applies it again to the new codes of an
accelerated model, and an accelerated model's `.to()` / `.bfloat16()` to the new
storages (not after `share_memory()`, whose storages must stay shared). A new
parameter set by hand gets ordinary memory (still correct, just the slower
pages) until the pass runs again.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

#: Storages smaller than this stay where they are (norm weights, biases): they fit in cache.
MIN_STORAGE_BYTES = 64 << 10
#: Models with less in large storages than this are left alone: a few pages gain nothing.
MIN_TOTAL_BYTES = 2 * HUGE_PAGE

_ALIGN = 64  # each storage starts on a cache line, as PyTorch's own allocations do


@functools.cache
def huge_pages_available() -> bool:
    """Whether this system gives transparent huge pages to memory that asks (Linux, THP
    "always" or "madvise")."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    function = libc.madvise
    function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return function


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An untouched uint8 buffer of `nbytes` starting on a 2 MiB boundary, advised to be
    backed by huge pages (a refusal only costs the speed)."""
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # malloc maps it fresh: no page touched yet
    skip = -raw.data_ptr() % HUGE_PAGE
    buffer = raw[skip:skip + nbytes]
    length = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    _madvise()(buffer.data_ptr(), min(length, raw.numel() - skip), MADV_HUGEPAGE)
    return buffer


def _movable(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and not t.is_meta


def _clusters(tensors: list[torch.Tensor], placed: set[int]) -> list[tuple[torch.UntypedStorage, int, int, list[torch.Tensor]]]:
    """The byte ranges of memory the tensors use, as (storage, start, end, tensors): tensors
    of one storage whose bytes touch or overlap form one range (packed q/k/v stay together),
    and a storage's unused bytes are not copied. Ranges in storages placed before are left out."""
    by_storage: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    storages: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in placed or t.numel() == 0:
            continue
        storages[address] = storage
        first = t.storage_offset() * t.element_size()
        span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))  # elements reached
        by_storage.setdefault(address, []).append((first, first + span * t.element_size(), t))
    clusters = []
    for address, members in by_storage.items():
        members.sort(key=lambda m: m[0])
        current = None
        for first, end, t in members:
            if current is not None and first <= current[2] + _ALIGN:  # touching (or padding apart): one range
                current[2] = max(current[2], end)
                current[3].append(t)
            else:
                # from a cache-line boundary: each tensor keeps its alignment (mod 64) in the new memory
                current = [storages[address], first - first % _ALIGN, end, [t]]
                clusters.append(current)
    return [tuple(c) for c in clusters if c[2] - c[1] >= MIN_STORAGE_BYTES]


def place_weights(model: nn.Module) -> nn.Module:
    """Move `model`'s large CPU parameters and buffers into huge pages, in place (see the
    module docstring); returns `model`. What an earlier call placed stays put."""
    if not huge_pages_available():
        return model
    placed: set[int] = model.__dict__.setdefault("_huge_page_storages", set())
    unique: dict[int, torch.Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        if _movable(t):
            unique.setdefault(id(t), t)
    clusters = _clusters(list(unique.values()), placed)
    offsets, total = [], 0
    for _, first, end, _ in clusters:
        offsets.append(total)
        total += -(-(end - first) // _ALIGN) * _ALIGN
    if total < MIN_TOTAL_BYTES:
        return model
    buffer = huge_page_buffer(total)
    arena = buffer.untyped_storage()
    base = buffer.data_ptr() - arena.data_ptr()  # the buffer's byte offset inside its storage
    with torch.no_grad():
        for (storage, first, end, members), start in zip(clusters, offsets):
            source = torch.empty(0, dtype=torch.uint8).set_(storage, first, (end - first,))
            buffer[start:start + end - first].copy_(source)
            del source
            for t in members:  # rebound one range at a time, so each old storage can go before the next copy
                byte_offset = base + start + t.storage_offset() * t.element_size() - first
                t.data = torch.empty(0, dtype=t.dtype).set_(arena, byte_offset // t.element_size(), t.shape, t.stride())
            del storage, members
    clusters.clear()
    placed.add(arena.data_ptr())
    for module in model.modules():  # views kept over the old storages (packing.joined_fields) would hold them
        module.__dict__.pop("_joined_fields", None)
    return model
