"""llama.cpp (llama-cpp-python) as a test peer, run in a child process.

llama.cpp is native code: when it crashes, it takes its process with it. Run
in pytest's own process, one segfault would end the whole suite with no
summary. So every llama.cpp load, tokenization and evaluation runs here in a
child Python process (which imports llama_cpp and numpy, never torch): the
parent writes the batch of jobs as JSON, the child answers with one .npz file.

A batch is a list of jobs built by the functions below, answered in order:

    tokens, logits = run([tokenize(path, ["hello"], vocab_only=True), logits(path, ids)])

When the child dies by a signal, the crash is judged before anything is
reported. llama.cpp has CPU paths of its own that crash on valid files (its AMX
int8 matrix product on Intel Xeons crashes on any Q8_0 file), so the same kind
of work runs on a control file that llama.cpp's own quantizer wrote, of the
same tensor type, from a small F32 model:

    control crashes too  -> pytest.skip, with the signal, the CPU's flags and the reason
    control works        -> pytest.fail: llama.cpp runs its own file, so ours is at fault

A crash is never a pass, and a skip always says why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# f32 key/value cache: the default f16 cache alone would move logits by ~1e-4.
DEFAULT_OPTIONS = dict(n_ctx=128, n_threads=1, verbose=False, logits_all=True, type_k=0, type_v=0)
CHILD_TIMEOUT_S = 900

# llama.cpp's file types (enum llama_ftype) for the control file, by the widest weight type in a file.
_FTYPES = {"F32": 0, "F16": 1, "Q8_0": 7}
_CONTROL_LENGTHS = (1, 17, 100)  # one decode step, a short and a long prefill


# Jobs. `options` go to llama_cpp.Llama (over DEFAULT_OPTIONS); jobs on the same file
# and options share one loaded model in the child.

def tokenize(path, texts: list[str], **options) -> dict:
    """-> one id list per text (no BOS, special tokens typed as text stay text)."""
    return dict(op="tokenize", path=str(path), texts=list(texts), options=options)


def detokenize(path, id_lists: list[list[int]], **options) -> dict:
    """-> one string per id list (invalid UTF-8 replaced)."""
    return dict(op="detokenize", path=str(path), id_lists=[list(map(int, ids)) for ids in id_lists], options=options)


def logits(path, ids: list[int], **options) -> dict:
    """-> (len(ids), vocab) float32 array: the logits after each position, from a fresh context."""
    return dict(op="logits", path=str(path), ids=list(map(int, ids)), options=options)


def greedy(path, prompt: list[int], new_tokens: int, **options) -> dict:
    """-> the `new_tokens` ids greedy decoding appends to `prompt`, one evaluation per token."""
    return dict(op="greedy", path=str(path), prompt=list(map(int, prompt)), new_tokens=int(new_tokens), options=options)


def quantize(source, target, ftype: int) -> dict:
    """llama.cpp's own quantizer writes `target` from `source` (ftype: enum llama_ftype) -> None."""
    return dict(op="quantize", source=str(source), target=str(target), ftype=int(ftype))


def echo(value=None, array=None) -> dict:
    """-> value, or the array as sent: the child's own plumbing, without llama.cpp."""
    return dict(op="echo", value=value, array=None if array is None else np.asarray(array).tolist())


def crash(signum: int = signal.SIGSEGV, last_words: str = "") -> dict:
    """The child writes `last_words` to stderr and kills itself with `signum`: a stand-in for a
    crashing peer (llama.cpp's failed assertions print, then abort) when testing this module."""
    return dict(op="crash", signum=int(signum), last_words=last_words)


def own_file(job: dict) -> dict:
    """Marks a job as running on a file llama.cpp itself wrote: a crash there is llama.cpp's alone."""
    return dict(job, own_file=True)


# The parent side.

