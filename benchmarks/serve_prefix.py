"""Time to first token with a long shared prefix: cold (first time) vs warm (prefix cached), through `scribe serve`.

    python benchmarks/serve_prefix.py                          # 1,000-token prefix + 20-token question
    python benchmarks/serve_prefix.py --prefix 2000 --d-model 512 --n-layers 8 --trials 5

Each trial takes a fresh 1,000-token prefix (a different stretch of the King
James Bible, so nothing is cached yet) and sends prefix + question A (cold), then
prefix + question B (warm: the prefix's full blocks come from the prefix cache,
only the rest is prefilled). Prompts are sent as token ids, so the lengths are
exact. The same requests also go to a server started with `--prefix-cache-mb 0`
as a check that cold is cold. Prints median TTFT cold and warm, the ratio, and
the cached_tokens the server reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402  (the same server start-up as the load test)


def build(directory: Path, args):
    import torch

    from scribelm import LM, ModelConfig, Tokenizer, Transformer
    from scribelm.data.corpora import kjv_chapters

    chapters = kjv_chapters()
    tokenizer = Tokenizer.train(chapters[:300], vocab_size=4096, min_frequency=2)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=args.prefix + 256, d_model=args.d_model,
                         n_layers=args.n_layers, n_heads=8, n_kv_heads=4, d_mlp=4 * args.d_model, name="bench")
    torch.manual_seed(0)
    path = LM(Transformer(config).eval(), tokenizer).save(directory / "bench-model")
    stream = tokenizer.encode(" ".join(chapters[300:600]))
    prefixes = [stream[i * args.prefix : (i + 1) * args.prefix] for i in range(args.trials)]
    questions = [tokenizer.encode(" What does it say about the light, and who spoke first in it, and why?")[:20],
                 tokenizer.encode(" Which names are given here, and in what order are they written down?")[:20]]
    return path, prefixes, questions


def ttft(client: httpx.Client, base: str, ids: list[int]) -> tuple[float, int]:
    """Seconds to the first streamed token, and the cached prompt tokens the server reported.
    The client is made once and kept, as a chat client keeps its: making one (httpx loads a
    certificate bundle) takes ~20 ms, which is not the server's time."""
    body = {"model": "bench", "prompt": ids, "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, cached = None, 0
    with client.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and first is None and '"choices": [{' in line:
                first = time.perf_counter() - start
            if '"prompt_tokens_details"' in line:
                import json

                cached = json.loads(line[6:])["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=1000)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    args = parser.parse_args()
    args.max_batch, args.max_queue = 4, 16

    with tempfile.TemporaryDirectory() as tmp:
        model, prefixes, (question_a, question_b) = build(Path(tmp), args)
        rows = {}
        for label, extra in (("cache on", []), ("cache off", ["--prefix-cache-mb", "0"])):
            proc, base = start_server(str(model), args, extra)
            try:
                client = httpx.Client()
                ttft(client, base, prefixes[0][:50] + question_a)  # warm-up: load the model, first-call costs
                cold, warm, cached = [], [], []
                for prefix in prefixes:
                    cold.append(ttft(client, base, prefix + question_a)[0])
                    seconds, tokens = ttft(client, base, prefix + question_b)
                    warm.append(seconds)
                    cached.append(tokens)
                rows[label] = (statistics.median(cold), statistics.median(warm), statistics.median(cached))
            finally:
                client.close()
                proc.terminate()
                proc.wait(15)
    print(f"prefix {args.prefix} + question 20 tokens, d_model {args.d_model}, {args.n_layers} layers, "
          f"{args.threads} thread(s), median of {args.trials}")
    print(f"{'server':>10}  {'cold TTFT ms':>12}  {'warm TTFT ms':>12}  {'warm/cold':>9}  {'cached tokens':>13}")
    for label, (cold, warm, cached) in rows.items():
        print(f"{label:>10}  {1000 * cold:>12.1f}  {1000 * warm:>12.1f}  {warm / cold:>9.1%}  {cached:>13.0f}")


if __name__ == "__main__":
    main()
