"""The peak FLOP/s that model FLOPs utilization (MFU) is measured against.

A known GPU's nominal dense peak comes from a table (its datasheet); anything else,
the CPU above all, gets the best of repeated large matmuls, measured once per process
and device. A training step faster than that peak proves the figure too low (it was
measured while other work held the cores): `raise_measured_peak` keeps the better one
for later runs in the process.
"""

from __future__ import annotations

import time

import torch

# Nominal dense peaks (datasheets), matched against the device name in this order.
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
# float32 without TF32 runs on the CUDA cores, not the tensor cores.
_GPU_PEAK_FP32 = {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "A10": 31.2e12, "L4": 30.3e12, "4090": 82.6e12, "3090": 35.6e12, "V100": 15.7e12, "T4": 8.1e12}


_measured_peaks: dict[tuple[str, torch.dtype], float] = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s for MFU: a table for known GPUs; on CPU, the best of a few large matmuls
    (measured once per process and device)."""
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # CPUs have no fast fp16 matmul; autocast's fp16 runs near fp32 speed at best
    key = (str(device), dtype)
    if key not in _measured_peaks:
        _measured_peaks[key] = _measure_peak_flops(device, dtype)
    return _measured_peaks[key]


def raise_measured_peak(device: torch.device, dtype: torch.dtype, rate: float) -> None:
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    key = (str(device), dtype)
    _measured_peaks[key] = max(_measured_peaks.get(key, 0.0), rate)


def _measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        table = _GPU_PEAK_FP32 if dtype == torch.float32 and not tf32 else _GPU_PEAK_BF16
        for key, flops in table.items():
            if key in name:
                return flops / 2 if dtype == torch.float32 and tf32 else flops  # TF32: half the bf16 rate
    n = 1024 if device.type == "cpu" else 4096
    # Filled without the global RNG: measuring must not change what a resumed run draws next.
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.full((n, n), 0.5, device=device, dtype=dtype)
    best = float("inf")
    # Best of many short runs: on a shared machine some of them get the cores to themselves.
    for _ in range(5 if device.type == "cuda" else 25):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def training_flops_per_token(model: torch.nn.Module, sequence_length: int | None) -> float:
    """FLOPs of one trained token (forward and backward): counted from the config of a
    scribelm model, else 6 per parameter."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "n_layers"):
        from scribelm.inspect.params import flops_per_token

        return float(flops_per_token(config, sequence_length or config.context_length))
    return 6.0 * sum(p.numel() for p in model.parameters())
