"""Native matrix-vector kernels for decoding on a CPU, compiled on first use.

A decode step is a chain of matrix-vector products, one per weight matrix, and
each is bound by how fast the weights stream out of memory. PyTorch's own
products are built for matrices: MKL's float32 product runs one core here, and
oneDNN's costs a fixed ~15 µs a call and starts each small matrix slowly. The
~300 lines of C in `matvec.c` do only the few-rows case, for float32, bfloat16,
int8 (one scale per row) and int4 (scale and min per group) weights, plus
RMSNorm over a few rows: each weight is read once, in order, by every core of
PyTorch's own thread pool, with the next block of rows prefetched while the
current one is multiplied.

The source ships with the package and is compiled the first time a kernel is
wanted, with the system's C compiler (`$CC`, else `cc`, `gcc` or `clang`) and
`-O3 -march=native -fopenmp`, into a cache directory keyed by the source, the
compiler and the CPU; later processes load the cached library (`ctypes`). The
library links to the very OpenMP runtime PyTorch has loaded, so both share one
pool of threads. Where any of this is missing (no compiler, no OpenMP, a PyTorch
built with another threading runtime) `library()` returns None and callers keep
PyTorch's kernels; `status()` says why. `SCRIBELM_NATIVE=0` turns the kernels
off; `SCRIBELM_CACHE_DIR` moves the cache.

The results equal PyTorch's up to float32 rounding order (about 1e-7 relative).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "matvec.c", HERE / "decode_layer.c")  # each compiled, linked into one library
HEADERS = (HERE / "matvec.h",)
DISABLE_ENV = "SCRIBELM_NATIVE"
CACHE_ENV = "SCRIBELM_CACHE_DIR"
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-Wall")

_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "scribe_linear_f32": ([_P, _I, _I, _P, _I, _P, _P, _INT], None),
    "scribe_linear_bf16": ([_P, _I, _I, _P, _I, _P, _P, _INT], None),
    "scribe_linear_i8": ([_P, _I, _I, _P, _P, _I, _P, _P, _INT], None),
    "scribe_linear_i4": ([_P, _I, _I, _P, _P, _P, _I, _I, _P, _P, _INT], ctypes.c_int),
    "scribe_rms_norm": ([_P, _I, _I, _P, ctypes.c_float, _P], None),
    "scribe_decode_layers": ([_P, _I, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _P, _INT], ctypes.c_int),
    "scribe_lanes": ([], ctypes.c_int),
}


class _Native:
    """The loaded library, with typed entry points."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dll = ctypes.CDLL(str(path))  # CDLL releases the GIL during each call
        for name, (argtypes, restype) in _SIGNATURES.items():  # scribe_linear_i8 -> self.linear_i8, ...
            function = getattr(self.dll, name)
            function.argtypes, function.restype = argtypes, restype
            setattr(self, name.removeprefix("scribe_"), function)
        self.lanes = self.dll.scribe_lanes()  # a number, not the function


_status = "not loaded yet"


def status() -> str:
    """Why the native kernels are or are not in use (after the first `library()` call)."""
    return _status


def cache_dir() -> Path:
    """$SCRIBELM_CACHE_DIR/native, else $XDG_CACHE_HOME/scribelm/native, else ~/.cache/scribelm/native."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scribelm" / "native"


def _loaded_openmp() -> Path | None:
    """The GNU OpenMP runtime this process (PyTorch) has loaded, if it is one."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    runtimes = {line.split(maxsplit=5)[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    # Other wheels (scikit-learn, sentencepiece, faiss) bring their own libgomp copies; the
    # kernels must share PyTorch's thread pool, so prefer the copy inside torch's directory.
    torch_dir = Path(torch.__file__).resolve().parent
    own = {r for r in runtimes if Path(r).resolve().is_relative_to(torch_dir)
           or Path(r).resolve().is_relative_to(torch_dir.parent / "torch.libs")}
    if len(own) == 1:
        return Path(own.pop())
    return Path(runtimes.pop()) if len(runtimes) == 1 else None


