"""Load test of `scribe serve`: N concurrent streaming clients for M seconds, on loopback.

    python benchmarks/serve_load.py                       # a random-init model, concurrency 1 and 8
    python benchmarks/serve_load.py --model my-model --concurrency 1 4 8 16 --seconds 20

For each concurrency the clients send streaming completions back to back
(each `--max-tokens` long; the end tokens are biased away so every request
generates the same amount) for `--seconds` seconds, bounded by `--max-requests`.
It reports aggregate throughput (generated tokens/s over the wall time), time
to first token p50/p95, per-request decode speed and errors (which must be 0
below the queue limit), then the ratio of aggregate tokens/s at the highest
concurrency to concurrency 1: what continuous batching buys.

The server is the real `scribe serve` in a subprocess bound to 127.0.0.1, so
clients and server do not share an interpreter lock.

Side by side with llama.cpp's server:

    python benchmarks/serve_load.py --vs-llama-cpp --threads 1 --concurrency 1 8 16 --rounds 2

exports the same weights to GGUF (f32, `scribelm.interop.gguf`), starts
llama-cpp-python's OpenAI-compatible server on them (`pip install
'llama-cpp-python[server]'`; one thread, `--threads`) next to `scribe serve`,
and runs each concurrency level on both, alternating, `--rounds` times (the
machine may be shared: the spread of the rounds says how noisy it was). It
prints both tables (medians over rounds) and scribe/llama.cpp ratios. The same
requests go to both: same prompts, seeds, max_tokens and the special tokens
biased away, so every request generates exactly max_tokens tokens (llama.cpp's
stream reports no usage; a request that ends by length counts max_tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CORPUS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse.",
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly.",
] * 50


def build_model(directory: Path, args) -> Path:
    """A random-init model with a small trained tokenizer (no downloads)."""
    import torch

    from scribelm import LM, ModelConfig, Tokenizer, Transformer

    tokenizer = Tokenizer.train(CORPUS, vocab_size=1024, min_frequency=2)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, context_length=1024, d_model=args.d_model, n_layers=args.n_layers,
        n_heads=8, n_kv_heads=4, activation="swiglu", norm="rmsnorm", position="rope", qkv_bias=False,
        attn_out_bias=False, mlp_bias=False, tie_embeddings=True, name="bench",
    )
    torch.manual_seed(0)
    return LM(Transformer(config).eval(), tokenizer).save(directory / "bench-model")


def start_server(model: str, args, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`scribe serve bench=MODEL` on a free loopback port (args: max_batch, max_queue, threads).
    Its log goes to a file: it writes a line per request, and a pipe nobody reads fills and stalls it."""
    command = [sys.executable, "-m", "scribelm.cli", "serve", f"bench={model}", "--host", "127.0.0.1", "--port", "0",
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--idle-unload", "0", *extra]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def failed(why: str) -> SystemExit:
        proc.kill()
        log.seek(0)
        return SystemExit(f"{why}: {log.read()[-2000:]}")

    for _ in range(2):
        line = proc.stdout.readline()
        if "chat page:" in line:
            base = line.split("chat page:")[1].split()[0].rstrip("/")
            break
    else:
        raise failed("the server did not start")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(base + "/health", timeout=2)
            return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    raise failed("the server did not answer /health")


def start_llama_cpp_server(gguf: Path, args) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's OpenAI-compatible server on a GGUF file, bound to a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = str(args.threads or os.cpu_count())
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench",
               "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "1024",
               "--host", "127.0.0.1", "--port", str(port), "--verbose", "False",
               "--interrupt_requests", "False"]  # by default a new request cuts off the one streaming
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server did not start (is 'llama-cpp-python[server]' installed?): "
                             f"{proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("llama_cpp.server did not answer /v1/models")


