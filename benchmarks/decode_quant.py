"""Batch-1 decode speed of quantized scribelm models against llama.cpp, same weights.

    python benchmarks/decode_quant.py                       # ~110M-parameter Llama-style model
    python benchmarks/decode_quant.py --layers 4 --new-tokens 16 --threads 1

Decoding one token at a time reads every weight once per token, so its speed
is bounded by memory bandwidth: tokens/s ≤ bandwidth / bytes of weights. This
script measures, in one run:

    roofline      the machine's copy bandwidth (a large tensor copy: read + write),
                  between buffers in huge pages where the system has them, as
                  scribelm's weights are (scribelm.accel.placement)
    scribelm      fp32, bf16, int8 and int4 (group 32) weights, unembedding
                  quantized too, greedy decode with the KV cache
    llama.cpp     the same weights exported with scribelm's GGUF writer as
                  f32, f16 and q8_0, decoded through llama-cpp-python in a child
                  process (a crash of llama.cpp's native code, such as its AMX
                  kernels on Q8_0 files on some Intel Xeons, costs that row only)

Each row gives decode tokens/s (prefill excluded), the weight bytes a step
reads, the resulting GB/s, its share of the roofline, and speed ratios
against scribelm fp32 and llama.cpp q8_0. Timings are medians of a few
repeats; on a shared machine they move, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import scribelm  # noqa: E402
from scribelm.config import ModelConfig  # noqa: E402
from scribelm.generate import BatchGeneration  # noqa: E402
from scribelm.inspect.decode_traffic import weight_bytes_per_token  # noqa: E402
from scribelm.interop.gguf import export_gguf  # noqa: E402
from scribelm.accel import accelerate  # noqa: E402
from scribelm.accel.placement import huge_page_buffer, huge_pages_available  # noqa: E402
from scribelm.quant import quantize_model  # noqa: E402
from scribelm.sampling import SamplingSettings  # noqa: E402


def copy_bandwidth(megabytes: int, repeats: int, huge_pages: bool = False) -> float:
    """GB/s of a large tensor copy, counting the bytes read and the bytes written; with
    huge_pages, between buffers backed by 2 MiB pages, as scribelm places its weights
    (scribelm.accel.placement), which streams faster than PyTorch's 4 KiB pages."""
    n = megabytes * 2**20
    if huge_pages:
        src, dst = (huge_page_buffer(n).view(torch.float32) for _ in range(2))
        src.fill_(1.0)
    else:
        src = torch.ones(n // 4)
        dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scribelm_decode(model, prompt: list[int], new_tokens: int, repeats: int) -> float:
    """Seconds per decoded token through scribelm's own generation loop (greedy, batch 1,
    KV cache): the median time between consecutive new tokens, over repeats."""
    settings = SamplingSettings(temperature=0, max_new_tokens=new_tokens)
    gaps = []
    for repeat in range(repeats + 1):  # the first run warms up kernels and caches
        stamps = [time.perf_counter() for _ in BatchGeneration(model, None, [prompt], settings)]
        if repeat:
            gaps += [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps)


def llama_cpp_decode(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> float:
    import numpy as np
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    times = []
    for _ in range(repeats + 1):
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        times.append((time.perf_counter() - start) / new_tokens)
    llm.close()
    return statistics.median(times[1:])


def llama_cpp_decode_in_child(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> float | str:
    """llama_cpp_decode in a child process: seconds per token, or why there is no figure."""
    job = json.dumps(dict(path=str(path), prompt=prompt, new_tokens=new_tokens, repeats=repeats, threads=threads))
    done = subprocess.run([sys.executable, __file__, "--llama-cpp-child", job], capture_output=True, text=True)
    if done.returncode < 0:
        return (f"llama.cpp crashed ({signal.Signals(-done.returncode).name}); on CPUs with AMX build "
                f"llama-cpp-python without native CPU detection (README, GGUF notes)")
    if done.returncode:
        return f"llama.cpp failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}"
    return float(done.stdout.split()[-1])


def gguf_matmul_bytes(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # only one row is read per token
        total += int(t.n_bytes)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copy-mb", type=int, default=512, help="size of the roofline copy")
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--llama-cpp-child", metavar="JOB", help=argparse.SUPPRESS)  # one llama.cpp timing (JSON)
    args = p.parse_args()
    if args.llama_cpp_child:
        print(llama_cpp_decode(**json.loads(args.llama_cpp_child)))
        return
    torch.set_num_threads(args.threads)

    config = ModelConfig(
        vocab_size=args.vocab, context_length=args.prompt + args.new_tokens + 16, d_model=args.width,
        n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads, d_mlp=args.mlp, activation="swiglu",
        norm="rmsnorm", norm_bias=False, position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
        tie_embeddings=True, name="bench-llama",
    )
    torch.manual_seed(0)
    base = accelerate(scribelm.Transformer(config)).eval()  # the inference layers, as scribelm.load gives
    tokenizer = scribelm.Tokenizer.train(
        ["In the beginning God created the heaven and the earth. " * 20, "And the earth was without form."],
        vocab_size=300, min_frequency=1, files=False,
    )
    prompt = [int(i) for i in torch.randint(0, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(1))]
    print(f"model: {base.num_parameters() / 1e6:.1f}M parameters ({args.layers} layers, width {args.width}, "
          f"MLP {args.mlp}, vocab {args.vocab}); batch 1, prompt {args.prompt}, {args.new_tokens} decode steps; "
          f"{args.threads} threads; torch {torch.__version__}")

    bandwidth = copy_bandwidth(args.copy_mb, 5)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s ({args.copy_mb} MiB tensor copy, read + write, 4 KiB pages)")
    if huge_pages_available():  # the weights sit in huge pages: measure the roofline there too
        small_pages, bandwidth = bandwidth, copy_bandwidth(args.copy_mb, 5, huge_pages=True)
        print(f"roofline: {bandwidth:.1f} GB/s (the same copy between buffers in 2 MiB pages, "
              f"{bandwidth / small_pages:.2f}× the 4 KiB figure)")

    rows = []
    variants = [
        ("scribelm fp32", lambda: base),
        ("scribelm bf16", lambda: accelerate(copy.deepcopy(base).to(torch.bfloat16))),  # as load(dtype=) gives
        ("scribelm int8", lambda: quantize_model(copy.deepcopy(base), 8, unembedding=True)),
        ("scribelm int4 g32", lambda: quantize_model(copy.deepcopy(base), 4, 32, unembedding=True)),
    ]
    for name, build in variants:
        model = build()
        seconds = scribelm_decode(model, prompt, args.new_tokens, args.repeats)
        rows.append((name, 1 / seconds, weight_bytes_per_token(model)))
        print(f"  {name}: {1 / seconds:.1f} tokens/s", flush=True)
        del model

    if not args.skip_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed (pip install 'scribelm[llama]'); llama.cpp rows skipped")
        else:
            lm = scribelm.LM(base, tokenizer)
            with tempfile.TemporaryDirectory() as tmp:
                for kind in ("f32", "f16", "q8_0"):
                    path = export_gguf(lm, Path(tmp) / f"bench-{kind}.gguf", type=kind)
                    seconds = llama_cpp_decode_in_child(path, prompt, args.new_tokens, args.repeats, args.threads)
                    if isinstance(seconds, str):
                        print(f"  llama.cpp {kind}: {seconds}; row skipped", flush=True)
                    else:
                        rows.append((f"llama.cpp {kind}", 1 / seconds, gguf_matmul_bytes(path)))
                        print(f"  llama.cpp {kind}: {1 / seconds:.1f} tokens/s", flush=True)
                    path.unlink()

    speed = {name: tps for name, tps, _ in rows}
    fp32, q8 = speed["scribelm fp32"], speed.get("llama.cpp q8_0")
    header = f"{'':<20}{'tokens/s':>10}{'MB/token':>10}{'GB/s':>8}{'roofline':>10}{'vs fp32':>9}{'vs llama.cpp q8_0':>19}"
    print()
    print(header)
    for name, tps, nbytes in rows:
        gbs = tps * nbytes / 1e9
        vs_q8 = f"{tps / q8:.2f}×" if q8 else "-"
        print(f"{name:<20}{tps:>10.1f}{nbytes / 1e6:>10.1f}{gbs:>8.1f}{gbs / bandwidth:>9.0%} {tps / fp32:>8.2f}×{vs_q8:>19}")


if __name__ == "__main__":
    main()
