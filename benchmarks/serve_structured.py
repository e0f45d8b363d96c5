"""Cost of structured output per decode step: the same batch decoded with and without a JSON-schema mask.

    python benchmarks/serve_structured.py                          # vocab 8192, d_model 256, batch 1 and 8
    python benchmarks/serve_structured.py --vocab 16384 --batch 1 4 16

A byte-level BPE is trained on the bundled King James Bible, a random-init
model of the given size decodes `--steps` tokens per row through the decode
core (the engine's own step), once unconstrained and once with every row held
to a JSON schema by llguidance. It prints ms per step for both, the ratio, and
the time the masks alone took (computing the allowed-token bitmask and applying
it), so that the mask's share of the step is visible.
"""

from __future__ import annotations

import argparse
import time

import torch

from scribelm.cache import KVCache
from scribelm.config import ModelConfig
from scribelm.data.corpora import kjv_chapters
from scribelm.decode import DecodeRow, decode_step, feed, prefill
from scribelm.model import Transformer
from scribelm.sampling import SamplingSettings
from scribelm.structured import GrammarConstraint, grammar_from_json_schema
from scribelm.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "rating": {"type": "number"}, "fiction": {"type": "boolean"}}, "required": ["title", "year", "tags"],
    "additionalProperties": False}


def run(model, tokenizer, batch: int, steps: int, constrained: bool, grammar: str) -> tuple[float, float]:
    """(ms per step, ms per step spent in masks) for `batch` rows decoding `steps` tokens."""
    config = model.config
    cache = KVCache(config, batch, 64 + steps + 1)
    prompt = tokenizer.encode("And God said, Let there be light: and there was light.")
    settings = SamplingSettings(max_new_tokens=steps + 1, temperature=1.0, seed=0)
    rows = [DecodeRow(b, prompt, settings, tokenizer=tokenizer, vocab_size=config.vocab_size, seed_offset=b)
            for b in range(batch)]
    mask_seconds = [0.0]
    if constrained:
        for row in rows:
            row.constraint = GrammarConstraint(tokenizer, grammar, config.vocab_size)
            original = row.constraint.mask_

            def timed(logits, original=original):
                t = time.perf_counter()
                original(logits)
                mask_seconds[0] += time.perf_counter() - t

            row.constraint.mask_ = timed
    with torch.inference_mode():
        logits = prefill(model, cache, 0, [prompt] * batch)
        decode_step(rows, logits, [True] * batch)
        mask_seconds[0] = 0.0
        started = time.perf_counter()
        done = 0
        for _ in range(steps):
            if any(r.done for r in rows):  # a finished JSON document: keep the batch shape, stop timing here
                break
            logits = feed(model, cache, [r.last_token for r in rows])
            decode_step(rows, logits, [True] * batch)
            done += 1
        elapsed = time.perf_counter() - started
    return 1000 * elapsed / max(done, 1), 1000 * mask_seconds[0] / max(done, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    text = kjv_chapters()[:400]
    tokenizer = Tokenizer.train(text, vocab_size=args.vocab, min_frequency=2)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=512, d_model=args.d_model, n_layers=args.layers,
                         n_heads=max(1, args.d_model // 64), d_mlp=4 * args.d_model)
    model = Transformer(config).eval()
    grammar = grammar_from_json_schema(SCHEMA)
    print(f"vocab {tokenizer.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.threads} thread(s), {args.steps} steps")
    print(f"{'batch':>5}  {'plain ms/step':>13}  {'json ms/step':>12}  {'ratio':>6}  {'mask ms/step':>12}  {'mask share':>10}")
    for batch in args.batch:
        run(model, tokenizer, batch, 4, False, grammar)  # warm-up
        plain, _ = run(model, tokenizer, batch, args.steps, False, grammar)
        constrained, masks = run(model, tokenizer, batch, args.steps, True, grammar)
        print(f"{batch:>5}  {plain:>13.2f}  {constrained:>12.2f}  {constrained / plain:>6.2f}  {masks:>12.2f}  "
              f"{masks / constrained:>10.0%}")


if __name__ == "__main__":
    main()
