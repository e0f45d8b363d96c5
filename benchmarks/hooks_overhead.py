"""What the named activations cost: decode speed with and without them, and
`run_with_cache` against TransformerLens on the same GPT-2.

    python benchmarks/hooks_overhead.py
    python benchmarks/hooks_overhead.py --width 768 --layers 12 --heads 12   # GPT-2 small's shape

Builds a random-init `transformers.GPT2LMHeadModel`, saves it, and loads it with
`scribelm.load` (accelerated, as users get it) and with TransformerLens'
`TransformerBridge.boot_transformers`. Then, side by side in one run:

    decode        greedy tokens/s with a KV cache (prefill excluded), for
                    fresh              the model as loaded
                    after hooks        the same model after run_with_cache and run_with_hooks
                                       (they attach for one call and remove everything)
                    one hook attached  inside hooks_attached() with one resid_post hook that returns None
    run_with_cache  one forward pass over the prompt keeping every named activation,
                    scribelm against the bridge (same names, no folding)

and prints ratios to "fresh" and to TransformerLens. The variants take turns within
each repeat; timings are medians. On a shared machine they move, so compare ratios
from one run.
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
from scribelm.cache import KVCache  # noqa: E402
from scribelm.inspect import hooks_attached, run_with_cache, run_with_hooks  # noqa: E402


@torch.inference_mode()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    cache = KVCache(model.config, 1, prompt.shape[1] + new_tokens)
    next_id = model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        next_id = model(next_id, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return new_tokens / (time.perf_counter() - start)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.prompt + args.new_tokens, n_embd=args.width,
                        n_layer=args.layers, n_head=args.heads, bos_token_id=0, eos_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(config).eval().save_pretrained(tmp)
        fresh = scribelm.load(tmp)  # never sees a hook
        lm = scribelm.load(tmp)  # the same weights, used with hooks below
        bridge = TransformerBridge.boot_transformers(tmp, device="cpu")
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ours = run_with_cache(lm, prompt)
        _, theirs = bridge.run_with_cache(prompt)
    diff = max((ours[n] - theirs[n]).abs().max().item() for n in ours if n in theirs and not n.endswith("attn_scores"))
    print(f"GPT-2 shape: width {args.width}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}; "
          f"{args.threads} threads; largest activation difference to TransformerLens {diff:.1e}")
    run_with_hooks(lm, prompt, {"blocks.0.attn.hook_z": lambda z, hook: z * 1.0, "blocks.0.attn.hook_pattern": lambda p, hook: None})

    decode = {"fresh": [], "after hooks": [], "one hook attached": []}
    cache_time = {"scribelm": [], "TransformerLens": []}
    for _ in range(args.repeats):
        decode["fresh"].append(decode_tokens_per_second(fresh.model, prompt, args.new_tokens))
        decode["after hooks"].append(decode_tokens_per_second(lm.model, prompt, args.new_tokens))
        with hooks_attached(lm, {f"blocks.{args.layers - 1}.hook_resid_post": lambda t, hook: None}):
            decode["one hook attached"].append(decode_tokens_per_second(lm.model, prompt, args.new_tokens))
        cache_time["scribelm"].append(timed(lambda: run_with_cache(lm, prompt)))
        with torch.no_grad():
            cache_time["TransformerLens"].append(timed(lambda: bridge.run_with_cache(prompt)))

    base = statistics.median(decode["fresh"])
    print(f"\ndecode, {args.new_tokens} new tokens after a {args.prompt}-token prompt (batch 1, greedy)")
    for name, values in decode.items():
        tps = statistics.median(values)
        print(f"  {name:<18} {tps:9.1f} tok/s   {tps / base:6.3f}x fresh")
    ours_s, theirs_s = statistics.median(cache_time["scribelm"]), statistics.median(cache_time["TransformerLens"])
    print(f"\nrun_with_cache, every activation, {args.prompt} tokens")
    print(f"  scribelm         {1000 * ours_s:8.2f} ms")
    print(f"  TransformerLens  {1000 * theirs_s:8.2f} ms")
    print(f"  scribelm / TransformerLens speed: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