class ChildResult:
    """What one child run left: results, or how it ended and which job it was running."""

    def __init__(self, results, returncode: int, running: int | None, stderr: str):
        self.results, self.returncode, self.running, self.stderr = results, returncode, running, stderr

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    def describe(self, jobs: list[dict], last_words: bool = True) -> str:
        """How the child ended, in which job, and (`last_words`) the last line it wrote to stderr."""
        where = f" during job {self.running} ({_describe_job(jobs[self.running])})" if self.running is not None else ""
        how = f"killed by {signal.Signals(self.signal).name}" if self.signal else f"exited with status {self.returncode}"
        last = [line for line in self.stderr.splitlines() if line.strip()][-1:]
        return f"{how}{where}: {last[0].strip()}" if last_words and last else f"{how}{where}"


def run_child(jobs: list[dict]) -> ChildResult:
    """Runs `jobs` in one child process; never raises for what the child does."""
    with tempfile.TemporaryDirectory(prefix="llama-peer-") as tmp:
        tmp = Path(tmp)
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        # Run as a module from the repository root: run as a script, tests/ would come first on
        # the child's path and tests/inspect would hide the standard library's inspect.
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            done = subprocess.run([sys.executable, "-m", "tests.llama_peer", str(tmp)], env=env, capture_output=True,
                                  text=True, timeout=CHILD_TIMEOUT_S, cwd=root)
        except subprocess.TimeoutExpired:
            return ChildResult(None, 1, _running(tmp), f"no answer within {CHILD_TIMEOUT_S} s")
        if done.returncode != 0:
            return ChildResult(None, done.returncode, _running(tmp), done.stderr)
        with np.load(tmp / "results.npz", allow_pickle=False) as answer:
            arrays = {key: answer[key] for key in answer.files}
        return ChildResult(_decode(json.loads(str(arrays.pop("results"))), arrays), 0, None, done.stderr)


def run(jobs: list[dict], control: list[dict] | None = None) -> list:
    """Runs `jobs` in a child and returns their results in order.

    A child killed by a signal becomes a skip only when llama.cpp also crashes on the
    control batch's file of its own (`control`: default `control_jobs` for the files in
    `jobs`); otherwise, and for any other failure of the child, the test fails."""
    __tracebackhide__ = True  # pytest reports a skip at the test's line, not at this module's
    import pytest

    if control is None and any(job["op"] != "echo" and job["op"] != "crash" for job in jobs):
        _require_llama_cpp()
    outcome = run_child(jobs)
    if outcome.returncode == 0:
        return outcome.results
    failure = f"llama.cpp child {outcome.describe(jobs)}"
    if outcome.signal is None:
        pytest.fail(failure, pytrace=False)
    crashed = f"llama.cpp child {outcome.describe(jobs, last_words=False)}"
    with tempfile.TemporaryDirectory(prefix="llama-control-") as tmp:
        control = control if control is not None else control_jobs(_widest_type(jobs), Path(tmp))
        checked = run_child(control)
    if checked.returncode == 0:
        pytest.fail(f"{failure}, but llama.cpp runs the same kind of work on a file its own quantizer "
                    f"wrote: the crash is the file's fault", pytrace=False)
    if checked.signal is not None and checked.running is not None and control[checked.running].get("own_file"):
        pytest.skip(f"{crashed}; llama.cpp also crashes ({signal.Signals(checked.signal).name}) on "
                    f"{_describe_job(control[checked.running])}, a file it wrote itself: a llama.cpp bug on "
                    f"this CPU ({cpu_flags()}); build llama-cpp-python without native CPU detection "
                    f"as the README's GGUF notes say")
    pytest.fail(f"{failure}; the control run also failed before reaching llama.cpp's own file: "
                f"{checked.describe(control)}", pytrace=False)


def control_jobs(type_name: str, directory: Path) -> list[dict]:
    """The control batch: llama.cpp quantizes a small random F32 model to `type_name`, then
    evaluates first the F32 source and then its own file, at decode and prefill lengths."""
    import torch

    import scribelm
    from scribelm.interop.gguf import export_gguf
    from tests.trained_tiny import config, tokenizer

    torch.manual_seed(0)
    source = export_gguf(scribelm.LM(scribelm.Transformer(config("llama")).eval(), tokenizer()),
                         directory / "control-f32.gguf", type="f32")
    target = directory / f"control-{type_name.lower()}-by-llama.cpp.gguf"
    ids = [(7 * i + 3) % 512 for i in range(max(_CONTROL_LENGTHS))]
    jobs = [quantize(source, target, _FTYPES[type_name])]
    jobs += [logits(source, ids[:n]) for n in _CONTROL_LENGTHS]
    jobs += [own_file(logits(target, ids[:n])) for n in _CONTROL_LENGTHS]
    return jobs


