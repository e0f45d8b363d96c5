"""Peak memory of prefilling a long prompt: scribelm (chunked and in one pass) against `transformers`.

    python benchmarks/long_context.py                          # prompts of 1K, 4K and 8K tokens
    python benchmarks/long_context.py --lengths 2048 32768     # as long as memory and patience allow
    python benchmarks/long_context.py --batch 2                # two prompts, the second one half as long

Builds one random-init `transformers.LlamaForCausalLM` (width 256, 4 layers, vocabulary
4096), saves it, and for each prompt length runs, each in a fresh process so that peak
memory is its own:

    scribelm chunked    decode.prefill: 512 tokens at a time through the KV cache
    scribelm one pass   the same prefill with the whole prompt in one forward pass
    transformers        model(ids, use_cache=True, logits_to_keep=1), its prefill in generate

It reports the growth of peak resident memory during the prefill (the KV cache
included, which all three must hold), the time, and the chunked / transformers ratio.
With --batch 2 the prompts differ in length, so the one-pass runs need a padding mask:
a (T × T) matrix for every head, which chunking caps at 512 × T.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_model(path: Path, max_length: int) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=max_length, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Start measuring peak memory from now (Linux: clear_refs 5 resets VmHWM); the resident kB now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak includes loading, and the growth reads low
    return _status_kb("VmRSS")


def peak_kb() -> int:
    return max(_status_kb("VmHWM"), 0)


def measure(impl: str, path: str, length: int, batch: int) -> dict:
    """Runs in a child process: load, warm up, then one prefill; peak memory growth and time."""
    lengths = [length] + [length // 2] * (batch - 1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in lengths]
    if impl == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.zeros(batch, length, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for j, p in enumerate(prompts):  # left-padded, as transformers generates
            ids[j, length - len(p):] = torch.tensor(p)
            mask[j, length - len(p):] = 1

        def run():
            out = model(ids, attention_mask=mask if batch > 1 else None, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1]
        with torch.no_grad():
            model(ids[:, :8], use_cache=True, logits_to_keep=1)  # warm-up
    else:
        import scribelm
        from scribelm.cache import KVCache
        from scribelm.decode import prefill

        model = scribelm.load(path).model
        chunk = 512 if impl == "scribelm chunked" else length

        def run():
            return prefill(model, KVCache(model.config, batch, length), 0, prompts, chunk=chunk)
        with torch.no_grad():
            prefill(model, KVCache(model.config, 1, 8), 0, [prompts[0][:8]])  # warm-up
    base = reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = run()
    seconds = time.perf_counter() - t0
    return {"impl": impl, "length": length, "peak_mb": (peak_kb() - base) / 1024, "seconds": seconds,
            "first_logits": logits[0, :4].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, path, length = args.child
        print(json.dumps(measure(impl, path, int(length), args.batch)))
        return

    impls = ["scribelm chunked", "scribelm one pass", "transformers"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build_model(path, max(args.lengths))
        print(f"prefill of one {'prompt' if args.batch == 1 else f'batch of {args.batch} prompts'}, "
              "peak memory growth (MiB) and seconds, fresh process each")
        print(f"{'tokens':>7} " + " ".join(f"{name:>24}" for name in impls) + "   chunked / transformers")
        for length in args.lengths:
            results = {}
            for impl in impls:
                out = subprocess.run(
                    [sys.executable, __file__, "--batch", str(args.batch), "--child", impl, str(path), str(length)],
                    capture_output=True, text=True,
                )
                if out.returncode != 0:
                    results[impl] = None
                    print(f"  {impl} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                    continue
                results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            cells = [f"{r['peak_mb']:9.1f} MiB {r['seconds']:7.2f} s" if r else f"{'failed':>24}" for r in
                     (results[i] for i in impls)]
            ours, theirs = results["scribelm chunked"], results["transformers"]
            ratio = f"{ours['peak_mb'] / max(theirs['peak_mb'], 1e-9):.2f}x memory" if ours and theirs else "-"
            print(f"{length:>7} " + " ".join(cells) + f"   {ratio}")
            if ours and theirs:
                drift = max(abs(a - b) for a, b in zip(ours["first_logits"], theirs["first_logits"]))
                if drift > 1e-3:
                    print(f"  warning: last-token logits differ by {drift:.2e} between scribelm and transformers")


if __name__ == "__main__":
    main()
