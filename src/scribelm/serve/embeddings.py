"""`POST /v1/embeddings`: OpenAI's embeddings API over `LM.embed`.

    {"model": "minilm", "input": ["a text", "another"], "encoding_format": "float"}
      -> {"object": "list", "model": "minilm",
          "data": [{"object": "embedding", "index": 0, "embedding": [0.01, ...]}, ...],
          "usage": {"prompt_tokens": 9, "total_tokens": 9}}

`input` is a string, a list of strings, a list of token ids or a list of such
lists (ids are used as given: no special tokens are added). The vectors are
`scribelm.embed`'s: the pooling a sentence-transformers directory names, else
mean pooling for encoders (BERT, MiniLM) and the last token for decoders;
always unit length, so a dot product is the cosine similarity.
`encoding_format: "base64"` sends each vector as its little-endian float32
bytes, base64-encoded (what the official `openai` client asks for by default
and decodes itself). `dimensions` is accepted only when it equals the model's
width: these vectors cannot be shortened.

Too long: as OpenAI does, an input longer than the model's embedding length
(a sentence-transformers `max_seq_length`, else its context) is refused with a
400 that names the limit; `"truncate": true` (scribelm's extension) cuts it
there instead, as sentence-transformers does.

Threading. An encoder has no decode engine: `EmbeddingModel` stands in its
place in the `ModelPool` and its chat and completion routes answer a 400. A
decoder's embeddings run beside its engine (read-only weights, no KV cache).
Either way the forward passes run in worker threads, never on the event loop,
one batch at a time per model: requests that arrive while a batch runs wait,
and the next waiting request embeds all of them in one `embed_ids` call
(`Embedder`), so concurrent small requests share a batch.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from scribelm.embed import embed_ids, embedding_ids, embedding_length
from scribelm.errors import ScribeError
from scribelm.serve.errors import ApiError

#: Texts embedded together at most in one `embed_ids` call across waiting requests.
MAX_BATCH_TEXTS = 256
#: Requests that may wait for a model's embedder before 429.
MAX_WAITING = 64


class EmbeddingQueueFullError(ScribeError):
    """Too many requests wait for a model's embedder; try again later."""


@dataclass
class _Job:
    encoded: list[list[int]]
    done: bool = False
    vectors: torch.Tensor | None = None
    error: BaseException | None = None


class Embedder:
    """One model's embedding batches: `embed` blocks (call it from a worker thread)."""

    def __init__(self, lm, *, max_batch_texts: int = MAX_BATCH_TEXTS, max_waiting: int = MAX_WAITING) -> None:
        self.lm, self.max_batch_texts, self.max_waiting = lm, max_batch_texts, max_waiting
        self._waiting: deque[_Job] = deque()
        self._waiting_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one forward batch at a time
        self.batches = 0  # embed_ids calls so far (fewer than requests when requests share batches)

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def embed(self, encoded: list[list[int]]) -> torch.Tensor:
        """(N, C) unit vectors of the token-id lists, computed with those of requests waiting alongside."""
        job = _Job(encoded)
        with self._waiting_lock:
            if len(self._waiting) >= self.max_waiting:
                raise EmbeddingQueueFullError(f"{len(self._waiting)} embedding requests are waiting (the limit is {self.max_waiting})")
            self._waiting.append(job)
        with self._run_lock:
            while not job.done:  # earlier requests first; ours is in one of these batches
                self._run_batch(self._take_batch())
        if job.error is not None:
            raise job.error
        return job.vectors

    def _take_batch(self) -> list[_Job]:
        with self._waiting_lock:
            batch, texts = [], 0
            while self._waiting and (not batch or texts + len(self._waiting[0].encoded) <= self.max_batch_texts):
                job = self._waiting.popleft()
                batch.append(job)
                texts += len(job.encoded)
            return batch

    def _run_batch(self, batch: list[_Job]) -> None:
        self.batches += 1
        try:
            vectors = embed_ids(self.lm, [ids for job in batch for ids in job.encoded])  # (N, C)
        except BaseException as err:  # every request of the batch hears of it; the next batch goes on
            for job in batch:
                job.error, job.done = err, True
            return
        start = 0
        for job in batch:
            job.vectors, job.done = vectors[start:start + len(job.encoded)], True
            start += len(job.encoded)