def _cpu_identity() -> str:
    """What -march=native depends on: the model and the instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _build(compiler: str, openmp: Path, target: Path) -> None:
    """Compile and link against `openmp`, writing `target` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120, check=True)
        objects = []
        for source in SOURCES:
            objects.append(str(Path(tmp) / source.with_suffix(".o").name))
            run([compiler, *COMPILE_FLAGS, "-c", str(source), "-o", objects[-1]])
        lib = Path(tmp) / target.name
        # Link to PyTorch's own runtime (by path) rather than the compiler's -lgomp: one thread pool.
        run([compiler, "-shared", *objects, str(openmp), f"-Wl,-rpath,{openmp.parent}", "-lm", "-o", str(lib)])
        os.replace(lib, target)


@functools.cache
def library() -> _Native | None:
    """The compiled kernels, or None where they cannot be had (see `status()`)."""
    global _status
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _status = f"off ({DISABLE_ENV}=0)"
        return None
    if "OpenMP" not in torch.__config__.parallel_info():
        _status = "off: this PyTorch does not use OpenMP threads"
        return None
    openmp = _loaded_openmp()
    if openmp is None:
        _status = "off: PyTorch's OpenMP runtime is not GNU libgomp (or cannot be found)"
        return None
    compiler = _compiler()
    if compiler is None:
        _status = "off: no C compiler found (set $CC, or install gcc or clang)"
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join(
            [*(f.read_text() for f in (*SOURCES, *HEADERS)), compiler, version, " ".join(COMPILE_FLAGS), str(openmp),
             _cpu_identity()]
        ).encode()).hexdigest()[:16]
        target = cache_dir() / f"matvec-{key}.so"
        if not target.exists():
            _build(compiler, openmp, target)
        native = _Native(target)
    except subprocess.CalledProcessError as e:
        _status = f"off: compiling the kernels failed: {(e.stderr or '').strip().splitlines()[-1:] or e}"
        return None
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        _status = f"off: {e}"
        return None
    if _loaded_openmp() != openmp:  # the library pulled in a second runtime after all
        _status = "off: the compiled kernels would load a second OpenMP runtime"
        return None
    _status = f"on ({native.lanes} float lanes, {target})"
    return native


# --------------------------------------------------------------------------- calls
# The callers check dtypes, devices and that no gradient is wanted; these check shapes and
# memory layout, which decide whether raw pointers may be handed over at all.


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with its rows (..., K) one after another in memory, read as (M, K)."""
    return x if x.is_contiguous() else x.contiguous()


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's address for a kernel, or None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


def linear_float(lib: _Native, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) · weight (N, K)ᵀ + bias (N,) -> (..., N), all float32, weight and bias contiguous.
    bfloat16 x, weight and bias give a bfloat16 result, accumulated in float32."""
    N, K = weight.shape
    if weight.dtype == torch.bfloat16:
        x = _rows(x.float())
        bias = None if bias is None else bias.float()
        function = lib.linear_bf16
    else:
        x = _rows(x)
        function = lib.linear_f32
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    function(x.data_ptr(), x.numel() // K, K, weight.data_ptr(), N, pointer(bias), y.data_ptr(), torch.get_num_threads())
    return y if weight.dtype == torch.float32 else y.to(weight.dtype)


def linear_int8(lib: _Native, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) float32 · (qweight (N, K) int8 · scales (N,) float32)ᵀ + bias -> (..., N) float32."""
    N, K = qweight.shape
    x = _rows(x)
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    lib.linear_i8(x.data_ptr(), x.numel() // K, K, qweight.data_ptr(), scales.data_ptr(), N, pointer(bias),
                  y.data_ptr(), torch.get_num_threads())
    return y


def linear_int4(lib: _Native, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) float32 · int4 weight ᵀ + bias -> (..., N) float32. packed uint8 (N, K/2),
    scales and mins float16 (N, K/group_size); w = code · scale + min."""
    N, K = packed.shape[0], packed.shape[1] * 2
    x = _rows(x)
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    failed = lib.linear_i4(x.data_ptr(), x.numel() // K, K, packed.data_ptr(), scales.data_ptr(), mins.data_ptr(),
                           group_size, N, pointer(bias), y.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("out of memory for the int4 kernel's scratch space")
    return y


def rms_norm(lib: _Native, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., K) float32 -> x / sqrt(mean(x²) + eps) · weight (K,), contiguous."""
    K = weight.shape[0]
    x = _rows(x)
    y = torch.empty(x.shape, dtype=torch.float32)
    lib.rms_norm(x.data_ptr(), x.numel() // K, K, weight.data_ptr(), eps, y.data_ptr())
    return y
