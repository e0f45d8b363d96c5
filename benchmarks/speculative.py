"""Speculative decoding against plain decoding, side by side: tokens/s, speed-up, acceptance.

    python benchmarks/speculative.py                              # the tiny KJV model of tests/trained_tiny.py
    python benchmarks/speculative.py --model runs/quickstart/model --max-new-tokens 96
    python benchmarks/speculative.py --model BIG --draft SMALL    # plus draft-model speculation
    python benchmarks/speculative.py --model BIG --train-draft 300  # a 2-layer draft trained here on BIG's tokenizer

Workloads (held-out King James verses, batch 1, one prompt after another):

    quote    a passage, then its first words again: the model copies it
    revise   a passage, then a version with a few words changed: mostly copying
    free     a verse's first words, greedy: nothing to copy but the output itself
    sampled  the same at temperature 0.8: drafts are kept with probability p(draft)

Each prompt runs plain, with prompt lookup (and with the draft model), taking turns
within each repeat; the fastest of the repeats counts. Printed per workload and method:
tokens/s, speed-up over plain, acceptance (drafted tokens kept / drafted), and for
greedy workloads whether the tokens equal plain decoding's (they must). On a shared
machine absolute speeds move; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import scribelm  # noqa: E402


def passages(count: int, words: int) -> list[str]:
    from tests.trained_tiny import kjv_verses

    verses = kjv_verses()[2600:]  # after the tiny model's training text
    out, current = [], []
    for verse in verses:
        current.append(verse)
        if len(" ".join(current).split()) >= words:
            out.append(" ".join(current))
            current = []
        if len(out) == count:
            break
    return out


def revised(text: str) -> str:
    return text.replace("and ", "and then ", 2).replace("LORD", "Lord").replace("unto", "to")


def workloads(n: int, words: int) -> dict[str, tuple[list[str], dict]]:
    texts = passages(n, words)
    first = [" ".join(t.split()[:4]) for t in texts]
    greedy = {"temperature": 0}
    return {
        "quote": ([f"{t}\n\n{f}" for t, f in zip(texts, first)], greedy),
        "revise": ([f"{t}\n\n{' '.join(revised(t).split()[:6])}" for t in texts], greedy),
        "free": (first, greedy),
        "sampled": (first, {"temperature": 0.8, "seed": 0}),
    }


def train_draft(target, steps: int):
    """A 2-layer, width-64 model with the target's tokenizer, trained `steps` steps on the
    verses before the held-out ones: a draft that is much cheaper than the target."""
    from scribelm.config import ModelConfig
    from tests.trained_tiny import corpus

    torch.manual_seed(0)
    tok = target.tokenizer
    ids = torch.tensor(tok.encode(corpus()[0]))
    config = ModelConfig(vocab_size=target.config.vocab_size, context_length=target.config.context_length, d_model=64,
                         n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128, activation="swiglu", norm="rmsnorm",
                         position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False, tie_embeddings=True,
                         name="draft")
    model = scribelm.Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 65] for s in starts.tolist()])  # (16, 65)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return scribelm.LM(model.eval(), tok)


def run(lm, prompt: str, settings: dict, max_new: int, method: dict):
    start = time.perf_counter()
    c = lm.generate(prompt, max_new_tokens=max_new, return_details=True, **settings, **method)
    return time.perf_counter() - start, c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint (default: train the tiny KJV model of tests/trained_tiny.py)")
    p.add_argument("--draft", default=None, help="a smaller model with the same tokenizer, for draft-model rows")
    p.add_argument("--train-draft", type=int, default=None, metavar="STEPS",
                   help="train a 2-layer draft with the model's tokenizer for this many steps, for draft-model rows")
    p.add_argument("--num-draft", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4, help="prompts per workload")
    p.add_argument("--words", type=int, default=40, help="words per quoted passage")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.model is None:
        from tests.trained_tiny import trained_lm

        lm, name = trained_lm("llama", steps=300), "tiny KJV llama (tests/trained_tiny.py, 300 steps)"
    else:
        lm, name = scribelm.load(args.model), args.model
    methods = {"plain": {}, "prompt lookup": {"speculative": "prompt_lookup", "num_draft": args.num_draft}}
    draft = scribelm.load(args.draft) if args.draft is not None else None
    if args.train_draft:
        draft = train_draft(lm, args.train_draft)
    if draft is not None:
        methods["draft model"] = {"draft": draft, "num_draft": args.num_draft}
        size = sum(t.numel() for t in draft.model.parameters()) / 1e6
        print(f"draft: {size:.2f}M parameters")
    params = sum(t.numel() for t in lm.model.parameters()) / 1e6
    print(f"model: {name}, {params:.1f}M parameters; {args.max_new_tokens} new tokens, num_draft {args.num_draft}, "
          f"{args.threads} thread(s), best of {args.repeats}")
    lm.generate("warm up", max_new_tokens=4, temperature=0, speculative="prompt_lookup")

    words = args.words
    while True:  # passages short enough that prompt and output fit the model's context
        loads = workloads(args.prompts, words)
        longest = max(len(lm.tokenizer.encode(p)) for prompts, _ in loads.values() for p in prompts)
        if longest + args.max_new_tokens <= lm.config.context_length or words <= 4:
            break
        words -= 4
    print(f"passages of about {words} words")
    print(f"\n{'workload':<9} {'method':<14} {'tokens/s':>9} {'speed-up':>9} {'accepted':>9}  same as plain")
    for work, (prompts, settings) in loads.items():
        best = {m: [float("inf")] * len(prompts) for m in methods}
        results: dict[str, list] = {m: [None] * len(prompts) for m in methods}
        for _ in range(args.repeats):
            for i, prompt in enumerate(prompts):
                for m, method in methods.items():  # take turns: the machine's load hits all alike
                    seconds, c = run(lm, prompt, settings, args.max_new_tokens, method)
                    best[m][i] = min(best[m][i], seconds)
                    results[m][i] = c
        plain_rate = None
        for m in methods:
            tokens = sum(len(c.token_ids) for c in results[m])
            rate = tokens / sum(best[m])
            plain_rate = plain_rate or rate
            drafted = sum(c.draft_tokens or 0 for c in results[m])
            kept = sum(c.accepted_draft_tokens or 0 for c in results[m])
            acceptance = f"{kept / drafted:.0%}" if drafted else "-"
            same = "-"
            if settings["temperature"] == 0 and m != "plain":
                same = "yes" if all(a.token_ids == b.token_ids for a, b in zip(results["plain"], results[m])) else "NO"
            print(f"{work:<9} {m:<14} {rate:9.1f} {rate / plain_rate:8.2f}x {acceptance:>9}  {same}")


if __name__ == "__main__":
    main()
