"""Ollama's API on the same server, so tools written for Ollama work unchanged.

    GET  /api/tags       the served models, with size, family, parameter count, quantization
    POST /api/show       one model's details and chat template
    POST /api/generate   prompt -> response (NDJSON stream by default; "stream": false for one object)
    POST /api/chat       messages -> message (the same)
    GET  /api/version

A request is translated into the OpenAI-shaped body the rest of the server
takes (Ollama's `options` -> sampling parameters: num_predict -> max_tokens,
repeat_penalty -> repetition_penalty, temperature, top_p, top_k, min_p, seed,
stop, presence/frequency_penalty; `format: "json"` or a JSON schema ->
structured output), so validation, scheduling, cancellation and limits are
the same as for /v1. Runtime options that belong to llama.cpp (num_ctx,
num_thread, num_gpu, ...) are accepted and ignored, as Ollama does for options
a model does not use. The answer is streamed as newline-delimited JSON:

    {"model": "m", "created_at": "...", "message": {"role": "assistant", "content": "Hel"}, "done": false}
    ...
    {"model": "m", ..., "done": true, "done_reason": "stop", "prompt_eval_count": 12, "eval_count": 30, ...durations in ns}

/api/generate renders the prompt (and `system`) with the model's chat template
as Ollama does, unless `raw` is true or the model has no template. Errors are
Ollama's shape, {"error": "message"}, with the same status codes as /v1.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from scribelm.serve.engine import ErrorEvent, TokenEvent
from scribelm.serve.errors import ApiError

__all__ = ["register_ollama_routes"]

#: Ollama option -> the OpenAI-shaped field it becomes.
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
           "stop": "stop", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "num_predict": "max_tokens"}
FLOAT_OPTIONS = {"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"}
GENERATE_FIELDS = {"model", "prompt", "suffix", "system", "template", "context", "stream", "raw", "format", "images",
                   "options", "keep_alive", "think", "logprobs", "top_logprobs"}
CHAT_FIELDS = {"model", "messages", "tools", "stream", "format", "options", "keep_alive", "think", "logprobs",
               "top_logprobs"}
VERSION = "0.6.3"  # the Ollama API version these routes follow


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}")
    for name in ("images", "context", "tools"):
        if body.get(name):
            raise ApiError(400, f"{name!r} is not supported by this server")
    for name in ("suffix", "template"):
        if body.get(name):
            hint = "; start the server with --chat-template instead" if name == "template" else ""
            raise ApiError(400, f"{name!r} is not supported by this server{hint}")
    if body.get("think") not in (None, False):
        raise ApiError(400, f"model {body.get('model')!r} does not support thinking")


def _sampling(body: dict, openai: dict) -> None:
    """Ollama's options and format onto an OpenAI-shaped body."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object")
    for name, target in OPTIONS.items():
        value = options.get(name)
        if value is None:
            continue
        if name in FLOAT_OPTIONS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name == "num_predict" and isinstance(value, int) and value < 0:  # -1: as long as the context allows
            continue
        openai[target] = value
    fmt = body.get("format")
    if fmt in (None, ""):
        return
    if fmt == "json":
        openai["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        openai["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    else:
        raise ApiError(400, "'format' must be \"json\" or a JSON schema object")


def _final(run, *, chat: bool, model: str, whole: bool) -> dict:
    """The last object of an answer: done, why, token counts and durations in nanoseconds."""
    call = run.call
    now = time.monotonic()
    first = call.first_token_at or now
    text = call.texts[0] if whole else ""
    line = {"model": model, "created_at": _now()}
    line.update({"message": {"role": "assistant", "content": text}} if chat else {"response": text})
    line.update({
        "done": True, "done_reason": call.reasons[0] or "stop", "total_duration": int((now - run.started) * 1e9),
        "load_duration": 0, "prompt_eval_count": run.prompt_tokens, "prompt_eval_duration": int((first - run.started) * 1e9),
        "eval_count": call.completion_tokens, "eval_duration": int((now - first) * 1e9),
    })
    return line


def _renderer(*, chat: bool, model: str):
    def render(run):
        call = run.call

        def done() -> None:
            run.watcher.cancel()
            for r in run.requests:
                r.cancel()

        if not run.stream:
            async def whole():
                try:
                    while call.finished < 1:
                        event = await run.next_event()
                        if event is run.client_gone:
                            return None
                        if isinstance(event, ErrorEvent):
                            raise ApiError(500, event.message, type="server_error")
                        call.record(event)
                finally:
                    done()
                run.finish_metrics()
                return JSONResponse(_final(run, chat=chat, model=model, whole=True))

            return whole()

        async def lines():
            try:
                while call.finished < 1:
                    event = await run.next_event()
                    if event is run.client_gone:
                        return
                    if isinstance(event, ErrorEvent):
                        yield json.dumps({"error": event.message}) + "\n"
                        return
                    call.record(event)
                    if isinstance(event, TokenEvent) and event.text:
                        piece = {"model": model, "created_at": _now()}
                        piece.update({"message": {"role": "assistant", "content": event.text}} if chat
                                     else {"response": event.text})
                        piece["done"] = False
                        yield json.dumps(piece, ensure_ascii=False) + "\n"
                run.finish_metrics()
                yield json.dumps(_final(run, chat=chat, model=model, whole=False)) + "\n"
            finally:
                done()

        async def streaming():
            return StreamingResponse(lines(), media_type="application/x-ndjson")

        return streaming()

    return render


def register_ollama_routes(app: FastAPI, pool, *, generate, engine_for, read_json) -> None:
    """Add Ollama's routes to the app; `generate`, `engine_for`, `read_json` are the OpenAI API's own."""

    def details(name: str) -> tuple[dict, Any]:
        """Ollama's `details` of a served model, and what the store read (ModelInfo)."""
        from scribelm.store import describe_model

        info = describe_model(pool.paths[name])
        config = info.config or {}
        return {"parent_model": "", "format": info.format, "family": str(config.get("name") or config.get("model_type") or ""),
                "families": None, "parameter_size": _count(info.parameters), "quantization_level": info.quantization}, info

    async def body_of(request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise ApiError(400, "'model' is required")
        if body["model"] not in pool.paths:
            raise ApiError(404, f"model '{body['model'][:100]}' not found")
        return body

    @app.get("/api/version")
    async def version():
        return {"version": VERSION}

    @app.get("/api/tags")
    async def tags():
        from starlette.concurrency import run_in_threadpool

        models = []
        for name in pool.names():
            shown, info = await run_in_threadpool(details, name)
            modified = datetime.fromtimestamp(info.path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
            models.append({"name": name, "model": name, "modified_at": modified, "size": info.size_bytes,
                           "digest": _digest(name, info), "details": shown})
        return {"models": models}

    @app.post("/api/show")
    async def show(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            body = await body_of(request)
            shown, info = await run_in_threadpool(details, body["model"])
        except ApiError as err:
            return _error(err)
        config = info.config or {}
        family = shown["family"] or "scribelm"
        model_info = {"general.architecture": family, "general.parameter_count": info.parameters}
        for key in ("context_length", "d_model", "n_layers", "n_heads", "vocab_size"):
            if key in config:
                model_info[f"{family}.{key}"] = config[key]
        engine = pool.engines.get(body["model"])
        template = info.chat_template or (engine.tokenizer.chat_template if engine is not None else None) or ""
        return {"modelfile": "", "parameters": "", "template": template, "details": shown, "model_info": model_info,
                "capabilities": ["completion"], "modified_at": _now()}

    @app.post("/api/generate")
    async def ollama_generate(request: Request):
        try:
            body = await body_of(request)
            _check_fields(body, GENERATE_FIELDS)
            engine = await engine_for(body["model"])
            prompt, system = body.get("prompt") or "", body.get("system") or ""
            if not isinstance(prompt, str) or not isinstance(system, str):
                raise ApiError(400, "'prompt' and 'system' must be strings")
            if not prompt and not system:  # Ollama's way to load a model: nothing to generate
                return {"model": body["model"], "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
            chat = not body.get("raw") and bool(engine.tokenizer.chat_template)
            openai: dict[str, Any] = {"model": body["model"], "stream": body.get("stream", True) is not False}
            if chat:
                openai["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                                     [{"role": "user", "content": prompt}]
            else:
                if body.get("format"):
                    raise ApiError(400, "'format' needs the model's chat template (not raw)")
                openai["prompt"] = system + prompt
            _sampling(body, openai)
            return await generate(request, chat, body=openai, render=_renderer(chat=False, model=body["model"]))
        except ApiError as err:
            return _error(err)

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        try:
            body = await body_of(request)
            _check_fields(body, CHAT_FIELDS)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list")
            for m in messages:
                if not isinstance(m, dict):
                    raise ApiError(400, "each message must be an object")
                if m.get("images") or m.get("tool_calls"):
                    raise ApiError(400, "images and tool calls in messages are not supported by this server")
            openai = {"model": body["model"], "stream": body.get("stream", True) is not False,
                      "messages": [{"role": m.get("role"), "content": m.get("content")} for m in messages]}
            _sampling(body, openai)
            return await generate(request, True, body=openai, render=_renderer(chat=True, model=body["model"]))
        except ApiError as err:
            return _error(err)


def _count(parameters: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= size:
            return f"{parameters / size:.1f}{unit}"
    return str(parameters)


def _digest(name: str, info) -> str:
    import hashlib

    return hashlib.sha256(f"{name}:{info.path}:{info.size_bytes}".encode()).hexdigest()
