"""The weight formats of `scribe quantize`: int8 and int4, their quantizers and dequantizers.

Decoding one token at a time reads every weight once per token and does two
floating-point operations with it, so on a CPU (and on a GPU at batch 1) the
speed is set by how many bytes of weights stream out of memory, not by
arithmetic. Storing weights in fewer bits makes decoding faster and the model
smaller; activations stay in floating point ("weight-only").

    int8   per output channel, symmetric:   w ≈ q · scale          q ∈ [-127, 127]
           one float32 scale per row; 8 bits a weight (+ 32 bits a row)
    int4   per group of `group_size` consecutive inputs, asymmetric:
                                            w ≈ q · scale + min    q ∈ [0, 15]
           two weights packed per byte, float16 scale and min per group:
           4.5 bits a weight at group 64, 5 at group 32

(QLoRA's 4-bit frozen bases use other formats, `nf4` and `sym4`: see fourbit.py.)
"""

from __future__ import annotations

import torch

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight (N, K) -> q int8 (N, K), scales float32 (N,)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales.float()[:, None]).to(dtype)  # (N, K)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group int4: weight (N, K) -> packed uint8 (N, K/2) (low nibble = even
    input, high nibble = odd input), scales and mins float16 (N, K/group_size)."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    # Round the parameters to their stored dtype first so the codes are chosen for them.
    scales = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.float16)
    mins = lo.to(torch.float16)
    q = torch.round((w - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), scales, mins


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (N, K) in 0..15 -> uint8 (N, K/2): low nibble = even input, high = odd."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> codes uint8 (N, K) in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed)  # (N, K)
    N, K = q.shape
    G = scales.shape[1]
    w = q.view(N, G, K // G).float() * scales.float()[..., None] + mins.float()[..., None]  # (N, G, g)
    return w.view(N, K).to(dtype)
