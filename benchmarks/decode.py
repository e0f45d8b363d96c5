"""Prefill and decode speed: scribelm against `transformers`' generate, same weights.

    python benchmarks/decode.py                    # ~110M-parameter Llama-style model, fp32
    python benchmarks/decode.py --dtype bfloat16 --new-tokens 16 --prompt 64
    python benchmarks/decode.py --compile          # plus a row with the compiled decode step

Builds a random-init `transformers.LlamaForCausalLM`, saves it and loads the
same weights with `scribelm.load` (the Hugging Face import), checks that both
give the same logits, then times, side by side in one run:

    prefill   tokens/s for one forward pass over the prompt (batch 1 and 8)
    decode    tokens/s of greedy generation after the prompt (batch 1 and 8),
              measured as the median time between consecutive new tokens (so
              prefill is excluded); also reported as GB/s of weights read
              (every decode step reads every weight once)

and prints scribelm / transformers ratios. The two take turns within each
repeat; timings are medians. On a shared machine they move, so compare
ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import scribelm  # noqa: E402
from scribelm.generate import BatchGeneration  # noqa: E402
from scribelm.inspect.decode_traffic import weight_bytes_per_token  # noqa: E402
from scribelm.sampling import SamplingSettings  # noqa: E402


def build_pair(args, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.context,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).to(dtype).eval()
    # The same weights through scribelm's own Hugging Face import (scribelm.interop.hf).
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = scribelm.load(tmp, dtype=dtype).model.eval()
    return hf, ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=24, help="new tokens per timed generation")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="add a row for scribelm with the compiled decode step")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    import transformers
    from transformers.generation.streamers import BaseStreamer

    hf, ours = build_pair(args, dtype)
    n_params = ours.num_parameters()
    weight_bytes = weight_bytes_per_token(ours)  # what one decode step reads
    print(f"model: Llama-style, {n_params / 1e6:.1f}M parameters ({weight_bytes / 1e9:.3f} GB of {args.dtype} weights), "
          f"{args.layers} layers, width {args.width}, {args.heads} heads / {args.kv_heads} kv heads, vocab {args.vocab}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, median of {args.repeats}")

    torch.manual_seed(1)
    ids = torch.randint(0, args.vocab, (8, args.prompt))
    with torch.inference_mode():
        diff = (hf(ids[:1]).logits - ours(ids[:1])).abs().max().item()
    print(f"same weights check: max |logits difference| = {diff:.2e}")

    def ours_generate(batch_ids, n, stamps=None, compile=False):
        settings = SamplingSettings(temperature=0, max_new_tokens=n)
        gen = BatchGeneration(ours, None, batch_ids.tolist(), settings, compile=compile)
        for _ in gen:
            if stamps is not None:
                stamps.append(time.perf_counter())
        return gen.completions

    class Stamps(BaseStreamer):
        """Called by transformers with the prompt, then with every new token."""

        def __init__(self, stamps):
            self.stamps, self.calls = stamps, 0

        def put(self, value):
            if self.calls:  # the first call carries the prompt
                self.stamps.append(time.perf_counter())
            self.calls += 1

        def end(self):
            pass

    def hf_generate(batch_ids, n, stamps=None):
        with torch.inference_mode():
            return hf.generate(batch_ids, attention_mask=torch.ones_like(batch_ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0,
                               streamer=Stamps(stamps) if stamps is not None else None)

    def ours_prefill(batch_ids):
        from scribelm.cache import KVCache

        with torch.inference_mode():
            cache = KVCache(ours.config, batch_ids.shape[0], batch_ids.shape[1] + 1, dtype=dtype)
            return ours(batch_ids, cache=cache, last_only=True)[:, -1]

    def hf_prefill(batch_ids):
        with torch.inference_mode():
            return hf(batch_ids, use_cache=True, logits_to_keep=1).logits

    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        batch_ids = ids[:B]
        # greedy outputs agree (a check, not timed)
        a = [c.token_ids for c in ours_generate(batch_ids, 4)]
        b = hf_generate(batch_ids, 4)[:, args.prompt:].tolist()
        same = a == b
        impls = {"scribelm": (ours_prefill, ours_generate), "transformers": (hf_prefill, hf_generate)}
        if args.compile:  # the decode step as one compiled graph (compiled here, before the timing)
            def ours_compiled(batch_ids, n, stamps=None):
                return ours_generate(batch_ids, n, stamps, compile=True)

            same = same and [c.token_ids for c in ours_compiled(batch_ids, 4)] == a
            impls["compiled"] = (ours_prefill, ours_compiled)
        prefill_times = {name: [] for name in impls}
        gaps = {name: [] for name in impls}
        for name, (prefill, _) in impls.items():
            prefill(batch_ids)  # warm-up
        # The two take turns, repeat after repeat, so that a change in the machine's load
        # hits both alike.
        for _ in range(args.repeats):
            for name, (prefill, gen) in impls.items():
                start = time.perf_counter()
                prefill(batch_ids)
                prefill_times[name].append(time.perf_counter() - start)
                stamps: list[float] = []
                gen(batch_ids, args.new_tokens, stamps)
                gaps[name] += [b - a for a, b in zip(stamps, stamps[1:])]  # time between new tokens
        for name in impls:
            t_prefill = statistics.median(prefill_times[name])
            step = statistics.median(gaps[name])
            rows.append(dict(name=name, batch=B, prefill=B * args.prompt / t_prefill, decode=B / step,
                             gbs=weight_bytes / step / 1e9, ms=step * 1e3, same=same))

    print()
    print(f"{'':14}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}{'weights GB/s':>14}")
    for r in rows:
        print(f"{r['name']:14}{r['batch']:>6}{r['prefill']:>15.0f}{r['decode']:>14.1f}{r['ms']:>9.1f}{r['gbs']:>14.2f}")
    print()
    for B in sorted({r["batch"] for r in rows}):
        mine = next(r for r in rows if r["batch"] == B and r["name"] == "scribelm")
        theirs = next(r for r in rows if r["batch"] == B and r["name"] == "transformers")
        print(f"batch {B}: scribelm / transformers  prefill {mine['prefill'] / theirs['prefill']:.2f}x, "
              f"decode {mine['decode'] / theirs['decode']:.2f}x; greedy tokens identical: {mine['same']}")


if __name__ == "__main__":
    main()
