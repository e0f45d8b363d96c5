"""An OpenAI-compatible HTTP API over the engines (FastAPI + uvicorn).

    POST /v1/chat/completions    messages -> assistant message (stream or not)
    POST /v1/completions         prompt -> continuation (stream or not)
    POST /v1/embeddings          texts -> unit vectors (`embeddings.py`; an encoder serves only this)
    GET  /v1/models              the served models
    GET  /health                 liveness, no key needed
    GET  /metrics                Prometheus text: requests, tokens, queue, TTFT, tokens/s
    GET  /openapi.json           the API's schema, request bodies included (no key needed)
    GET  /                       the chat page
    /api/tags, /api/show, /api/generate, /api/chat, /api/version   Ollama's API (`ollama.py`)

Any client that speaks OpenAI's API (the official `openai` package, LangChain,
curl) works unchanged: same JSON, same server-sent events for streaming
(`data: {...}` lines, then `data: [DONE]`), same error shape

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

with the status codes OpenAI uses: 400 bad request (an unknown parameter is
named, not ignored), 401 bad key, 403 a Host or Origin this server does not
answer (`origins.py`), 404 unknown model or route, 413 body too large, 429
queue full (with Retry-After), 500/503 a model that cannot be loaded (the
detail is in the server log, never in the answer).

A request goes through: the access log (`access.py`), the Host/Origin guard,
the key check, a bounded JSON parse (`json_body.py`), the schema
(`schema.py`), then the engine; its events become OpenAI's JSON in `responses.py`. Sampling parameters map onto
`scribelm.sampling.SamplingSettings` one to one (`max_tokens` ->
max_new_tokens; `requests.py`); each request, and each of its `n` choices, is sampled with
its own settings and seed inside the shared batch, and a failure inside one
request ends that request only.

A request whose client goes away is cancelled within DISCONNECT_POLL_SECONDS,
streamed or not, and its batch slots are freed before the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from scribelm.errors import ScribeError
from scribelm.generate import chat_stop_ids
from scribelm.serve.access import AccessLog
from scribelm.serve.engine import (
    ContextLengthError,
    EngineStoppedError,
    ErrorEvent,
    GenerationRequest,
    ModelLoadError,
    ModelPool,
    QueueFullError,
    TokenEvent,
)
from scribelm.serve.errors import ApiError
from scribelm.serve.json_body import parse_json_body
from scribelm.serve.metrics import Metrics
from scribelm.serve.ollama import register_ollama_routes
from scribelm.serve.origins import HostOriginGuard
from scribelm.serve.requests import chat_messages, output_grammar, prompt_ids, refuse_unsupported, sampling_settings
from scribelm.serve.responses import CallResponse, int_list, json_response
from scribelm.serve.schema import (
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_request, request_body_schemas,
)
from scribelm.structured import StructuredOutputError, check_grammar

__all__ = ["ApiError", "Metrics", "create_app"]

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: plenty for prompts, small enough to refuse abuse
DEFAULT_BODY_SECONDS = 30.0  # a body that takes longer to arrive is a stalled or hostile client
DISCONNECT_POLL_SECONDS = 0.05  # how often a waiting request checks that its client is still there
_CLIENT_GONE = object()  # put on a request's event queue when its client disconnected


@dataclass
class GenerationRun:
    """A generation call submitted to the engine, for a renderer of another API's answers (`ollama.py`)."""

    call: CallResponse
    requests: list[GenerationRequest]
    next_event: Any  # async () -> the next engine event (or client_gone)
    watcher: asyncio.Task
    finish_metrics: Any
    prompt_tokens: int
    stream: bool
    started: float
    client_gone: object


# ----------------------------------------------------------------------------- the app


