"""No request can hurt another: streams in flight finish normally while every kind of bad request arrives."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest

from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from scribelm.serve.http_limits import server_limits
from tests.serving import ServerThread, save_tiny_models, wait_until

KEY = "sk-concurrency-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
PROMPTS = ["It was the best", "Call me", "The quick brown", "In the beginning"]
MAX_TOKENS = 3000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    paths = save_tiny_models(tmp_path_factory.mktemp("concurrency-models"), tokenizer, context_length=4096, text_only=True)
    pool = ModelPool(paths, max_batch=12, max_queue=32)
    with ServerThread(create_app(pool, api_key=KEY), **server_limits(header_seconds=0.5)) as running:
        yield running


def bad_requests(url: str, eos_id: int | None = None) -> list[tuple[str, callable]]:
    """(what, send) for each request that once hurt the server; send() returns the status it got.
    `eos_id` is banned from the abandoned request, so that it surely outlives its client."""
    chat = url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]

    def post(body, path=chat, headers=AUTH, timeout=30.0):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(path, content=content, headers=headers, timeout=timeout).status_code

    def abandoned():
        try:
            bias = {} if eos_id is None else {"logit_bias": {str(eos_id): -100}}
            post({"model": "alpha", "prompt": "x", "max_tokens": 900, **bias}, url + "/v1/completions", timeout=0.5)
        except httpx.ReadTimeout:
            return 0  # the client gave up, as intended
        return -1

    def dribbling():
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            return 0 if conn.recv(1) == b"" else -1  # closed by the server after its header deadline

    return [
        ("seed 2**64", lambda: post({"model": "alpha", "messages": messages, "seed": 2**64})),
        ("seed 2**64-1, n=2", lambda: post({"model": "alpha", "messages": messages, "seed": 2**64 - 1, "n": 2, "max_tokens": 5})),
        ("repetition_penalty 1e-300", lambda: post({"model": "alpha", "messages": messages, "repetition_penalty": 1e-300})),
        ("temperature 1e-300", lambda: post({"model": "alpha", "messages": messages, "temperature": 1e-300, "max_tokens": 5})),
        ("JSON 100,000 deep", lambda: post(b'{"model": "alpha", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
        ("5000-digit integer", lambda: post('{"model": "alpha", "messages": [], "max_tokens": ' + "7" * 5000 + "}")),
        ("unknown parameter", lambda: post({"model": "alpha", "messages": messages, "frobnicate": True})),
        ("unknown model", lambda: post({"model": "nope", "messages": messages})),
        ("forged metrics path", lambda: httpx.get(url + '/v1/models/q",status="200"} 999999').status_code),
        ("rebound Host", lambda: httpx.get(url + "/v1/models", headers={**AUTH, "Host": "evil.example"}).status_code),
        ("cross-site Origin", lambda: post({"model": "alpha", "messages": messages}, headers={**AUTH, "Origin": "https://evil.example"})),
        ("abandoned long request", abandoned),
        ("headers dribbled", dribbling),
    ]


EXPECTED_STATUS = {
    "seed 2**64": 400, "seed 2**64-1, n=2": 200, "repetition_penalty 1e-300": 400, "temperature 1e-300": 200,
    "JSON 100,000 deep": 400, "5000-digit integer": 400, "unknown parameter": 400, "unknown model": 404,
    "forged metrics path": 401, "rebound Host": 403, "cross-site Origin": 403, "abandoned long request": 0,
    "headers dribbled": 0,
}


def test_streams_in_flight_survive_every_bad_request(server, tokenizer):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def stream(prompt):
        chunks = client.completions.create(model="alpha", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        text, reasons = "", []
        for chunk in chunks:
            for choice in chunk.choices:
                text += choice.text
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
        return text, reasons

    alone = {p: client.completions.create(model="alpha", prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text for p in PROMPTS}
    engine = server.app.state.pool.get("alpha")
    results: dict[str, tuple[str, list[str]]] = {}
    errors: list[BaseException] = []

    def victim(prompt):
        try:
            results[prompt] = stream(prompt)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=victim, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    assert wait_until(lambda: engine.active_count >= len(PROMPTS) or len(results) == len(PROMPTS), timeout=60)
    got = {what: send() for what, send in bad_requests(server.url, tokenizer.eos_id)}
    still_running = len(results) < len(PROMPTS)
    for t in threads:
        t.join(120)
    assert got == EXPECTED_STATUS
    assert still_running  # the bad requests really arrived while the streams were being generated
    assert not errors
    for prompt in PROMPTS:
        text, reasons = results[prompt]
        assert reasons == ["length"] and text == alone[prompt]
    # and the server serves normally afterwards
    assert client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0).choices[0].text == alone[PROMPTS[0]]
