"""The retrieval index: a directory built from the user's files, updated in place, searched three ways.

    my-index/
      index.json          manifest: format, embedder (name, SHA-256, dimension, where to load it,
                          the dtype it computes in),
                          chunking (tokenizer, chunk_tokens, overlap), BM25 variant, dense index
                          kind, and every file indexed with its content hash and chunk count
      chunks.jsonl        one chunk per line, in file order: id, text, source, doc, start, end,
                          page, and "duplicate": true for an exact repeat of an earlier chunk
      bm25/               the BM25 state (bm25s' numpy and JSON files)
      dense.faiss         the faiss index of the chunk embeddings (row i = i-th non-duplicate chunk)

The whole directory is rebuilt beside the old one and swapped in with one rename
(`scribelm.io.atomic_directory`), so a `kill -9` during `add` leaves the previous index
or the new one, never a mix. An update re-reads only files whose SHA-256 changed and
embeds only chunks it has no vector for (a chunk's id is the hash of its text, so an
unchanged paragraph of an edited file keeps its vector). Files that disappeared from a
folder being re-added are dropped from the index.

Searching: "bm25" ranks by BM25, "dense" by cosine similarity of embeddings, "hybrid"
fuses the two rankings (each cut at `candidates`) by reciprocal rank. Every hit carries
the scores known for it: BM25 always, the cosine in dense and hybrid, RRF in hybrid.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scribelm.embed import EMBED_DTYPES
from scribelm.errors import ScribeError
from scribelm.io import OutputError, atomic_directory, claim_output_directory, read_json_object
from scribelm.rag.bm25 import DESCRIPTION as BM25_DESCRIPTION
from scribelm.rag.bm25 import BM25Index, top_rows
from scribelm.rag.chunking import check_sizes, chunk_text, token_counter
from scribelm.rag.dense import DEFAULT_EMBEDDER, DenseIndex, embed_dtype_name, embed_texts, fingerprint, load_embedder
from scribelm.rag.fusion import RRF_K, reciprocal_rank_fusion
from scribelm.rag.ingest import file_sha256, find_files, read_file

FORMAT, VERSION = "scribelm-rag-index", 1
KIND = "rag-index"
MODES = ("bm25", "dense", "hybrid")
DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP = 200, 40
MANIFEST, CHUNKS, BM25_DIR, DENSE_FILE = "index.json", "chunks.jsonl", "bm25", "dense.faiss"


class RetrievalIndexError(ScribeError):
    """An index directory that is missing, not an index, or used with the wrong embedder."""


@dataclass(frozen=True)
class Chunk:
    """A retrievable piece of a document: text[start:end] of `doc` in the file `source`."""

    id: str
    text: str
    source: str
    doc: str
    start: int
    end: int
    page: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, "doc": self.doc,
                "start": self.start, "end": self.end, "page": self.page}


@dataclass
class Hit:
    """A search result: `score` is the mode's score, `scores` every score known for it, `rank` from 1."""

    chunk: Chunk
    score: float
    scores: dict[str, float]
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, "scores": self.scores, **self.chunk.to_dict()}


