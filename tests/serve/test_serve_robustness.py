"""The server against hostile and broken input: each request that once hurt it, and what it gets now."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import time

import httpx
import openai
import pytest
import torch

from scribelm.sampling import RowSampler, SamplingSettings, choose_tokens
from scribelm.serve.api import create_app
from scribelm.serve.engine import Engine, ErrorEvent, FinishEvent, GenerationRequest, ModelPool
from scribelm.serve.http_limits import server_limits
from tests.serving import ServeProcess, ServerThread, run_scribe_serve, save_tiny_models, wait_until

KEY = "sk-robust-0123456789"
MESSAGES = [{"role": "user", "content": "It was the best of times"}]


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("robust-models"), tokenizer, context_length=4096, text_only=True)


@pytest.fixture(scope="module")
def server(model_paths):
    pool = ModelPool(model_paths, max_batch=8, max_queue=16)
    with ServerThread(create_app(pool, api_key=KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


AUTH = {"Authorization": f"Bearer {KEY}"}


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post(server, body, path="/v1/chat/completions", **kwargs):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**AUTH, "Content-Type": "application/json"}, timeout=60, **kwargs)


# ----------------------------------------------------------------------------- parameters


def test_unknown_parameter_is_refused_by_name(server, client):
    error = _error(post(server, {"model": "alpha", "messages": MESSAGES, "temprature": 0.5}), 400)
    assert error["param"] == "temprature" and "temprature" in error["message"]
    error = _error(post(server, {"model": "alpha", "prompt": "hi", "max_tokens": 2, "bogus": 1}, "/v1/completions"), 400)
    assert error["param"] == "bogus"
    error = _error(post(server, {"model": "alpha", "messages": [{"role": "user", "content": "hi", "colour": "red"}]}), 400)
    assert error["param"] == "messages" and "colour" in error["message"]
    # the documented extensions and OpenAI's harmless fields are accepted
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=3, user="someone",
                                       extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2})
    assert r.usage.completion_tokens == 3


def test_types_are_strict(server):
    assert _error(post(server, {"model": "alpha", "messages": MESSAGES, "max_tokens": "5"}), 400)["param"] == "max_tokens"
    assert _error(post(server, {"model": "alpha", "messages": MESSAGES, "n": True}), 400)["param"] == "n"
    assert _error(post(server, {"model": "alpha", "prompt": [1, "a"]}, "/v1/completions"), 400)["param"] == "prompt"


def test_out_of_range_settings_are_400_and_extreme_seeds_work(server, client):
    error = _error(post(server, {"model": "alpha", "messages": MESSAGES, "seed": 18446744073709551616}), 400)
    assert error["param"] == "seed"
    error = _error(post(server, {"model": "alpha", "messages": MESSAGES, "repetition_penalty": 1e-300}), 400)
    assert error["param"] == "repetition_penalty"
    # the largest uint64 and int64 seeds are reduced, not refused; two choices draw with seed and seed + 1
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, n=2, seed=2**64 - 1)
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    again = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, n=2, seed=2**63 - 1)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=4, seed=-(2**63)).choices
    # a temperature too small for float32 is greedy, not NaN
    tiny = client.completions.create(model="alpha", prompt="Call me", max_tokens=6, temperature=1e-300)
    greedy = client.completions.create(model="alpha", prompt="Call me", max_tokens=6, temperature=0)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_sampling_is_numerically_safe():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[3, 7] = float("nan")
    rows = [
        RowSampler(SamplingSettings(repetition_penalty=1e-300, seed=1), 50, prompt_ids=range(50)),
        RowSampler(SamplingSettings(temperature=1e-300, seed=2), 50),
        RowSampler(SamplingSettings(temperature=1e-300, repetition_penalty=1e-300, seed=3), 50, prompt_ids=[1, 2]),
        RowSampler(SamplingSettings(seed=2**64 - 1), 50, seed_offset=1),  # seed + offset wraps modulo 2**64
    ]
    chosen = choose_tokens(logits, rows)
    assert chosen.shape == (4,) and all(0 <= int(t) < 50 and int(t) != 7 or b != 3 for b, t in enumerate(chosen))
    assert int(chosen[1]) == int(logits[1].argmax())  # temperature ~0 is greedy
    with pytest.raises(Exception, match="below 2\\*\\*64"):
        SamplingSettings(seed=2**64)


# ----------------------------------------------------------------------------- bodies


def test_hostile_json_is_400(server):
    deep = b'{"model": "alpha", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested" in _error(post(server, deep), 400)["message"]
    digits = '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 5000 + "}"
    assert "5000 digits" in _error(post(server, digits), 400)["message"]
    assert _error(post(server, '{"model": "alpha", "messages": [], "temperature": NaN}'), 400)
    assert _error(post(server, '{"model": "alpha", "prompt": "hi", "temperature": 1e999}', "/v1/completions"), 400)


# ----------------------------------------------------------------------------- metrics


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\["\\n])*",?)*\})? \S+$')


def test_metrics_cannot_be_forged_or_flooded(server):
    forged = '/v1/models/q",status="200"} 999999'
    for i in range(30):
        assert httpx.get(server.url + forged + str(i)).status_code == 401
        assert httpx.get(server.url + forged + '%0Ascribe_requests_total{path="/x' + str(i)).status_code in (401, 404)
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert "999999" not in text
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), line
    routes = set(re.findall(r'scribe_requests_total\{route="([^"]*)"', text))
    assert '/v1/models/{model}' in routes and not any("q" in r for r in routes)
    assert sum(1 for line in text.splitlines() if line.startswith("scribe_requests_total{")) < 20  # bounded


def test_label_values_are_escaped():
    from scribelm.serve.metrics import escape_label, route_template

    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert route_template("/v1/models/anything/at/all") == "/v1/models/{model}"
    assert route_template("/wp-admin") == "other"


# ----------------------------------------------------------------------------- disconnects


def test_abandoned_non_streamed_request_frees_its_slot(model_paths):
    pool = ModelPool(model_paths, max_batch=1, max_queue=1)
    with ServerThread(create_app(pool)) as running:
        engine = pool.get("alpha")
        before = engine.generated_tokens
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 4000,
                                                              "temperature": 0}, timeout=1.0)
        assert wait_until(lambda: engine.active_count == 0, timeout=5)
        assert engine.generated_tokens - before < 4000


# ----------------------------------------------------------------------------- one request fails, the rest go on


def _collect(engine, requests, loop):
    """Run until every request finished or failed; returns {request: [events]}."""
    async def gather():
        out = {id(r): [] for r in requests}
        pending = set(id(r) for r in requests)
        while pending:
            for r in requests:
                while not r.events.empty():
                    event = r.events.get_nowait()
                    out[id(r)].append(event)
                    done = sum(isinstance(e, FinishEvent) for e in out[id(r)]) == r.n
                    if isinstance(event, ErrorEvent) or done:
                        pending.discard(id(r))
            await asyncio.sleep(0.01)
        return out
    return loop.run_until_complete(asyncio.wait_for(gather(), 60))


def test_an_error_in_one_request_ends_that_request_only(model_paths):
    import scribelm

    lm = scribelm.load(model_paths["alpha"])
    engine = Engine(lm, name="alpha", max_batch=8).start()
    loop = asyncio.new_event_loop()
    try:
        def request(prompt, max_new_tokens=30, **settings):
            settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0, **settings)
            return GenerationRequest(prompt_ids=lm.tokenizer.encode(prompt), settings=settings, loop=loop, events=asyncio.Queue())

        expected = {p: lm.generate(p, max_new_tokens=30, temperature=0) for p in ("Call me", "The quick", "It was")}
        victims = [request(p) for p in expected]
        at_start = request("broken at start")
        mid_way = request("broken mid way", max_new_tokens=4000, seed=1)
        for r in victims + [at_start, mid_way]:
            engine.submit(r)
        # settings changed after they were checked: the first cannot start, the second fails after it started
        at_start.settings.logit_bias = {10**6: 1.0}
        assert wait_until(lambda: mid_way.first_token_at is not None, timeout=30)
        mid_way.settings.temperature = "hot"
        events = _collect(engine, victims + [at_start, mid_way], loop)
        for r, prompt in zip(victims, expected):
            got = events[id(r)]
            assert not any(isinstance(e, ErrorEvent) for e in got)
            assert "".join(e.text for e in got) == expected[prompt]
        for broken in (at_start, mid_way):
            assert isinstance(events[id(broken)][-1], ErrorEvent)
            assert not any(isinstance(e, FinishEvent) for e in events[id(broken)])
        assert wait_until(lambda: engine.active_count == 0)
        fresh = request("Call me")
        engine.submit(fresh)
        assert "".join(e.text for e in _collect(engine, [fresh], loop)[id(fresh)]) == expected["Call me"]
    finally:
        engine.stop()
        loop.close()


# ----------------------------------------------------------------------------- broken models


@pytest.fixture()
def broken_models(model_paths, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(model_paths["alpha"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    listed = tmp_path / "listed"
    shutil.copytree(model_paths["alpha"], listed)
    (listed / "generation.json").write_text("[1, 2]")
    return {"truncated": str(truncated), "listed": str(listed)}


def test_model_load_errors_name_the_model_not_its_files(broken_models, caplog):
    with ServerThread(create_app(ModelPool(broken_models))) as running:
        for name, path in broken_models.items():
            with caplog.at_level(logging.ERROR, logger="scribelm.serve"):
                r = httpx.post(running.url + "/v1/completions", json={"model": name, "prompt": "hi"}, timeout=60)
            error = _error(r, 503)
            assert name in error["message"] and "server log" in error["message"]
            assert path not in r.text and "safetensors" not in r.text and "generation.json" not in r.text
            assert any(path in record.getMessage() for record in caplog.records)  # the operator sees the detail
        assert httpx.get(running.url + "/health").json()["status"] == "ok"


def test_corrupt_models_stop_scribe_serve_at_start(broken_models):
    for name, path in broken_models.items():
        done = run_scribe_serve(f"{name}={path}", "--port", "0")
        assert done.returncode != 0
        assert "serving" not in done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in done.stderr


def test_port_in_use_is_one_line_and_no_banner(model_paths):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        done = run_scribe_serve(model_paths["alpha"], "--port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert done.returncode != 0 and "serving" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--port" in lines[0]


def _closed_by_server(port: int, seconds: float = 10.0) -> bool:
    """Open a connection, send half a request's headers and one more line every 0.1 s: is it closed?"""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(int(seconds / 0.1)):  # bounded: far longer than the deadline
            try:
                conn.sendall(f"X-Slow-{i}: y\r\n".encode())
                conn.settimeout(0.1)
                if conn.recv(1024) == b"":
                    return True
            except socket.timeout:
                continue
            except OSError:
                return True
    return False