async def one_request(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float | None, int, float]:
    """Stream one completion; returns (time to first token, tokens, seconds)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None and '"text": ""' not in line:
                first = time.perf_counter() - start
            if '"usage": {' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif not tokens and '"finish_reason": "length"' in line:  # a server that streams no usage
                tokens = body["max_tokens"]
    return first, tokens, time.perf_counter() - start


async def run_level(base: str, concurrency: int, args, special_ids: list[int]) -> dict:
    prompts = [c[: 20 + 7 * i] for i, c in enumerate(CORPUS[:4])]
    deadline = time.monotonic() + args.seconds
    results: list[tuple[float | None, int, float]] = []
    errors: list[str] = []
    sent = 0

    async def client_loop(k: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient() as client:
            i = 0
            while time.monotonic() < deadline and sent < args.max_requests:
                sent += 1
                body = {"model": "bench", "prompt": prompts[(k + i) % len(prompts)], "max_tokens": args.max_tokens,
                        "temperature": 0.8, "seed": k * 1000 + i, "stream": True, "stream_options": {"include_usage": True},
                        "logit_bias": {str(t): -100 for t in special_ids}}
                try:
                    results.append(await one_request(client, base, body))
                except Exception as err:  # counted, not fatal: the report says how many
                    errors.append(str(err))
                i += 1

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(concurrency)))
    wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results if r[0] is not None)
    tokens = sum(r[1] for r in results)

    def percentile(values, q):
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")

    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
        "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 0.5), "ttft_p95_ms": 1000 * percentile(ttfts, 0.95),
        "per_request_tokens_per_s": statistics.mean(r[1] / r[2] for r in results) if results else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or store name (default: build a random-init one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=8.0, help="duration per concurrency level")
    parser.add_argument("--max-requests", type=int, default=400, help="bound on requests per level")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--vs-llama-cpp", action="store_true",
                        help="also run every level on llama-cpp-python's server on the same weights (GGUF f32)")
    parser.add_argument("--rounds", type=int, default=1, help="with --vs-llama-cpp: alternating rounds per level")
    args = parser.parse_args()
    if max(args.concurrency) > args.max_batch + args.max_queue:
        raise SystemExit("concurrency above max-batch + max-queue would measure 429s; raise --max-queue")
    if args.vs_llama_cpp:
        side_by_side(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_model(Path(tmp), args))
        from scribelm.store import resolve_model_path
        from scribelm.tokenizer import Tokenizer

        model_dir = resolve_model_path(model)
        special = sorted(Tokenizer.load(model_dir).special_ids)
        proc, base = start_server(str(model_dir), args)
        try:
            asyncio.run(run_level(base, 1, argparse.Namespace(**{**vars(args), "seconds": 1.0, "max_requests": 3}), special))  # warm-up
            levels = [asyncio.run(run_level(base, c, args, special)) for c in args.concurrency]
        finally:
            proc.terminate()
            proc.wait(10)

    if args.json:
        print(json.dumps(levels, indent=2))
        return
    print(f"scribe serve load test: {base} (loopback), max_tokens {args.max_tokens}, {args.seconds:.0f} s per level, "
          f"max_batch {args.max_batch}, server torch threads {args.threads or 'default'}")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'per-request tok/s':>18}")
    for r in levels:
        print(f"{r['concurrency']:>7} {r['requests']:>8} {r['errors']:>6} {r['tokens']:>7} {r['tokens_per_s']:>9.1f} "
              f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p95_ms']:>7.0f}ms {r['per_request_tokens_per_s']:>18.1f}")
        if r["first_error"]:
            print(f"        first error: {r['first_error']}")
    base_level = next((r for r in levels if r["concurrency"] == 1), None)
    if base_level and base_level["tokens_per_s"] > 0:
        for r in levels:
            if r["concurrency"] != 1:
                print(f"aggregate tokens/s at concurrency {r['concurrency']} vs 1: {r['tokens_per_s'] / base_level['tokens_per_s']:.2f}x")


def side_by_side(args) -> None:
    """Every level on both servers, alternating, `--rounds` times; medians and scribe/llama.cpp ratios."""
    from scribelm import load
    from scribelm.interop.gguf import export_gguf
    from scribelm.store import resolve_model_path
    from scribelm.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = resolve_model_path(args.model or str(build_model(Path(tmp), args)))
        gguf = export_gguf(load(model_dir), Path(tmp) / "bench.gguf", type="f32")
        special = sorted(Tokenizer.load(model_dir).special_ids)
        servers = {}
        try:
            servers["scribe"] = start_server(str(model_dir), args)
            servers["llama.cpp"] = start_llama_cpp_server(gguf, args)
            warm = argparse.Namespace(**{**vars(args), "seconds": 1.0, "max_requests": 3})
            for _, base in servers.values():
                asyncio.run(run_level(base, 1, warm, special))
            runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in args.concurrency} for name in servers}
            for _ in range(args.rounds):
                for c in args.concurrency:
                    for name, (_, base) in servers.items():
                        runs[name][c].append(asyncio.run(run_level(base, c, args, special)))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)

    def median(name, c, key):
        return statistics.median(r[key] for r in runs[name][c])

    print(f"scribe serve vs llama-cpp-python server, same weights (GGUF f32), loopback, max_tokens {args.max_tokens}, "
          f"{args.seconds:.0f} s per level, {args.rounds} round(s), threads {args.threads or 'default'} each")
    print(f"{'server':>10} {'clients':>7} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'(rounds)':>17} {'TTFT p50':>9} {'TTFT p95':>9}")
    for name in servers:
        for c in args.concurrency:
            rs = runs[name][c]
            spread = "/".join(f"{r['tokens_per_s']:.0f}" for r in rs)
            print(f"{name:>10} {c:>7} {sum(r['requests'] for r in rs):>8} {sum(r['errors'] for r in rs):>6} "
                  f"{median(name, c, 'tokens_per_s'):>9.1f} {spread:>17} {median(name, c, 'ttft_p50_ms'):>7.0f}ms "
                  f"{median(name, c, 'ttft_p95_ms'):>7.0f}ms")
    for c in args.concurrency:
        ratio = median("scribe", c, "tokens_per_s") / median("llama.cpp", c, "tokens_per_s")
        ttft = median("scribe", c, "ttft_p50_ms") / median("llama.cpp", c, "ttft_p50_ms")
        ttft95 = median("scribe", c, "ttft_p95_ms") / median("llama.cpp", c, "ttft_p95_ms")
        print(f"concurrency {c:>2}: scribe / llama.cpp tokens/s {ratio:.2f}x, TTFT p50 {ttft:.2f}x, p95 {ttft95:.2f}x (lower is better)")


if __name__ == "__main__":
    main()