@dataclass
class AddReport:
    """What one `add` did."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    chunks_embedded: int = 0
    chunks: int = 0
    duplicates: int = 0


def chunk_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _resolve_tokenizer(tokenizer, embedder_lm):
    """(Tokenizer, name) that chunk sizes are counted in."""
    from scribelm.lm import LM
    from scribelm.tokenizer import Tokenizer

    if tokenizer is None:
        if embedder_lm.tokenizer is None:
            raise ScribeError("the embedder has no tokenizer to count chunk sizes with; pass tokenizer=")
        return embedder_lm.tokenizer, "embedder"
    if isinstance(tokenizer, LM):
        return tokenizer.tokenizer, tokenizer.config.name or "model"
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, "tokenizer"
    from scribelm.store import resolve_model_path

    return Tokenizer.load(resolve_model_path(tokenizer)), str(tokenizer)


class Index:
    """An opened index directory (see the module docstring). Build with `build_index`, open with `open_index`."""

    def __init__(self, path: Path, manifest: dict[str, Any], rows: list[dict[str, Any]],
                 bm25: BM25Index | None, dense: DenseIndex | None, embedder=None, device: str = "cpu") -> None:
        self.path, self.manifest, self.rows, self.device = path, manifest, rows, device
        self.chunks = [_chunk(row) for row in rows if not row.get("duplicate")]
        self.bm25, self.dense = bm25, dense
        self._embedder = embedder
        self.last_report: AddReport | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def embedder_name(self) -> str:
        return self.manifest["embedder"]["name"]

    @property
    def embed_dtype(self) -> str:
        """What the embedder computes in for this index ("float32" for indexes that predate the choice)."""
        return self.manifest["embedder"].get("dtype", "float32")

    @property
    def embedder(self):
        """The embedding model (loaded on first use from where the manifest says, and checked)."""
        if self._embedder is None:
            info = self.manifest["embedder"]
            if info.get("source") is None:
                raise RetrievalIndexError(f"{self.path} was built with an embedder given in memory ({info['name']}); "
                                  "open it with open_index(path, embedder=that model)")
            lm, _, _ = load_embedder(info["source"], self.device)
            _check_embedder(self.path, info, fingerprint(lm), info["source"])
            self._embedder = lm
        return self._embedder

    # ------------------------------------------------------------------------------ search

    def search(self, query: str, k: int = 5, mode: str = "hybrid", *, candidates: int | None = None,
               rrf_k: int = RRF_K) -> list[Hit]:
        """The `k` best chunks for `query`, best first. `candidates`: how deep each ranking
        goes before fusion (default max(50, 4k))."""
        if not isinstance(query, str) or not query.strip():
            raise ScribeError("the query is empty")
        if mode not in MODES:
            raise ScribeError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ScribeError(f"k must be a positive integer, got {k!r}")
        if not self.chunks:
            return []
        depth = candidates or max(50, 4 * k)
        bm25_scores = self.bm25.scores(query)
        if mode == "bm25":
            rows, scores = top_rows(bm25_scores, k)
            return [Hit(self.chunks[r], float(s), {"bm25": float(s)}, i + 1) for i, (r, s) in enumerate(zip(rows, scores))]
        query_vector = embed_texts(self.embedder, [query], dtype=self.embed_dtype)[0]
        if mode == "dense":
            rows, scores = self.dense.top(query_vector, k)
            return [Hit(self.chunks[r], float(s), {"bm25": float(bm25_scores[r]), "dense": float(s)}, i + 1)
                    for i, (r, s) in enumerate(zip(rows, scores))]
        lexical, _ = top_rows(bm25_scores, depth)
        semantic, _ = self.dense.top(query_vector, depth)
        fused = reciprocal_rank_fusion([lexical.tolist(), semantic.tolist()], k=rrf_k)[:k]
        cosines = self.dense.cosine(query_vector, [r for r, _ in fused])
        return [Hit(self.chunks[r], s, {"bm25": float(bm25_scores[r]), "dense": c, "hybrid": s}, i + 1)
                for i, ((r, s), c) in enumerate(zip(fused, cosines))]

    # ------------------------------------------------------------------------------ update

    def add(self, sources: list[str | os.PathLike], *, tokenizer=None) -> AddReport:
        """Index new and changed files under `sources`, drop files gone from them, and swap the
        new directory in; returns what changed (also kept as `last_report`)."""
        report = AddReport()
        own = self.path.resolve()
        files = [f for f in find_files(list(sources)) if not f.is_relative_to(own)]  # never the index itself
        previous = self.manifest["files"]
        given_dirs = [Path(s).expanduser().resolve() for s in sources if Path(s).expanduser().is_dir()]
        counter = None
        rows_by_file: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            rows_by_file.setdefault(row["source"], []).append(row)
        files_info = dict(previous)
        found = {str(f) for f in files}
        changed = False
        for key in list(previous):
            if key not in found and any(Path(key).is_relative_to(d) for d in given_dirs):
                report.removed.append(key)
                changed = True
                files_info.pop(key)
                rows_by_file.pop(key, None)
        for file in files:
            key = str(file)
            sha = file_sha256(file)
            if key in previous and previous[key]["sha256"] == sha:
                report.unchanged.append(key)
                continue
            source = read_file(file, sha)
            changed = True
            if source.skipped:  # counted as skipped, not as added or updated
                report.skipped.append((key, source.skipped))
                files_info[key] = {"sha256": sha, "chunks": 0, "skipped": source.skipped}
                rows_by_file.pop(key, None)
                continue
            (report.updated if key in previous else report.added).append(key)
            if counter is None:
                counter = token_counter(self._chunk_tokenizer(tokenizer))
            rows = []
            for document in source.documents:
                rows.extend(_document_rows(document, counter, self.manifest["chunk_tokens"], self.manifest["overlap"]))
            rows_by_file[key] = rows
            files_info[key] = {"sha256": sha, "chunks": len(rows)}
        if not changed:
            report.chunks, report.duplicates = len(self.chunks), len(self.rows) - len(self.chunks)
            self.last_report = report
            return report
        all_rows, seen = [], set()
        for key in sorted(rows_by_file):
            for row in rows_by_file[key]:
                row = {**row, "duplicate": row["id"] in seen}
                if not row["duplicate"]:
                    row.pop("duplicate")
                seen.add(row["id"])
                all_rows.append(row)
        searchable = [row for row in all_rows if not row.get("duplicate")]
        if not searchable:
            reasons = "; ".join(f"{Path(p).name}: {why}" for p, why in report.skipped[:3])
            raise ScribeError(f"nothing to index: no text found in {len(files)} file(s)"
                              + (f" ({reasons})" if reasons else ""))
        known = {chunk.id: i for i, chunk in enumerate(self.chunks)}
        old_vectors = self.dense.vectors() if self.dense is not None else None
        new_texts = [row["text"] for row in searchable if row["id"] not in known]
        new_vectors = embed_texts(self.embedder, new_texts, dtype=self.embed_dtype)
        report.chunks_embedded = len(new_texts)
        vectors, fresh = [], iter(new_vectors)
        for row in searchable:
            vectors.append(old_vectors[known[row["id"]]] if row["id"] in known else next(fresh))
        bm25 = BM25Index.build([row["text"] for row in searchable])
        dense = DenseIndex.build(np.stack(vectors))
        manifest = {**self.manifest, "files": dict(sorted(files_info.items())), "chunks": len(searchable),
                    "duplicates": len(all_rows) - len(searchable), "dense": {"kind": dense.kind, "vectors": len(dense)}}
        _write(self.path, manifest, all_rows, bm25, dense)
        self.__init__(self.path, manifest, all_rows, bm25, dense, self._embedder, self.device)
        report.chunks, report.duplicates = len(searchable), manifest["duplicates"]
        self.last_report = report
        return report

    def _chunk_tokenizer(self, tokenizer):
        name = self.manifest["tokenizer"]
        if tokenizer is None and name == "embedder":
            return self.embedder.tokenizer
        if tokenizer is None:
            try:
                tok, _ = _resolve_tokenizer(name, None)
            except ScribeError:
                raise RetrievalIndexError(f"{self.path} counts chunk sizes with the tokenizer {name!r}, which cannot be "
                                  "loaded from here; pass it (tokenizer=, --tokenizer)") from None
            return tok
        return _resolve_tokenizer(tokenizer, None)[0]


def _chunk(row: dict[str, Any]) -> Chunk:
    return Chunk(row["id"], row["text"], row["source"], row["doc"], row["start"], row["end"], row.get("page"))


def _document_rows(document, counter, chunk_tokens: int, overlap: int) -> list[dict[str, Any]]:
    spans = [(None, 0, len(document.text))] if document.pages is None else document.pages
    rows = []
    for page, start, end in spans:
        for a, b in chunk_text(document.text, counter, chunk_tokens=chunk_tokens, overlap=overlap, start=start, end=end):
            text = document.text[a:b]
            row = {"id": chunk_id(text), "text": text, "source": document.source, "doc": document.doc,
                   "start": a, "end": b}
            if page is not None:
                row["page"] = page
            rows.append(row)
    return rows


def _write(path: Path, manifest: dict[str, Any], rows: list[dict[str, Any]], bm25: BM25Index, dense: DenseIndex) -> None:
    with atomic_directory(path, kind=KIND) as tmp:
        with open(tmp / CHUNKS, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        bm25.save(tmp / BM25_DIR)
        dense.save(tmp / DENSE_FILE)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_embedder(path: Path, info: dict[str, Any], digest: str, given: str) -> None:
    if digest != info["hash"]:
        raise RetrievalIndexError(f"{path} was built with the embedder {info['name']} (sha256 {info['hash'][:12]}), "
                          f"not {given} (sha256 {digest[:12]}): their vectors cannot be compared; "
                          "use the same embedder or build a new index")


def _read(path: Path, embedder=None, device: str = "cpu") -> Index:
    if not path.is_dir():
        raise RetrievalIndexError(f"{path} is not an index directory (build one with `scribe rag add {path} FILES...`)")
    manifest = read_json_object(path / MANIFEST, RetrievalIndexError, missing=f"{path} is not a scribelm retrieval index "
                                f"(no {MANIFEST}); build one with `scribe rag add`")
    if manifest.get("format") != FORMAT:
        raise RetrievalIndexError(f"{path / MANIFEST} is not a scribelm retrieval index manifest")
    if manifest.get("version") != VERSION:
        raise RetrievalIndexError(f"{path} is an index of format version {manifest.get('version')}; this scribelm reads {VERSION}")
    lm = None
    if embedder is not None:
        lm, name, _ = load_embedder(embedder, device)
        _check_embedder(path, manifest["embedder"], fingerprint(lm), name)
    if not manifest.get("chunks"):
        return Index(path, manifest, [], None, None, lm, device)
    try:
        with open(path / CHUNKS, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
        bm25, dense = BM25Index.load(path / BM25_DIR), DenseIndex.load(path / DENSE_FILE)
        index = Index(path, manifest, rows, bm25, dense, lm, device)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # faiss reports a bad file as RuntimeError
        raise RetrievalIndexError(f"{path} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                                  "rebuild it with `scribe rag add` into a new directory") from None
    if not len(index.chunks) == len(dense) == manifest["chunks"]:
        raise RetrievalIndexError(f"{path} is damaged (its files disagree on the number of chunks); "
                                  "rebuild it with `scribe rag add` into a new directory")
    return index


def open_index(path: str | os.PathLike, embedder=None, *, device: str = "cpu") -> Index:
    """Open an index directory. `embedder` (optional: "minilm", a MODEL string or an LM) must be
    the one the index was built with, else a ScribeError; without it the recorded one is
    loaded (on `device`) when a dense search first needs it."""
    return _read(Path(path).expanduser(), embedder, device)


def build_index(path: str | os.PathLike, sources: list[str | os.PathLike], *, embedder=None,
                chunk_tokens: int | None = None, overlap: int | None = None, tokenizer=None,
                device: str = "cpu", embed_dtype: str | None = None) -> Index:
    """Create the index at `path` from `sources` (files and folders), or update the index
    already there with them (see `Index.add`). `embedder`: "minilm" (the default for a new
    index), a MODEL string or an LM; an existing index keeps its own and refuses another. `tokenizer` counts chunk sizes: None for the
    embedder's, or the answering model (an LM, a Tokenizer or a MODEL string). `embed_dtype`:
    "auto" (the default for a new index: bfloat16 on CPUs that have it natively), "float32"
    or "bfloat16"; recorded, and an existing index keeps its own."""
    path = Path(path).expanduser()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if (path / MANIFEST).is_file():
        index = _read(path, embedder, device)
        if embed_dtype is not None and embed_dtype != "auto" and embed_dtype != index.embed_dtype:
            raise RetrievalIndexError(f"{path} embeds in {index.embed_dtype}, not {embed_dtype}; "
                                      "build a new index to change it")
        for name, value in (("chunk_tokens", chunk_tokens), ("overlap", overlap)):
            if value is not None and value != index.manifest[name]:
                raise RetrievalIndexError(f"{path} was built with {name}={index.manifest[name]}, not {value}; "
                                  "build a new index to change how documents are chunked")
        index.add(sources, tokenizer=tokenizer)
        return index
    try:
        claim_output_directory(path, kind="retrieval index")
    except OutputError as err:
        raise RetrievalIndexError(str(err)) from None
    chunk_tokens = DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    overlap = min(DEFAULT_OVERLAP, chunk_tokens // 4) if overlap is None else overlap
    check_sizes(chunk_tokens, overlap)
    if embed_dtype is not None and embed_dtype not in EMBED_DTYPES:
        raise ScribeError(f"unknown embedding dtype {embed_dtype!r}; choose one of {', '.join(EMBED_DTYPES)}")
    find_files(list(sources))  # a bad path fails before the embedder loads
    lm, name, source = load_embedder(embedder or DEFAULT_EMBEDDER, device)
    counting, tokenizer_name = _resolve_tokenizer(tokenizer, lm)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "embedder": {"name": name, "hash": fingerprint(lm), "dim": lm.config.d_model, "source": source,
                     "dtype": embed_dtype_name(lm, embed_dtype)},
        "tokenizer": tokenizer_name, "chunk_tokens": chunk_tokens, "overlap": overlap,
        "bm25": BM25_DESCRIPTION, "rrf_k": RRF_K, "dense": None, "files": {}, "chunks": 0, "duplicates": 0,
    }
    index = Index(path, manifest, [], None, None, lm, device)
    index.add(sources, tokenizer=counting)  # loaded once: the one resolved above
    return index


def add(path: str | os.PathLike, sources: list[str | os.PathLike], **options: Any) -> Index:
    """Same as `build_index`: create or update."""
    return build_index(path, sources, **options)
