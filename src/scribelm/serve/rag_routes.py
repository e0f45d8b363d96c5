"""Retrieval in the server: `scribe serve MODEL --rag docs=INDEX` answers from your documents.

A retrieval index (`scribelm.rag`, built with `scribe rag add`) is served under a
name, and every chat model gains a variant that answers from it:

    client.chat.completions.create(model="my-chat+rag:docs", messages=[..., {"role": "user", "content": "Who ...?"}])

For a `MODEL+rag:NAME` request the last message, the user's, is the query:

    query ──index.search(k, mode)──▶ hits ──rag.grounded_messages──▶ numbered sources + the question
          ──MODEL's chat template──▶ the same engine as any chat request

Earlier turns of the conversation stay (the sources are shown with the last
question only), a system message of the client's follows the citing
instructions, and passages that do not fit the context left after the
conversation and `max_tokens` are dropped whole. The answer carries the
passages the model saw, numbered as it saw them, and whether the answer cites
each (`[n]`, `rag.cited_sources`):

    non-streamed  choices[0].message.sources = [{"number": 1, "source": "notes/a.md", "page": null,
                      "start": 0, "end": 512, "id": "…", "text": "…", "score": 0.03,
                      "scores": {"bm25": …, "dense": …, "hybrid": …}, "cited": true}, ...]
    streamed      one more chunk before `data: [DONE]`: {"object": "chat.completion.chunk",
                      "choices": [], "sources": [...]}

With the `openai` client these are `message.sources` and `chunk.sources` (its
models keep extra fields). `n` must be 1 (the citations are one answer's).
`GET /v1/models` lists each variant (with `"rag": NAME`); `POST /v1/rag/search`
`{"index", "query", "k", "mode"}` returns the hits themselves, without an answer.
Searches run in worker threads, one at a time per index (its embedder loads on
the first dense search).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from scribelm.errors import ScribeError
from scribelm.rag.prompt import DEFAULT_ANSWER_TOKENS  # room kept for the answer when the request names no max_tokens
from scribelm.serve.errors import ApiError
from scribelm.serve.requests import chat_messages
from scribelm.serve.responses import json_response
from scribelm.serve.schema import ChatCompletionRequest, RagSearchRequest, parse_request

RAG_MARK = "+rag:"
DEFAULT_K, DEFAULT_MODE = 5, "hybrid"


def split_variant(model: Any) -> tuple[str, str] | None:
    """"my-chat+rag:docs" -> ("my-chat", "docs"); None for a plain model name."""
    if not isinstance(model, str) or RAG_MARK not in model:
        return None
    base, _, name = model.rpartition(RAG_MARK)
    return base, name


class ServedIndexes:
    """The retrieval indexes a server answers from, by name; searches are serialized per index."""

    def __init__(self, indexes: dict[str, Any], *, k: int = DEFAULT_K, mode: str = DEFAULT_MODE) -> None:
        from scribelm.rag import MODES

        if mode not in MODES:
            raise ScribeError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ScribeError(f"the number of passages retrieved must be a positive integer, got {k!r}")
        self.indexes, self.k, self.mode = dict(indexes), k, mode
        self._locks = {name: threading.Lock() for name in self.indexes}

    def names(self) -> list[str]:
        return list(self.indexes)

    def index(self, name: str, model: str | None = None):
        if name not in self.indexes:
            served = ", ".join(self.indexes) or "none"
            if model is not None:
                raise ApiError(404, f"The model '{model[:100]}' does not exist: no retrieval index {name[:100]!r} "
                                    f"(served: {served})", param="model", code="model_not_found")
            raise ApiError(404, f"no retrieval index {name[:100]!r} (served: {served})", param="index")
        return self.indexes[name]

    def search(self, name: str, query: str, k: int | None = None, mode: str | None = None) -> list:
        """Hits for `query`, best first (blocking: call it in a worker thread)."""
        index = self.index(name)
        with self._locks[name]:
            return index.search(query, k or self.k, mode or self.mode)

    def variant_cards(self, base_cards: list[dict]) -> list[dict]:
        """/v1/models entries for every MODEL+rag:NAME (encoders, which cannot chat, left out)."""
        return [{**card, "id": card["id"] + RAG_MARK + name, "rag": name, "root": card["id"]}
                for card in base_cards if not card.get("embedding_only") for name in self.indexes]


def source_entries(used: list, cited: list) -> list[dict]:
    """The passages the model saw, numbered as it saw them, each marked cited or not."""
    cited_ids = {id(hit) for hit in cited}
    return [{"number": n, **hit.chunk.to_dict(), "score": hit.score, "scores": hit.scores, "cited": id(hit) in cited_ids}
            for n, hit in enumerate(used, 1)]


def _history_and_question(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]], list[dict[str, str]]]:
    """(the question, the client's system text, the turns before the question)."""
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ApiError(400, "with retrieval the last message must be the user's question (a non-empty user message)",
                       param="messages")
    system = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] == "system" and m["content"].strip())
    return messages[-1]["content"], [{"role": "system", "content": system}] if system else [], \
        [m for m in messages[:-1] if m["role"] != "system"]