def embedder_of(engine) -> Embedder:
    """The engine's embedder, made on first use; it lives and is unloaded with the engine."""
    embedder = getattr(engine, "embedder", None)
    if embedder is None:
        with _make_lock:
            embedder = getattr(engine, "embedder", None)
            if embedder is None:
                embedder = engine.embedder = Embedder(engine.lm)
    return embedder


_make_lock = threading.Lock()


class EmbeddingModel:
    """What the `ModelPool` holds for an encoder (BERT, MiniLM): no decode engine, an embedder,
    and the facts the API reads of an engine (name, tokenizer, context, queue)."""

    embedding_only = True
    chat_template = None
    chat_stop: tuple[str, ...] = ()
    active_count = 0

    def __init__(self, lm, *, name: str = "model", max_queue: int = MAX_WAITING) -> None:
        if lm.tokenizer is None:
            raise ScribeError(f"model {name!r} has no tokenizer.json; embedding needs one to turn text into ids")
        self.lm, self.name = lm, name
        self.tokenizer, self.config = lm.tokenizer, lm.config
        self.context_length = self.config.context_length
        self.embedder = Embedder(lm, max_waiting=max_queue)
        self.last_used = time.monotonic()

    @property
    def queue_depth(self) -> int:
        return self.embedder.pending

    @property
    def busy(self) -> bool:
        return self.embedder.pending > 0

    def tokens_per_second(self, window: float = 10.0) -> float:
        return 0.0  # it generates nothing

    def start(self) -> "EmbeddingModel":
        return self

    def stop(self, timeout: float = 5.0) -> None:
        pass  # no thread of its own: a running batch finishes in its request's worker thread


def is_embedding_only(lm) -> bool:
    """An encoder (bidirectional attention) embeds but does not generate."""
    return not lm.config.causal and not getattr(lm.model, "is_encoder_decoder", False)


# ----------------------------------------------------------------------------- one request


def _token_lists(engine, inputs, truncate: bool) -> list[list[int]]:
    """`input` -> token-id lists; a bad or too long one raises ApiError(400)."""
    lm = engine.lm
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    given_ids = not isinstance(texts[0], str)
    if given_ids and isinstance(texts[0], int):  # one list of ids
        texts = [texts]
    if given_ids:
        encoded = [list(ids) for ids in texts]
        limit = embedding_length(lm)
        vocab = lm.config.vocab_size
        for i, ids in enumerate(encoded):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ApiError(400, f"input[{i}]: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="input")
    else:
        try:
            encoded, limit = embedding_ids(lm, texts, truncate=truncate)  # cut by the tokenizer, which keeps [SEP]
        except (ScribeError, UnicodeError, ValueError, TypeError) as err:
            raise ApiError(400, f"the input could not be tokenized: {err}", param="input") from None
    for i, ids in enumerate(encoded):
        if not ids:
            raise ApiError(400, f"input[{i}] encodes to no tokens; give at least one", param="input")
        if len(ids) > limit and not truncate:
            raise ApiError(400, f"input[{i}] has {len(ids)} tokens, more than this model's embedding length of "
                                f"{limit}; shorten it, or send \"truncate\": true to cut it there", param="input")
    if given_ids and any(len(ids) > limit for ids in encoded):  # ids are cut as given
        encoded = [ids[:limit] for ids in encoded]
    return encoded


def embed_request(engine, req) -> dict:
    """The response body of one validated `EmbeddingRequest` (blocking: call it in a worker thread)."""
    width = engine.lm.config.d_model
    if req.dimensions is not None and req.dimensions != width:
        raise ApiError(400, f"model {engine.name!r} makes embeddings of {width} dimensions and cannot shorten them; "
                            f"leave out 'dimensions' or send {width}", param="dimensions")
    encoded = _token_lists(engine, req.input, req.truncate)
    try:
        vectors = embedder_of(engine).embed(encoded)  # (N, C)
    except EmbeddingQueueFullError as err:
        raise ApiError(429, str(err), type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    tokens = sum(len(ids) for ids in encoded)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encoded_vector(v, req.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": engine.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encoded_vector(vector: torch.Tensor, encoding_format: str):
    if encoding_format == "base64":  # float32 little-endian bytes, as OpenAI sends them
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
