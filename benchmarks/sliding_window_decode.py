"""Long generations from a sliding-window model: the rolling KV cache against the full one and `transformers`.

    python benchmarks/sliding_window_decode.py                       # 512 and 2048 new tokens, window 128
    python benchmarks/sliding_window_decode.py --new 4096 --window 256

Builds one random-init `transformers.MistralForCausalLM` (width 256, 4 layers, 4 query and 2
key/value heads, vocabulary 4096, `sliding_window` W), saves it, and for each length generates
that many tokens greedily after a 64-token prompt, each run in a fresh process so that peak
memory is its own:

    scribelm rolling     LM.generate: a RollingKVCache of W slots (what it uses by default)
    scribelm full cache  the same loop over a KVCache as long as the sequence
    transformers         model.generate(do_sample=False) with its default cache

It reports the KV cache's bytes (scribelm), the growth of peak resident memory during
generation, tokens/s, the rolling / transformers ratios, and whether the tokens agree.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from long_context import peak_kb, reset_peak  # noqa: E402

PROMPT = 64


def build_model(path: Path, max_length: int, window: int) -> None:
    import transformers

    config = transformers.MistralConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_length, sliding_window=window, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.MistralForCausalLM(config).save_pretrained(path)


def measure(impl: str, path: str, new: int) -> dict:
    """Runs in a child process: load, warm up, then one generation."""
    prompt = torch.randint(0, 4096, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    cache_bytes = None
    if impl == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()

        def run():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
            return out[0, PROMPT:].tolist()
        with torch.no_grad():
            model.generate(torch.tensor([prompt[:8]]), max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    else:
        import scribelm
        import scribelm.generate as generation
        from scribelm.cache import new_cache
        from scribelm.generate import BatchGeneration
        from scribelm.sampling import SamplingSettings

        if impl == "scribelm full cache":
            generation.new_cache = lambda *args, **options: new_cache(*args, **{**options, "rolling": False})
        lm = scribelm.load(path)
        settings = SamplingSettings(max_new_tokens=new, temperature=0)
        holder = {}

        def run():
            gen = BatchGeneration(lm.model, None, [prompt], settings)
            tokens = gen.run()[0].token_ids
            holder["cache_bytes"] = gen.cache.nbytes()
            return tokens
        BatchGeneration(lm.model, None, [prompt[:8]], SamplingSettings(max_new_tokens=4, temperature=0)).run()
    base = reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens = run()
    seconds = time.perf_counter() - t0
    if impl != "transformers":
        cache_bytes = holder["cache_bytes"]
    return {"impl": impl, "new": new, "peak_mb": (peak_kb() - base) / 1024, "tokens_per_s": len(tokens) / seconds,
            "cache_mb": None if cache_bytes is None else cache_bytes / 2**20, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, path, new = args.child
        print(json.dumps(measure(impl, path, int(new))))
        return

    impls = ["scribelm rolling", "scribelm full cache", "transformers"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build_model(path, PROMPT + max(args.new), args.window)
        print(f"greedy generation after a {PROMPT}-token prompt, window {args.window}; "
              "KV cache MiB, peak memory growth MiB, tokens/s (fresh process each)")
        for new in args.new:
            results = {}
            for impl in impls:
                out = subprocess.run([sys.executable, __file__, "--child", impl, str(path), str(new)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"  {impl} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                    continue
                results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{new} new tokens")
            for impl, r in results.items():
                cache = f"cache {r['cache_mb']:7.2f} MiB, " if r["cache_mb"] is not None else " " * 20
                print(f"  {impl:>20}: {cache}peak +{r['peak_mb']:7.1f} MiB, {r['tokens_per_s']:7.1f} tokens/s")
            ours, theirs = results.get("scribelm rolling"), results.get("transformers")
            if ours and theirs:
                same = next((i for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"])) if a != b), None)
                print(f"  rolling / transformers: {ours['peak_mb'] / max(theirs['peak_mb'], 1e-9):.2f}x memory, "
                      f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s; tokens "
                      + ("identical" if same is None else f"agree for the first {same}"))


if __name__ == "__main__":
    main()
