"""Will this run fit? An estimate made before anything is allocated.

Training memory is, roughly:

    weights      N · bytes per weight         (fp32 master weights: 4 bytes)
    gradients    N · 4
    AdamW state  N · 8                        (two moments in fp32)
    activations  per layer ≈ B·T·(16·C + 2·H·T) values kept for the backward
                 pass (Korthikanti et al. 2022, fp32 here), plus the logits
                 B·T·V (three copies: logits, fp32 softmax, its gradient)

Gradient checkpointing keeps only each block's input and recomputes the
rest, so activations drop to B·T·C per layer plus one block's worth. The
numbers are an estimate, on the generous side of real use; the point is to
refuse a run that cannot fit *before* it allocates, with the numbers that
say what to change.
"""

from __future__ import annotations

import os

import torch

from scribelm.config import ModelConfig
from scribelm.errors import ConfigError

GiB = 1024**3


def estimate_training_memory(
    config: ModelConfig,
    micro_batch_size: int,
    sequence_length: int,
    *,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    world_size: int = 1,
    fsdp: bool = False,
    trainable_fraction: float = 1.0,
) -> dict[str, float]:
    """Bytes needed per process, by part, and their total."""
    from scribelm.inspect.params import parameter_breakdown

    n = parameter_breakdown(config)["total"]
    shard = world_size if fsdp else 1
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    B, T, C, L, H, V = micro_batch_size, sequence_length, config.d_model, config.n_layers, config.n_heads, config.vocab_size
    per_layer = B * T * (16 * C + 2 * H * T + 3 * (config.d_mlp or 4 * C)) * act_bytes
    if gradient_checkpointing:
        activations = L * B * T * C * act_bytes + per_layer
    else:
        activations = L * per_layer
    logits = 3 * B * T * V * 4
    parts = {
        "weights": 4.0 * n / shard,
        "gradients": 4.0 * n * trainable_fraction / shard,
        "optimizer": 8.0 * n * trainable_fraction / shard,
        "activations": float(activations),
        "logits": float(logits),
    }
    parts["total"] = sum(parts.values())
    return parts


def available_memory(device: torch.device) -> float:
    """Bytes free for this run on `device` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_fits(estimate: dict[str, float], device: torch.device, processes_per_device: int = 1) -> None:
    """Refuse, with the estimate, a run that needs more memory than `device` has free."""
    free = available_memory(device) / processes_per_device
    if estimate["total"] > free:
        detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in estimate.items() if k != "total")
        raise ConfigError(
            f"this run needs about {estimate['total'] / GiB:.1f} GiB ({detail} GiB) but only {free / GiB:.1f} GiB "
            f"is free on {device.type}; use a smaller model, micro_batch_size or sequence_length, "
            "turn on gradient_checkpointing, or use more devices with FSDP"
        )
