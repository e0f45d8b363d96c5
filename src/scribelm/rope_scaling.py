"""Stretching RoPE past the context a model was trained on: YaRN and dynamic NTK.

RoPE turns position t into the angles t·θ_i, θ_i = base^(-2i/d). Beyond the trained
context the low frequencies (long wavelengths) reach angles the model never saw.

YaRN (Peng et al. 2023) treats each frequency by how many turns it makes over the
original context L: those that turn many times (more than beta_fast) are kept, those
that turn less than beta_slow times are divided by `factor` (position interpolation),
and a linear ramp blends the ones between. Attention then runs slightly sharper:
cos and sin are multiplied by an attention factor (0.1·ln(factor) + 1 by default),
so every q·k grows by its square.

Dynamic NTK ("NTK-aware" scaling, recomputed as the sequence grows): while the
sequence fits the original context nothing changes; at length n > L the base
becomes base · (factor·n/L − (factor − 1))^(d/(d−2)), which slows every frequency,
the lowest most. The frequencies follow the longest position of each forward pass,
so a decoding step past L uses slightly lower ones than the step before (keys
already cached keep the angles they were written with, as in transformers).

Both are computed exactly as `transformers` computes them, so imported models give
the reference's numbers below and far beyond the original context.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """The factor cos and sin are multiplied by: given, or 0.1·ln(factor) + 1."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any], device=None) -> torch.Tensor:
    """θ_i blended between kept (fast, many turns in the original context) and divided by `factor` (slow). (dim/2,)"""
    factor, original = scaling["factor"], scaling["original_context_length"]
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

    def dimension_of(turns: float) -> float:  # the feature pair whose wavelength fits `turns` times in the context
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a width
    wavelengths = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)  # (dim/2,)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: frequency kept (extrapolated), 0: divided by factor (interpolated)
    return (1.0 / (factor * wavelengths)) * (1 - keep) + (1.0 / wavelengths) * keep


def dynamic_ntk_inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any], seq_len: int,
                                    device=None) -> torch.Tensor:
    """θ_i with the base raised for a sequence of `seq_len` positions (unchanged within the original context)."""
    factor, original = scaling["factor"], scaling["original_context_length"]
    seq_len = max(seq_len, original)
    base = theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