def _openapi_body(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def create_app(
    pool: ModelPool,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    idle_check_seconds: float = 5.0,
    allowed_origins: list[str] | None = None,
    public: bool = False,
    body_seconds: float = DEFAULT_BODY_SECONDS,
    rag=None,
) -> FastAPI:
    """The FastAPI application serving every model of `pool`.

    public: the server listens beyond loopback, so any Host header is answered
    (otherwise only localhost names); allowed_origins: browser origins that may
    call the API besides the server's own page and loopback pages ("*": any); rag: the
    retrieval indexes answered as MODEL+rag:NAME (`rag_routes.ServedIndexes`)."""
    metrics = Metrics()
    expected_key = api_key.encode() if api_key else None

    async def reap_idle_models() -> None:
        while True:
            await asyncio.sleep(idle_check_seconds)
            await run_in_threadpool(pool.unload_idle)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reaper = asyncio.create_task(reap_idle_models()) if pool.idle_unload > 0 else None
        try:
            yield
        finally:
            if reaper is not None:
                reaper.cancel()
            await run_in_threadpool(pool.close)

    def check_key(request: Request) -> None:
        """Bearer auth on every route except /health and the page itself (which holds no data)."""
        if expected_key is None or request.url.path in ("/health", "/", "/favicon.ico"):
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), expected_key):  # constant time: no timing oracle
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    app = FastAPI(title="scribelm", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  dependencies=[Depends(check_key)])
    app.state.pool, app.state.metrics = pool, metrics
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostOriginGuard, check_host=not public, allowed_origins=allowed_origins)
    app.add_middleware(AccessLog, metrics=metrics)  # added last: outermost, so it sees every answer

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible API of scribelm")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(request_body_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path[:200]}" if err.status_code in (404, 405) else str(err.detail)
        return ApiError(err.status_code, message, type=kind).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        import logging

        logging.getLogger("scribelm.serve").error("internal error on %s %s", request.method, request.url.path[:200], exc_info=err)
        return ApiError(500, "internal server error; the server log has the details", type="server_error").response()

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and len(length) < 19 and int(length) > max_body_bytes:
            raise ApiError(413, f"request body of {int(length)} bytes exceeds the limit of {max_body_bytes} bytes", code="request_too_large")
        body = bytearray()

        async def receive_body() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > max_body_bytes:
                    raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes", code="request_too_large")

        try:
            await asyncio.wait_for(receive_body(), timeout=body_seconds)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {body_seconds:g} s", code="request_timeout") from None
        return parse_json_body(bytes(body))

    async def engine_for(name: str):
        if name not in pool.paths:
            raise ApiError(404, f"The model '{name[:100]}' does not exist; served models: {', '.join(pool.names())}",
                           param="model", code="model_not_found")
        loaded = pool.loaded(name)  # no thread hop (two wake-ups) when there is nothing to load
        if loaded is not None:
            return loaded
        try:
            return await run_in_threadpool(pool.get, name)
        except ModelLoadError as err:  # the message names the model only; the log has the files
            raise ApiError(503, str(err), type="server_error", code="model_not_loaded") from None

    async def watch_disconnect(request: Request, events: asyncio.Queue, requests: list[GenerationRequest]) -> None:
        """Cancel the engine's work as soon as the client is gone (it polls: ASGI has no callback)."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        for r in requests:
            r.cancel()
        events.put_nowait(_CLIENT_GONE)

    # -- generation ---------------------------------------------------------------
    async def generate(request: Request, chat: bool, body: dict | None = None, render=None):
        """One generation call. `body`: an OpenAI-shaped body already read (another API's request,
        translated); `render(run)`: answers in another API's shape instead of OpenAI's."""
        started = time.monotonic()
        req = parse_request(ChatCompletionRequest if chat else CompletionRequest,
                            body if body is not None else await read_json(request))
        refuse_unsupported(req, chat)
        grammar, grammar_param = output_grammar(req, chat)
        engine = await engine_for(req.model)
        if getattr(engine, "embedding_only", False):
            raise ApiError(400, f"model {engine.name!r} is an embedding model: use /v1/embeddings", param="model")
        if grammar is not None:  # compiled now, so a schema the engine cannot handle is a 400, not a failed stream
            try:
                await run_in_threadpool(check_grammar, grammar, engine.tokenizer)
            except StructuredOutputError as err:
                raise ApiError(400, str(err), param=grammar_param) from None
        request.state.model = engine.name
        tokenizer = engine.tokenizer
        if chat and not tokenizer.chat_template:
            raise ApiError(400, f"model {engine.name!r} has no chat template; start the server with --chat-template "
                                "chatml|llama3|mistral|FILE, or use /v1/completions", param="messages")
        try:
            prompts = [tokenizer.encode_chat(chat_messages(req.messages))] if chat else prompt_ids(req.prompt, engine.lm)
        except (ScribeError, UnicodeError, ValueError, TypeError) as err:
            raise ApiError(400, f"the {'messages' if chat else 'prompt'} could not be tokenized: {err}",
                           param="messages" if chat else "prompt") from None
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty; give at least one token", param="prompt")
            bad = [t for t in ids if not 0 <= t < engine.config.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{engine.config.vocab_size - 1})", param="prompt")
        longest = max(len(p) for p in prompts)
        n = req.n
        settings = sampling_settings(req, chat=chat, prompt_tokens=longest, context=engine.context_length, defaults=engine.lm.generation_config)
        if n * len(prompts) > engine.max_batch:
            raise ApiError(400, f"n x prompts = {n * len(prompts)} exceeds the server's batch of {engine.max_batch} sequences", param="n")
        stream = req.stream
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = bool(getattr(req, "echo", False))
        # echo + logprobs: the prompt's tokens are scored too (what evaluation harnesses read)
        prompt_logprobs = req.logprobs if echo and req.logprobs is not None else None
        if not chat and settings.max_new_tokens == 0 and not echo:
            raise ApiError(400, "'max_tokens': 0 generates nothing; it needs 'echo': true (to score the prompt)",
                           param="max_tokens")
        stop_ids = set(int_list(engine.lm.generation_config.get("stop_token_ids")))  # e.g. a Hugging Face model's eos ids
        if chat:
            stop_ids.update(chat_stop_ids(tokenizer))  # <|end|>, <|im_end|>, ... close the assistant's turn
            if engine.chat_stop:  # a chosen template's turn markers, also where they are plain text
                settings.stop = list(settings.stop) + [s for s in engine.chat_stop if s not in settings.stop]

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = [
            GenerationRequest(prompt_ids=ids, settings=settings, n=n, stop_token_ids=frozenset(stop_ids),
                              loop=loop, events=events, choice_offset=k * n, prompt_logprobs=prompt_logprobs,
                              grammar=grammar)
            for k, ids in enumerate(prompts)
        ]
        try:
            for r in requests:
                engine.submit(r)
        except QueueFullError as err:
            for r in requests:
                r.cancel()
            raise ApiError(429, str(err), type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(err.retry_after)}) from None
        except EngineStoppedError as err:
            for r in requests:
                r.cancel()
            raise ApiError(503, str(err), type="server_error") from None
        except (ContextLengthError, ScribeError) as err:
            for r in requests:
                r.cancel()
            raise ApiError(400, str(err)) from None

        model_name = engine.name
        prompt_tokens = sum(len(p) for p in prompts)
        total_choices = n * len(prompts)
        call = CallResponse(chat=chat, model=model_name, total_choices=total_choices, prompts=prompts, tokenizer=tokenizer)
        watcher = asyncio.create_task(watch_disconnect(request, events, requests))

        def finish_metrics() -> None:
            call.cached_tokens = sum(r.cached_tokens for r in requests)
            metrics.count_tokens(model_name, prompt_tokens, call.completion_tokens)
            request.state.tokens = (prompt_tokens, call.completion_tokens)

        async def next_event():
            event = await events.get()
            if call.first_token_at is None and isinstance(event, TokenEvent):
                call.first_token_at = time.monotonic()
                metrics.observe_ttft(model_name, call.first_token_at - started)
            return event

        if render is not None:
            return await render(GenerationRun(call=call, requests=requests, next_event=next_event, watcher=watcher,
                                        finish_metrics=finish_metrics, prompt_tokens=prompt_tokens, stream=stream,
                                        started=started, client_gone=_CLIENT_GONE))
        if not stream:
            try:
                while call.finished < total_choices:
                    event = await next_event()
                    if event is _CLIENT_GONE:  # nobody waits for the answer; the slots are already freed
                        return Response(status_code=499)
                    if isinstance(event, ErrorEvent):
                        raise ApiError(500, event.message, type="server_error")
                    call.record(event)
            finally:
                watcher.cancel()
                for r in requests:
                    r.cancel()
            finish_metrics()
            if echo:
                for i in range(total_choices):
                    call.texts[i] = tokenizer.decode(prompts[i // n]) + call.texts[i]
            return json_response(call.response(prompt_tokens))

        async def sse():
            try:
                if chat:
                    for i in range(total_choices):
                        yield call.chunk_line({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}, include_usage)
                elif echo and prompt_logprobs is None:  # with logprobs the prompt comes with its scores
                    for i in range(total_choices):
                        yield call.chunk_line({"index": i, "text": tokenizer.decode(prompts[i // n]), "logprobs": None, "finish_reason": None}, include_usage)
                while call.finished < total_choices:
                    # Everything that arrived since the last write goes out in one write.
                    batch = [await next_event()]
                    while not events.empty():
                        batch.append(events.get_nowait())
                    lines = []
                    for event in batch:
                        if event is _CLIENT_GONE:
                            return
                        if isinstance(event, ErrorEvent):
                            error = {"message": event.message, "type": "server_error", "param": None, "code": None}
                            yield "".join(lines) + "data: " + json.dumps({"error": error}) + "\n\n"
                            return
                        call.record(event)
                        choice = call.stream_choice(event)
                        if choice is not None:
                            lines.append(call.chunk_line(choice, include_usage))
                    if lines:
                        yield "".join(lines)
                finish_metrics()
                if include_usage:
                    yield call.chunk_line(None, include_usage, usage=call.usage(prompt_tokens))
                yield "data: [DONE]\n\n"
            finally:  # also on disconnect: the task is cancelled here and the slots freed
                watcher.cancel()
                for r in requests:
                    r.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    register_ollama_routes(app, pool, generate=generate, engine_for=engine_for, read_json=read_json)

    answer_from_documents = None
    if rag is not None:
        from scribelm.serve.rag_routes import register_rag_routes

        answer_from_documents = register_rag_routes(app, rag, generate=generate, engine_for=engine_for, read_json=read_json)

    @app.post("/v1/chat/completions", openapi_extra=_openapi_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        if answer_from_documents is None:
            return await generate(request, chat=True)
        from scribelm.serve.rag_routes import split_variant

        body = await read_json(request)
        if isinstance(body, dict) and split_variant(body.get("model")) is not None:  # MODEL+rag:NAME
            return await answer_from_documents(request, body)
        return await generate(request, chat=True, body=body)

    @app.post("/v1/completions", openapi_extra=_openapi_body(CompletionRequest))
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/embeddings", openapi_extra=_openapi_body(EmbeddingRequest))
    async def embeddings(request: Request):
        from scribelm.serve.embeddings import embed_request

        req = parse_request(EmbeddingRequest, await read_json(request))
        engine = await engine_for(req.model)
        request.state.model = engine.name
        body = await run_in_threadpool(embed_request, engine, req)  # off the event loop
        metrics.count_tokens(engine.name, body["usage"]["prompt_tokens"], 0)
        request.state.tokens = (body["usage"]["prompt_tokens"], 0)
        return json_response(body)

    # -- information ---------------------------------------------------------------
    def model_card(name: str) -> dict:
        engine = pool.engines.get(name)
        card = {"id": name, "object": "model", "created": int(pool.loaded_at.get(name, pool.created)), "owned_by": "scribelm",
                "loaded": engine is not None}
        if engine is not None:
            card["context_length"] = engine.context_length
            card["chat"] = bool(engine.tokenizer.chat_template)
            card["chat_template"] = engine.chat_template  # "model" (its own), a built-in name, "file NAME", or None
            card["embedding_only"] = bool(getattr(engine, "embedding_only", False))
        return card

    @app.get("/v1/models")
    async def list_models():
        cards = [model_card(n) for n in pool.names()]
        return {"object": "list", "data": cards + (rag.variant_cards(cards) if rag is not None else [])}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        variant = [c for c in rag.variant_cards([model_card(n) for n in pool.names()]) if c["id"] == name] if rag else []
        if variant:
            return variant[0]
        if name not in pool.paths:
            raise ApiError(404, f"The model '{name[:100]}' does not exist", param="model", code="model_not_found")
        return model_card(name)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": {
                n: {"loaded": n in pool.engines,
                    "active": pool.engines[n].active_count if n in pool.engines else 0,
                    "queued": pool.engines[n].queue_depth if n in pool.engines else 0}
                for n in pool.names()
            },
        }

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(pool), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = resources.files("scribelm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    return app