def cpu_flags() -> str:
    """The CPU extensions that select llama.cpp's kernels in a native build, as Linux names them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()
    wanted = {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni"}
    return " ".join(sorted(flag for flag in flags if flag in wanted or flag.startswith("amx")))


def _require_llama_cpp() -> None:
    import importlib.util

    import pytest

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'scribelm[llama]')")


def _widest_type(jobs: list[dict]) -> str:
    """The widest weight encoding llama.cpp was asked to compute with: Q8_0 over F16 over F32."""
    import gguf

    paths = {job["path"] for job in jobs if "path" in job and not job.get("options", {}).get("vocab_only")}
    seen = {tensor.tensor_type.name for path in paths for tensor in gguf.GGUFReader(path).tensors}
    return next((name for name in ("Q8_0", "F16") if name in seen), "F32")


def _describe_job(job: dict) -> str:
    target = job.get("path") or job.get("target") or ""
    return f"{job['op']} {Path(target).name}".strip()


def _running(tmp: Path) -> int | None:
    progress = tmp / "progress"
    return int(progress.read_text().split()[-1]) if progress.exists() and progress.read_text().split() else None


def _decode(value, arrays: dict):
    if isinstance(value, dict) and set(value) == {"__array__"}:
        return arrays[value["__array__"]]
    if isinstance(value, list):
        return [_decode(item, arrays) for item in value]
    return value


# The child side.

def _child_main(tmp: Path) -> None:
    jobs = json.loads((tmp / "jobs.json").read_text())
    models: dict[str, object] = {}
    arrays: dict[str, np.ndarray] = {}
    results = []
    with open(tmp / "progress", "w") as progress:
        for index, job in enumerate(jobs):
            progress.write(f"{index}\n")
            progress.flush()  # read by the parent if this job kills us
            value = _child_job(job, models)
            if isinstance(value, np.ndarray):
                arrays[f"a{len(arrays)}"] = value
                value = {"__array__": f"a{len(arrays) - 1}"}
            results.append(value)
    arrays["results"] = np.array(json.dumps(results))
    np.savez(tmp / "results.npz", **arrays)


def _child_job(job: dict, models: dict):
    op = job["op"]
    if op == "echo":
        return job["value"] if job["array"] is None else np.asarray(job["array"], dtype=np.float32)
    if op == "crash":
        print(job["last_words"], file=sys.stderr, flush=True)
        os.kill(os.getpid(), job["signum"])
        raise SystemExit(f"signal {job['signum']} did not end the process")
    if op not in ("quantize", "tokenize", "detokenize", "logits", "greedy"):
        raise ValueError(f"unknown job {op!r}")
    import llama_cpp

    if op == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = job["ftype"], 1
        if llama_cpp.llama_model_quantize(job["source"].encode(), job["target"].encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {job['source']}")
        return None
    key = json.dumps([job["path"], job["options"]], sort_keys=True)
    if key not in models:
        models[key] = llama_cpp.Llama(model_path=job["path"], **dict(DEFAULT_OPTIONS, **job["options"]))
    llm = models[key]
    if op == "tokenize":
        return [llm.tokenize(text.encode(), add_bos=False, special=False) for text in job["texts"]]
    if op == "detokenize":
        return [llm.detokenize(ids).decode("utf-8", errors="replace") for ids in job["id_lists"]]
    if op == "logits":
        llm.reset()
        llm.eval(job["ids"])
        return np.array(llm.scores[: len(job["ids"])], dtype=np.float32)
    if op == "greedy":
        llm.reset()
        llm.eval(job["prompt"])
        new = []
        for _ in range(job["new_tokens"]):
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([new[-1]])
        return new


if __name__ == "__main__":
    _child_main(Path(sys.argv[1]))
