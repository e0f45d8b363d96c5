"""Retrieval speed and size: indexing throughput, query latency per mode, index size on disk.

    python benchmarks/rag.py                                   # 1,000 chunks indexed; latency at 10K and 100K
    python benchmarks/rag.py --index-chunks 10000 --threads 2  # the 10K-chunk indexing goal
    python benchmarks/rag.py --sizes 10000 --skip-indexing     # latency at 10K only

1. Indexing: `rag.build_index` over chunks of the bundled King James corpus (chapters of
   about `--chunk-tokens` MiniLM tokens), timed end to end (read, chunk, embed, BM25,
   faiss, atomic write): chunks/s. Embedding dominates, so the same chunk texts are also
   encoded by scribelm's `LM.embed` and by sentence-transformers, taking turns: sentences/s
   of each and the ratio.
2. Query latency at each of `--sizes` chunks, per mode, p50 and p95 over `--queries`
   queries (excluding answer generation; dense and hybrid include embedding the query with
   MiniLM). BM25 indexes real text (verses and runs of verses); the dense vectors are
   random unit vectors (faiss' search time does not depend on where vectors come from, and
   random ones are the hardest case for HNSW). Past 50,000 vectors the dense index is HNSW.
3. Index size on disk at each size.

Goals: 10K chunks indexed in under 2 minutes on 2 CPU cores; hybrid p95 under 50 ms at 100K.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scribelm import rag  # noqa: E402
from scribelm.data.corpora import kjv_chapters, kjv_jsonl_path  # noqa: E402
from scribelm.rag.bm25 import BM25Index  # noqa: E402
from scribelm.rag.dense import DenseIndex, minilm_path  # noqa: E402
from scribelm.rag.store.index import FORMAT, VERSION, Index, _write, chunk_id  # noqa: E402


def verses() -> list[str]:
    with open(kjv_jsonl_path(), encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_indexing(args, work: Path) -> None:
    import scribelm
    from sentence_transformers import SentenceTransformer

    chapters = kjv_chapters()
    docs = work / "docs"
    docs.mkdir()
    rows, words = [], args.chunk_tokens * 3 // 4  # ~0.75 words per MiniLM token for this text
    for chapter in chapters:
        text = chapter.split("\n", 1)[1]
        tokens = text.split()
        for start in range(0, len(tokens), words):
            rows.append(" ".join(tokens[start:start + words]))
            if len(rows) == args.index_chunks:
                break
        if len(rows) == args.index_chunks:
            break
    # one JSONL row per chunk-sized document, so the index holds `index_chunks` chunks
    (docs / "kjv.jsonl").write_text("".join(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(rows)))
    lm = scribelm.load(minilm_path())
    start = time.perf_counter()
    index = rag.build_index(work / "index", [docs], embedder=lm, chunk_tokens=args.chunk_tokens + 40, overlap=0)
    seconds = time.perf_counter() - start
    print(f"indexing: {len(index)} chunks in {seconds:.1f} s = {len(index) / seconds:.1f} chunks/s "
          f"(goal: 10,000 in 120 s = 83 chunks/s); on disk {dir_size(index.path) / 2**20:.1f} MiB")

    sample = rows[: min(len(rows), args.embed_sample)]
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    ours, theirs = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        lm.embed(sample, batch_size=32)
        ours.append(len(sample) / (time.perf_counter() - t))
        t = time.perf_counter()
        st.encode(sample, batch_size=32, normalize_embeddings=True)
        theirs.append(len(sample) / (time.perf_counter() - t))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"embedding {len(sample)} chunks: scribelm {a:.1f} sentences/s, sentence-transformers {b:.1f} sentences/s, "
          f"ratio {a / b:.2f}")


def synthetic_index(size: int, texts: list[str], embedder, work: Path) -> Index:
    chunk_texts = []
    width = 1
    while len(chunk_texts) < size:  # verses, then pairs, triples, ... of consecutive verses
        chunk_texts.extend(" ".join(texts[i:i + width]) for i in range(0, len(texts) - width + 1, width))
        width += 1
    chunk_texts = list(dict.fromkeys(chunk_texts))[:size]
    rows = [{"id": chunk_id(t), "text": t, "source": "kjv", "doc": f"c{i}", "start": 0, "end": len(t)}
            for i, t in enumerate(chunk_texts)]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(rows), embedder.config.d_model)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    t = time.perf_counter()
    bm25 = BM25Index.build(chunk_texts)
    dense = DenseIndex.build(vectors)
    build = time.perf_counter() - t
    manifest = {"format": FORMAT, "version": VERSION, "chunks": len(rows), "duplicates": 0,
                "embedder": {"name": "minilm", "hash": "", "dim": embedder.config.d_model, "source": None},
                "dense": {"kind": dense.kind, "vectors": len(dense)}, "files": {}}
    path = work / f"index-{size}"
    _write(path, manifest, rows, bm25, dense)
    print(f"\n{size:,} chunks: BM25 + {dense.kind} index built in {build:.1f} s; on disk {dir_size(path) / 2**20:.1f} MiB")
    return Index(path, manifest, rows, bm25, dense, embedder)


def bench_latency(args, work: Path) -> None:
    import scribelm

    embedder = scribelm.load(minilm_path())
    texts = verses()
    rng = np.random.default_rng(1)
    queries = [" ".join(texts[i].split()[:8]) for i in rng.choice(len(texts), args.queries, replace=False)]
    for size in args.sizes:
        index = synthetic_index(size, texts, embedder, work)
        for mode in rag.MODES:
            index.search(queries[0], k=5, mode=mode)  # warm up
            times = []
            for query in queries:
                t = time.perf_counter()
                index.search(query, k=5, mode=mode)
                times.append((time.perf_counter() - t) * 1000)
            print(f"  {mode:7} p50 {percentile(times, 50):7.1f} ms   p95 {percentile(times, 95):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-chunks", type=int, default=1000)
    parser.add_argument("--chunk-tokens", type=int, default=160)
    parser.add_argument("--embed-sample", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-indexing", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_indexing:
            bench_indexing(args, Path(tmp))
        if not args.skip_latency:
            bench_latency(args, Path(tmp))


if __name__ == "__main__":
    main()
