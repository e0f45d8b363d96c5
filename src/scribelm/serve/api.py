"""An OpenAI-compatible HTTP API over the engines (FastAPI + uvicorn).

    POST /v1/chat/completions    messages -> assistant message (stream or not)
    POST /v1/completions         prompt -> continuation (stream or not)
    GET  /v1/models              the served models
    GET  /health                 liveness, no key needed
    GET  /metrics                Prometheus text: requests, tokens, queue, TTFT, tokens/s
    GET  /                       the chat page

Any client that speaks OpenAI's API (the official `openai` package, LangChain,
curl) works unchanged: same JSON, same server-sent events for streaming
(`data: {...}` lines, then `data: [DONE]`), same error shape

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

with the status codes OpenAI uses: 400 bad request, 401 bad key, 404 unknown
model or route, 413 body too large, 429 queue full (with Retry-After), 500.

Sampling parameters map onto `scribelm.sampling.SamplingSettings` one to one
(`max_tokens` -> max_new_tokens); each request, and each of its `n` choices,
is sampled with its own settings and seed inside the shared batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
from collections import defaultdict
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from scribelm.errors import ScribeError
from scribelm.generate import chat_stop_ids, encode_prompt
from scribelm.sampling import SamplingError, SamplingSettings
from scribelm.serve.engine import (
    ContextLengthError,
    EngineStoppedError,
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    ModelPool,
    QueueFullError,
    TokenEvent,
)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: plenty for prompts, small enough to refuse abuse
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting non-streamed request checks that its client is still there
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Counters and a histogram, rendered in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (path, status) -> count
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.ttft_counts: dict[str, list[int]] = {}
        self.ttft_sum: dict[str, float] = defaultdict(float)
        self.ttft_n: dict[str, int] = defaultdict(int)

    def count_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, str(status))] += 1

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens[model] += prompt
            self.completion_tokens[model] += completion

    def observe_ttft(self, model: str, seconds: float) -> None:
        with self._lock:
            counts = self.ttft_counts.setdefault(model, [0] * len(TTFT_BUCKETS))
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.ttft_sum[model] += seconds
            self.ttft_n[model] += 1

    def render(self, pool: ModelPool) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("scribe_requests_total", "counter", "HTTP requests by path and status code")
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'scribe_requests_total{{path="{path}",status="{status}"}} {n}')
            family("scribe_prompt_tokens_total", "counter", "prompt tokens processed")
            for model, n in sorted(self.prompt_tokens.items()):
                lines.append(f'scribe_prompt_tokens_total{{model="{model}"}} {n}')
            family("scribe_generated_tokens_total", "counter", "tokens generated")
            for model, n in sorted(self.completion_tokens.items()):
                lines.append(f'scribe_generated_tokens_total{{model="{model}"}} {n}')
            family("scribe_time_to_first_token_seconds", "histogram", "time from request to first generated token")
            for model, counts in sorted(self.ttft_counts.items()):
                for bound, n in zip(TTFT_BUCKETS, counts):
                    lines.append(f'scribe_time_to_first_token_seconds_bucket{{model="{model}",le="{bound}"}} {n}')
                lines.append(f'scribe_time_to_first_token_seconds_bucket{{model="{model}",le="+Inf"}} {self.ttft_n[model]}')
                lines.append(f'scribe_time_to_first_token_seconds_sum{{model="{model}"}} {self.ttft_sum[model]:.6f}')
                lines.append(f'scribe_time_to_first_token_seconds_count{{model="{model}"}} {self.ttft_n[model]}')
        engines = dict(pool.engines)
        family("scribe_model_loaded", "gauge", "1 if the model is loaded")
        for name in pool.names():
            lines.append(f'scribe_model_loaded{{model="{name}"}} {int(name in engines)}')
        family("scribe_queue_depth", "gauge", "requests waiting for a batch slot")
        for name, engine in engines.items():
            lines.append(f'scribe_queue_depth{{model="{name}"}} {engine.queue_depth}')
        family("scribe_active_sequences", "gauge", "sequences holding a batch slot")
        for name, engine in engines.items():
            lines.append(f'scribe_active_sequences{{model="{name}"}} {engine.active_count}')
        family("scribe_tokens_per_second", "gauge", "generated tokens per second over the last 10 seconds")
        for name, engine in engines.items():
            lines.append(f'scribe_tokens_per_second{{model="{name}"}} {engine.tokens_per_second():.3f}')
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- request parsing


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, *, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__.replace("str", "string").replace("int", "integer").replace("float", "number") for k in kinds)
        raise ApiError(400, f"'{name}' must be {what or names}, got {json.dumps(value)[:60]}", param=name)
    return value


def _range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)


def _stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", param="stop")
    if len(stop) > 4:
        raise ApiError(400, f"'stop' takes at most 4 strings, got {len(stop)}", param="stop")
    return stop


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts", param="messages")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role {m['role']!r} is not supported; use system, user or assistant", param="messages")
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def _prompts(body: dict, lm) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
    Text is encoded as `LM.generate` encodes it (BOS if the checkpoint asks for one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [encode_prompt(lm, prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [encode_prompt(lm, p) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")


def _settings(body: dict, *, chat: bool, prompt_tokens: int, context: int, defaults: dict) -> tuple[SamplingSettings, int]:
    """The request's sampling settings and n, checked with OpenAI's ranges."""
    n = _get(body, "n", (int,), 1)
    if n < 1 or n > 128:
        raise ApiError(400, f"'n' must be between 1 and 128, got {n}", param="n")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, (int,), None)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{name}' must be at least 1, got {max_tokens}", param=name)
    if max_tokens is None:
        max_tokens = max(1, context - prompt_tokens) if chat else 16
    if prompt_tokens + max_tokens > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {prompt_tokens + max_tokens} "
            f"tokens ({prompt_tokens} in the {'messages' if chat else 'prompt'}, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="messages" if chat else "prompt", code="context_length_exceeded",
        )
    temperature = _get(body, "temperature", (int, float), defaults.get("temperature", 1.0))
    _range("temperature", temperature, 0, 2)
    top_p = _get(body, "top_p", (int, float), defaults.get("top_p", 1.0))
    _range("top_p", top_p, 0, 1)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", param="top_p")
    presence = _get(body, "presence_penalty", (int, float), 0.0)
    frequency = _get(body, "frequency_penalty", (int, float), 0.0)
    _range("presence_penalty", presence, -2, 2)
    _range("frequency_penalty", frequency, -2, 2)
    seed = _get(body, "seed", (int,), None)
    if seed is not None and seed < 0:
        seed &= (1 << 63) - 1  # OpenAI accepts any 64-bit integer; the generator wants a non-negative one
    logit_bias = _get(body, "logit_bias", (dict,), None)
    if chat:
        logprobs = bool(_get(body, "logprobs", (bool,), False))
        top_logprobs = _get(body, "top_logprobs", (int,), 0)
        _range("top_logprobs", top_logprobs, 0, 20)
        if top_logprobs and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    else:
        top = _get(body, "logprobs", (int,), None)
        _range("logprobs", top, 0, 5)
        logprobs, top_logprobs = top is not None, top or 0
    extra: dict[str, Any] = {}
    for key, kinds in (("top_k", (int,)), ("min_p", (int, float)), ("repetition_penalty", (int, float))):
        if body.get(key) is not None:
            extra[key] = _get(body, key, kinds)
        elif defaults.get(key) is not None:  # the model's own default (generation.json), as for temperature
            extra[key] = defaults[key]
    try:
        settings = SamplingSettings(
            max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
            presence_penalty=float(presence), frequency_penalty=float(frequency), logit_bias=logit_bias, seed=seed,
            stop=_stop_list(body), logprobs=logprobs, top_logprobs=top_logprobs, **extra,
        )
    except SamplingError as err:
        raise ApiError(400, str(err), param=_param_of(str(err))) from None
    return settings, n


def _param_of(message: str) -> str | None:
    for name in ("logit_bias", "top_logprobs", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop"):
        if name in message:
            return name
    return None


# ----------------------------------------------------------------------------- the app


def create_app(
    pool: ModelPool,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    idle_check_seconds: float = 5.0,
) -> FastAPI:
    """The FastAPI application serving every model of `pool`."""
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

    app = FastAPI(title="scribelm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  dependencies=[Depends(check_key)])
    app.state.pool, app.state.metrics = pool, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        metrics.count_request(request.url.path, err.status)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        metrics.count_request("other", err.status_code)
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return ApiError(err.status_code, message, type=kind).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        metrics.count_request(request.url.path, 500)
        return ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(413, f"request body of {int(length)} bytes exceeds the limit of {max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(bytes(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"We could not parse the JSON body of your request ({err}).") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    async def engine_for(body: dict):
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "you must provide a model parameter", param="model")
        if name not in pool.paths:
            raise ApiError(404, f"The model '{name}' does not exist; served models: {', '.join(pool.names())}",
                           param="model", code="model_not_found")
        try:
            return await run_in_threadpool(pool.get, name)
        except ScribeError as err:
            raise ApiError(500, f"model {name!r} failed to load: {err}", type="server_error") from None

    # -- generation ---------------------------------------------------------------
    async def generate(request: Request, chat: bool):
        started = time.monotonic()
        body = await read_json(request)
        engine = await engine_for(body)
        tokenizer = engine.tokenizer
        try:
            if chat:
                prompts = [tokenizer.encode_chat(_messages(body))]
            else:
                prompts = _prompts(body, engine.lm)
        except ScribeError as err:
            raise ApiError(400, str(err), param="messages" if chat else "prompt") from None
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty; give at least one token", param="prompt")
            bad = [t for t in ids if not 0 <= t < engine.config.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{engine.config.vocab_size - 1})", param="prompt")
        longest = max(len(p) for p in prompts)
        settings, n = _settings(body, chat=chat, prompt_tokens=longest, context=engine.context_length, defaults=engine.lm.generation_config)
        if n * len(prompts) > engine.max_batch:
            raise ApiError(400, f"n x prompts = {n * len(prompts)} exceeds the server's batch of {engine.max_batch} sequences", param="n")
        for unsupported in ("tools", "functions", "tool_choice", "function_call"):
            if body.get(unsupported) not in (None, [], "none"):
                raise ApiError(400, f"'{unsupported}' is not supported by this server; call without tools", param=unsupported)
        response_format = body.get("response_format")
        if response_format not in (None, {"type": "text"}):
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
        stream = bool(_get(body, "stream", (bool,), False))
        if body.get("stream_options") is not None and not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
        options = _get(body, "stream_options", (dict,), {}) or {}
        include_usage = bool(options.get("include_usage", False))
        echo = bool(_get(body, "echo", (bool,), False)) if not chat else False
        stop_ids = set(_int_list(engine.lm.generation_config.get("stop_token_ids")))  # e.g. a Hugging Face model's eos ids
        if chat:
            stop_ids.update(chat_stop_ids(tokenizer))  # <|end|>, <|im_end|>, ... close the assistant's turn

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = [
            GenerationRequest(prompt_ids=ids, settings=settings, n=n, stop_token_ids=frozenset(stop_ids),
                              loop=loop, events=events, choice_offset=k * n)
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
        call = _Call(chat=chat, model=model_name, total_choices=total_choices, prompts=prompts, tokenizer=tokenizer)
        metrics.count_request(request.url.path, 200)

        def finish_metrics() -> None:
            metrics.count_tokens(model_name, prompt_tokens, call.completion_tokens)

        async def next_event():
            event = await events.get()
            if call.first_token_at is None and isinstance(event, TokenEvent):
                call.first_token_at = time.monotonic()
                metrics.observe_ttft(model_name, call.first_token_at - started)
            return event

        if not stream:
            try:
                while call.finished < total_choices:
                    try:
                        event = await asyncio.wait_for(next_event(), timeout=DISCONNECT_POLL_SECONDS)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():  # nobody waits for the answer: free the slots
                            return JSONResponse({}, status_code=499)
                        continue
                    if isinstance(event, ErrorEvent):
                        raise ApiError(500, event.message, type="server_error")
                    call.record(event)
            finally:
                for r in requests:
                    r.cancel()
            finish_metrics()
            if echo:
                for i in range(total_choices):
                    call.texts[i] = tokenizer.decode(prompts[i // n]) + call.texts[i]
            return JSONResponse(call.response(prompt_tokens))

        async def sse():
            try:
                if chat:
                    for i in range(total_choices):
                        yield call.chunk_line({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}, include_usage)
                elif echo:
                    for i in range(total_choices):
                        yield call.chunk_line({"index": i, "text": tokenizer.decode(prompts[i // n]), "logprobs": None, "finish_reason": None}, include_usage)
                while call.finished < total_choices:
                    # Everything that arrived since the last write goes out in one write.
                    batch = [await next_event()]
                    while not events.empty():
                        batch.append(events.get_nowait())
                    lines = []
                    for event in batch:
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
                if include_usage:
                    yield call.chunk_line(None, include_usage, usage=call.usage(prompt_tokens))
                yield "data: [DONE]\n\n"
                finish_metrics()
            finally:  # also on disconnect: the task is cancelled here and the slots freed
                for r in requests:
                    r.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    # -- information ---------------------------------------------------------------
    def model_card(name: str) -> dict:
        engine = pool.engines.get(name)
        card = {"id": name, "object": "model", "created": int(pool.loaded_at.get(name, pool.created)), "owned_by": "scribelm",
                "loaded": engine is not None}
        if engine is not None:
            card["context_length"] = engine.context_length
            card["chat"] = bool(engine.tokenizer.chat_template)
        return card

    @app.get("/v1/models")
    async def list_models():
        metrics.count_request("/v1/models", 200)
        return {"object": "list", "data": [model_card(n) for n in pool.names()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in pool.paths:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
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


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class _Call:
    """The state of one HTTP generation call: texts, logprobs and finish reasons per choice."""

    def __init__(self, *, chat: bool, model: str, total_choices: int, prompts: list[list[int]], tokenizer) -> None:
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.texts = [""] * total_choices
        self.reasons: list[str | None] = [None] * total_choices
        self.tokens = [0] * total_choices
        self.logprobs: list[list[TokenEvent]] = [[] for _ in range(total_choices)]
        self.finished = 0
        self.first_token_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def record(self, event) -> None:
        if isinstance(event, TokenEvent):
            self.texts[event.index] += event.text
            if event.logprob is not None:
                self.logprobs[event.index].append(event)
        elif isinstance(event, FinishEvent):
            self.texts[event.index] += event.text
            self.reasons[event.index] = event.reason
            self.tokens[event.index] = event.completion_tokens
            self.finished += 1

    def usage(self, prompt_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens}

    # -- logprobs in OpenAI's two shapes ----------------------------------------------
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(self, events: list[TokenEvent]) -> dict:
        content = []
        for e in events:
            text, raw = self._token(e.token_id)
            top = []
            for tid, lp in e.top_logprobs or []:
                t, b = self._token(tid)
                top.append({"token": t, "logprob": lp, "bytes": b})
            content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, events: list[TokenEvent], offset: int = 0) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        position = offset
        for e in events:
            text, _ = self._token(e.token_id)
            tokens.append(text)
            lps.append(e.logprob)
            tops.append({self._token(tid)[0]: lp for tid, lp in e.top_logprobs or []} if e.top_logprobs else None)
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    # -- whole responses ------------------------------------------------------------
    def response(self, prompt_tokens: int) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            lp = None
            if self.logprobs[i]:
                lp = self._chat_logprobs(self.logprobs[i]) if self.chat else self._completion_logprobs(self.logprobs[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": lp, "finish_reason": self.reasons[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.reasons[i]})
        return {
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
            "model": self.model, "system_fingerprint": "scribelm", "choices": choices, "usage": self.usage(prompt_tokens),
        }

    # -- streaming ---------------------------------------------------------------------
    def stream_choice(self, event) -> dict | None:
        """The choice object of one chunk, or None when the event carries nothing to send."""
        if isinstance(event, TokenEvent):
            if not event.text and event.logprob is None:
                return None
            lp = None
            if event.logprob is not None:
                lp = self._chat_logprobs([event]) if self.chat else self._completion_logprobs([event])
            if self.chat:
                return {"index": event.index, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}
            return {"index": event.index, "text": event.text, "logprobs": lp, "finish_reason": None}
        if isinstance(event, FinishEvent):
            if self.chat:
                delta = {"content": event.text} if event.text else {}
                return {"index": event.index, "delta": delta, "logprobs": None, "finish_reason": event.reason}
            return {"index": event.index, "text": event.text, "logprobs": None, "finish_reason": event.reason}
        return None

    def chunk_line(self, choice: dict | None, include_usage: bool, usage: dict | None = None) -> str:
        chunk = {
            "id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion", "created": self.created,
            "model": self.model, "system_fingerprint": "scribelm", "choices": [choice] if choice is not None else [],
        }
        if include_usage:
            chunk["usage"] = usage
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"
