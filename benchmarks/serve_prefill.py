"""Inter-token latency of running streams while a long prompt arrives: chunked prefill vs whole prompts.

    python benchmarks/serve_prefill.py                      # 4 streams, a 4,000-token prompt, chunks of 256
    python benchmarks/serve_prefill.py --streams 8 --prompt 4000 --chunk 128 --d-model 512 --n-layers 8

Two `scribe serve` processes on the same random-init model, one with
`--prefill-chunk 0` (each prompt prefilled whole, in one forward pass) and one
with `--prefill-chunk N`, measured one after the other in this run. On each,
`--streams` clients stream long completions; once they are all running a
client sends a `--prompt`-token prompt (as token ids, so the length is exact).
For the running streams it reports the gaps between consecutive tokens
received while the long prompt was being prefilled (from sending it until its
first token, plus one gap after): p50, p95 and the longest gap, and the long
prompt's own time to first token. Whole prompts make one gap as long as the
prefill; chunks spread it over many short ones, at some cost in the long
prompt's time to first token. Prints the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import CORPUS, start_server  # noqa: E402  (the same server start-up as the load test)


def build(directory: Path, args):
    import torch

    from scribelm import LM, ModelConfig, Tokenizer, Transformer

    tokenizer = Tokenizer.train(CORPUS, vocab_size=1024, min_frequency=2)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, context_length=args.prompt + 512, d_model=args.d_model, n_layers=args.n_layers,
        n_heads=8, n_kv_heads=4, activation="swiglu", norm="rmsnorm", position="rope", qkv_bias=False,
        attn_out_bias=False, mlp_bias=False, tie_embeddings=True, name="bench",
    )
    torch.manual_seed(0)
    path = LM(Transformer(config).eval(), tokenizer).save(directory / "bench-model")
    stream = tokenizer.encode(" ".join(CORPUS))
    while len(stream) < args.prompt:
        stream = stream + stream
    return path, stream[: args.prompt], sorted(tokenizer.special_ids)


async def measure(base: str, args, long_prompt: list[int], special: list[int]) -> dict:
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]  # each running stream's token times
    running = asyncio.Event()
    started = [False] * args.streams

    async def stream(k: int, client: httpx.AsyncClient) -> None:
        body = {"model": "bench", "prompt": CORPUS[k % 4][:40], "max_tokens": args.stream_tokens, "temperature": 0.8,
                "seed": k, "stream": True, "logit_bias": {str(t): -100 for t in special}}
        async with client.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    arrivals[k].append(time.perf_counter())
                    if not started[k] and len(arrivals[k]) >= 3:
                        started[k] = True
                        if all(started):
                            running.set()

    async def long_request(client: httpx.AsyncClient) -> tuple[float, float, float]:
        await running.wait()
        await asyncio.sleep(0.3)  # the streams settle into steady decoding first
        body = {"model": "bench", "prompt": long_prompt, "max_tokens": 1, "temperature": 0, "stream": True}
        sent = time.perf_counter()
        async with client.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return sent, time.perf_counter(), time.perf_counter() - sent
        raise RuntimeError("the long prompt got no token")

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.streams + 4)) as client:
        results = await asyncio.gather(*(stream(k, client) for k in range(args.streams)), long_request(client))
    sent, answered, ttft = results[-1]
    gaps = []
    for times in arrivals:
        inside = [t for t in times if sent <= t]
        after = [t for t in inside if t > answered]
        window = [t for t in inside if t <= answered] + after[:1]  # tokens during the prefill, and the one after
        before = [t for t in times if t < sent][-1:]
        window = before + window
        gaps += [b - a for a, b in zip(window, window[1:])]
        if answered > times[-1]:
            raise SystemExit("a stream ended before the long prompt was answered; raise --stream-tokens")
    steady = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b < sent]
    gaps.sort()
    return {"gaps": len(gaps), "p50_ms": 1000 * statistics.median(gaps), "p95_ms": 1000 * gaps[int(0.95 * (len(gaps) - 1))],
            "max_ms": 1000 * gaps[-1], "steady_p50_ms": 1000 * statistics.median(steady), "long_ttft_s": ttft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4, help="running streams")
    parser.add_argument("--stream-tokens", type=int, default=400, help="max_tokens of each running stream")
    parser.add_argument("--prompt", type=int, default=4000, help="tokens in the long prompt")
    parser.add_argument("--chunk", type=int, default=256, help="--prefill-chunk of the chunked server")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    args = parser.parse_args()
    args.max_batch, args.max_queue = args.streams + 1, 8

    with tempfile.TemporaryDirectory() as tmp:
        model, long_prompt, special = build(Path(tmp), args)
        rows = {}
        for chunk in (0, args.chunk):
            proc, base = start_server(str(model), args, ["--prefill-chunk", str(chunk), "--max-context",
                                                          str(args.prompt + 512), "--prefix-cache-mb", "0"])
            try:
                rows[chunk] = asyncio.run(measure(base, args, long_prompt, special))
            finally:
                proc.terminate()
                proc.wait(10)

    print(f"{args.streams} running streams, a {args.prompt}-token prompt arrives; model d_model {args.d_model}, "
          f"{args.n_layers} layers, {args.threads} torch thread(s) per server")
    print(f"{'prefill':>12} {'gaps':>5} {'p50':>8} {'p95':>8} {'longest':>9} {'steady p50':>11} {'long TTFT':>10}")
    for chunk, r in rows.items():
        name = "whole" if chunk == 0 else f"chunk {chunk}"
        print(f"{name:>12} {r['gaps']:>5} {r['p50_ms']:>6.1f}ms {r['p95_ms']:>6.1f}ms {r['max_ms']:>7.1f}ms "
              f"{r['steady_p50_ms']:>9.1f}ms {r['long_ttft_s']:>9.2f}s")
    whole, chunked = rows[0], rows[args.chunk]
    print(f"p95 inter-token latency while prefilling, whole / chunked: {whole['p95_ms'] / chunked['p95_ms']:.1f}x; "
          f"longest gap {whole['max_ms'] / chunked['max_ms']:.1f}x; long prompt's TTFT chunked / whole: "
          f"{chunked['long_ttft_s'] / whole['long_ttft_s']:.2f}x")


if __name__ == "__main__":
    main()