def test_scribe_serve_logs_model_loads_and_every_request(model_paths):
    with ServeProcess(f"alpha={model_paths['alpha']}", "--header-timeout", "0.5") as served:
        assert _closed_by_server(int(served.url.rsplit(":", 1)[1]))
        r = httpx.post(served.url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        assert httpx.get(served.url + "/nowhere").status_code == 404
        assert wait_until(lambda: sum('"GET /nowhere" 404' in line for line in served.stderr_lines) == 1)
        log = "\n".join(served.stderr_lines)
        assert re.search(r"loaded model alpha \([\d,]+ params, [\d.]+ s\)", log), log
        assert re.search(r'"POST /v1/completions" 200 [\d.]+s model=alpha tokens=\d+\+3', log), log


# ----------------------------------------------------------------------------- who may call


def test_host_and_origin_checks(model_paths):
    pool = ModelPool(model_paths)
    with ServerThread(create_app(pool)) as running:
        port = running.port
        def get(**headers):
            return httpx.get(running.url + "/v1/models", headers=headers)
        assert get().status_code == 200
        assert get(Host=f"localhost:{port}").status_code == 200
        assert _error(get(Host="evil.example"), 403)["code"] == "host_not_allowed"  # DNS rebinding
        assert _error(get(Host="127.evil.example"), 403)
        assert _error(get(Origin="https://evil.example"), 403)["code"] == "origin_not_allowed"  # a cross-site page
        assert _error(get(Origin="null"), 403)
        assert get(Origin=f"http://127.0.0.1:{port}").status_code == 200  # the chat page itself
        assert get(Origin="http://localhost:3000").status_code == 200  # a local development page
        r = httpx.post(running.url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 1},
                       headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and pool.engines == {}  # refused before any work
    with ServerThread(create_app(ModelPool(model_paths), allowed_origins=["https://app.example"])) as running:
        r = httpx.get(running.url + "/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert httpx.get(running.url + "/v1/models", headers={"Origin": "https://evil.example"}).status_code == 403
        assert httpx.get(running.url + "/v1/models", headers={"Host": "app.example"}).status_code == 200  # behind a proxy
        assert httpx.get(running.url + "/v1/models", headers={"Host": "evil.example"}).status_code == 403
    with ServerThread(create_app(ModelPool(model_paths), public=True)) as running:
        assert httpx.get(running.url + "/v1/models", headers={"Host": "models.example"}).status_code == 200


def test_connections_dribbling_headers_are_closed(model_paths):
    with ServerThread(create_app(ModelPool(model_paths)), **server_limits(header_seconds=0.5)) as running:
        assert _closed_by_server(running.port)
        assert httpx.get(running.url + "/health").status_code == 200  # others are served as before


def test_connections_send_without_waiting_for_acknowledgements():
    """TCP_NODELAY on every connection, also those accepted from a listening socket made with
    socket.socket() (as `scribe serve` makes it), where asyncio does not set it: with Nagle's
    algorithm on, each request on a kept-alive connection waited for a delayed acknowledgement."""
    import socket

    from scribelm.serve.http_limits import _send_without_delay

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0

                class Transport:
                    def get_extra_info(self, name, default=None):
                        return accepted if name == "socket" else default

                _send_without_delay(Transport())
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_openapi_schema_describes_request_bodies(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and {"model", "messages"} <= set(chat["required"])
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
