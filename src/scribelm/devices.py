"""Which torch devices this PyTorch build can use, and a check for a device a user names.

    available_devices()     # ['cpu'] on a CPU build; ['cpu', 'cuda', 'cuda:0', 'cuda:1'] with two GPUs
    check_device("cuda")    # 'cuda', or DeviceError: "... this PyTorch build (2.13.0+cpu) has: cpu ..."
    resolve_device("auto")  # the first accelerator there is, else 'cpu'

PyTorch itself answers a device it was not built for with an assertion deep
inside its lazy initialisation (`Torch not compiled with CUDA enabled`) and a
device type it does not know with a parser error; both are user mistakes, so
they are checked here once, before any model is loaded, and explained in one
line that lists what this build does have.
"""

from __future__ import annotations

import torch

from scribelm.errors import ScribeError

AUTO = "auto"
ACCELERATOR_TYPES = ("cuda", "mps", "xpu")


class DeviceError(ScribeError, ValueError):
    """A device that this PyTorch build or this machine does not have."""


def _accelerators() -> dict[str, int]:
    """Accelerator type -> how many this process can use (0: built in but absent)."""
    counts: dict[str, int] = {}
    if torch.cuda.is_available():
        counts["cuda"] = torch.cuda.device_count()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        counts["mps"] = 1
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        counts["xpu"] = xpu.device_count()
    return counts


def available_devices() -> list[str]:
    """Device names that work here: 'cpu', then each accelerator type and its numbered devices."""
    names = ["cpu"]
    for kind, count in _accelerators().items():
        names.append(kind)
        if count > 1:
            names += [f"{kind}:{i}" for i in range(count)]
    return names


def _build() -> str:
    return f"this PyTorch build ({torch.__version__}) has: {', '.join(available_devices())}"


def check_device(name: str | torch.device, *, allow_auto: bool = False) -> str:
    """`name` if this machine can run on it (with `allow_auto`, also 'auto'); else DeviceError."""
    text = str(name).strip()
    if allow_auto and text == AUTO:
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        hint = " or auto" if allow_auto else ""
        raise DeviceError(f"unknown device {text!r}; {_build()} (pass one of those{hint})") from None
    if device.type == "cpu":
        return text
    counts = _accelerators()
    if device.type not in counts:
        if device.type not in ACCELERATOR_TYPES:
            raise DeviceError(f"device {text!r} cannot run a model; {_build()}")
        if device.type == "cuda" and torch.backends.cuda.is_built():
            raise DeviceError(f"device {text!r} is not available: no CUDA GPU is visible to this process "
                              f"(check nvidia-smi and CUDA_VISIBLE_DEVICES); {_build()}")
        raise DeviceError(f"device {text!r} is not available: {_build()}; run on one of those, or install a "
                          f"PyTorch build with {device.type} support")
    if device.index is not None and device.index >= counts[device.type]:
        raise DeviceError(f"device {text!r} does not exist: {_build()}")
    return text


def resolve_device(name: str | torch.device) -> str:
    """A checked device name, with 'auto' turned into the first accelerator there is (else 'cpu')."""
    text = check_device(name, allow_auto=True)
    if text == AUTO:
        return next(iter(_accelerators()), "cpu")
    return text