def grounded_conversation(engine, messages: list[dict[str, str]], hits: list, answer_tokens: int):
    """(the messages the model sees, the hits shown in them): `rag.grounded_messages` for the
    last question, the earlier turns kept between its instructions and the sources."""
    from scribelm.rag import grounded_messages

    question, system, earlier = _history_and_question(messages)
    tokenizer = engine.tokenizer
    history_tokens = 0
    if earlier:
        bare = [{"role": "user", "content": ""}]
        history_tokens = max(0, len(tokenizer.encode_chat(earlier + bare)) - len(tokenizer.encode_chat(bare)))
    if system:
        history_tokens += len(tokenizer.encode(system[0]["content"])) + 2  # its text and the two line breaks
    budget = engine.context_length - answer_tokens - history_tokens
    try:
        shown, used = grounded_messages(question, hits, engine.lm, max_context_tokens=budget)
    except ScribeError as err:
        raise ApiError(400, str(err), param="messages", code="context_length_exceeded") from None
    instructions, grounded_question = shown[0], shown[-1]
    if system:
        instructions = {"role": "system", "content": instructions["content"] + "\n\n" + system[0]["content"]}
    return [instructions, *earlier, grounded_question], used


def register_rag_routes(app, indexes: ServedIndexes, *, generate, engine_for, read_json) -> Any:
    """Add POST /v1/rag/search; returns `answer(request, body)` for MODEL+rag:NAME chat requests."""

    async def answer(request: Request, body: dict) -> Response:
        from scribelm.rag import cited_sources

        req = parse_request(ChatCompletionRequest, body)
        base, index_name = split_variant(req.model)
        indexes.index(index_name, model=req.model)
        if req.n != 1:
            raise ApiError(400, "with retrieval 'n' must be 1 (the sources are cited by one answer)", param="n")
        engine = await engine_for(base)
        if getattr(engine, "embedding_only", False):
            raise ApiError(400, f"model {engine.name!r} is an embedding model: use /v1/embeddings", param="model")
        if not engine.tokenizer.chat_template:
            raise ApiError(400, f"model {engine.name!r} has no chat template; start the server with --chat-template "
                                "chatml|llama3|mistral|FILE", param="messages")
        messages = chat_messages(req.messages)
        question = _history_and_question(messages)[0]
        try:
            hits = await run_in_threadpool(indexes.search, index_name, question)
        except ScribeError as err:
            raise ApiError(400, f"retrieval failed: {err}", param="messages") from None
        answer_tokens = req.max_completion_tokens or req.max_tokens or min(DEFAULT_ANSWER_TOKENS, engine.context_length // 4)
        shown, used = await run_in_threadpool(grounded_conversation, engine, messages, hits, answer_tokens)
        response = await generate(request, chat=True, body={**body, "model": base, "messages": shown})
        if isinstance(response, StreamingResponse):
            return StreamingResponse(_with_sources(response.body_iterator, req.model, used, cited_sources),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if response.status_code != 200:
            return response
        result = json.loads(response.body)
        result["model"] = req.model
        for choice in result["choices"]:
            cited = cited_sources(choice["message"].get("content") or "", used)
            choice["message"]["sources"] = source_entries(used, cited)
        return json_response(result)

    @app.post("/v1/rag/search", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/RagSearchRequest"}}}}})
    async def rag_search(request: Request):
        req = parse_request(RagSearchRequest, await read_json(request))
        indexes.index(req.index)
        mode = req.mode or indexes.mode
        try:
            hits = await run_in_threadpool(indexes.search, req.index, req.query, req.k, mode)
        except ScribeError as err:
            raise ApiError(400, str(err), param="query") from None
        return {"object": "list", "index": req.index, "mode": mode, "data": [hit.to_dict() for hit in hits]}

    return answer


async def _with_sources(events, model: str, used: list, cited_sources):
    """The engine's SSE lines with the variant's name, and the sources chunk after the last
    choice's (before the usage-only chunk, which OpenAI sends last, and `[DONE]`)."""
    text, buffer, last, sent = [], "", None, False

    def sources_line() -> str:
        chunk = {key: last[key] for key in ("id", "created", "system_fingerprint") if last and key in last}
        chunk.update({"object": "chat.completion.chunk", "model": model, "choices": [],
                      "sources": source_entries(used, cited_sources("".join(text), used))})
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"

    try:
        async for piece in events:
            buffer += piece if isinstance(piece, str) else piece.decode("utf-8")
            out = []
            while "\n\n" in buffer:
                line, buffer = buffer.split("\n\n", 1)
                chunk = json.loads(line[len("data: "):]) if line.startswith("data: {") else None
                ends = line == "data: [DONE]" or (isinstance(chunk, dict) and chunk.get("usage") and not chunk.get("choices"))
                if ends and not sent:
                    out.append(sources_line())
                    sent = True
                if isinstance(chunk, dict) and "choices" in chunk:
                    last = chunk
                    chunk["model"] = model
                    text.extend((c.get("delta") or {}).get("content") or "" for c in chunk["choices"])
                    line = "data: " + json.dumps(chunk, ensure_ascii=False)
                out.append(line + "\n\n")
            if out:
                yield "".join(out)
    finally:  # the engine's stream frees its slots when closed (also when the client went away)
        await events.aclose()
