"""Ollama's API on `scribe serve`, driven by the official `ollama` Python client."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest

from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from tests.serving import ServerThread, save_tiny_models

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "It was the best of times"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    paths = save_tiny_models(tmp_path_factory.mktemp("ollama"), tokenizer, text_only=True)
    with ServerThread(create_app(ModelPool(paths, max_batch=8))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


def test_tags_and_show(client, tokenizer):
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"alpha", "beta"}
    assert listed["alpha"].size > 0 and listed["alpha"].details.parameter_size
    shown = client.show("alpha")
    assert shown.template == tokenizer.chat_template and shown.modelinfo["general.parameter_count"] > 0
    with pytest.raises(ollama.ResponseError) as info:
        client.show("nope")
    assert info.value.status_code == 404


def test_chat_streamed_and_whole_equal_the_openai_answer(client, server):
    options = {"temperature": 0, "num_predict": 9}
    whole = client.chat(model="alpha", messages=MESSAGES, options=options, stream=False)
    parts = list(client.chat(model="alpha", messages=MESSAGES, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 9
    assert not any(p.done for p in parts[:-1]) and parts[-1].prompt_eval_count > 0
    reference = openai.OpenAI(base_url=server.url + "/v1", api_key="x").chat.completions.create(
        model="alpha", messages=MESSAGES, max_tokens=9, temperature=0)
    assert whole.message.content == reference.choices[0].message.content
    assert whole.prompt_eval_count == reference.usage.prompt_tokens


def test_generate_uses_the_template_unless_raw(client, server):
    options = {"temperature": 0, "num_predict": 6}
    templated = client.generate(model="beta", prompt="Call me", options=options)
    as_chat = client.chat(model="beta", messages=[{"role": "user", "content": "Call me"}], options=options)
    assert templated.response == as_chat.message.content and templated.done
    raw = list(client.generate(model="beta", prompt="Call me", raw=True, options=options, stream=True))
    reference = openai.OpenAI(base_url=server.url + "/v1", api_key="x").completions.create(
        model="beta", prompt="Call me", max_tokens=6, temperature=0)
    assert "".join(p.response for p in raw) == reference.choices[0].text
    assert client.generate(model="alpha", prompt="").done_reason == "load"


def test_format_and_bad_requests(client, server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    r = client.chat(model="alpha", messages=MESSAGES, format=schema, options={"temperature": 1.0, "seed": 2})
    assert isinstance(json.loads(r.message.content)["ok"], bool)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="alpha", messages=MESSAGES, options={"temperature": 9.0})
    assert info.value.status_code == 400 and "temperature" in info.value.error
    with pytest.raises(ollama.ResponseError):
        client.chat(model="alpha", messages=MESSAGES, format={"type": "strin"})
    r = httpx.post(server.url + "/api/chat", json={"model": "alpha", "messages": MESSAGES, "bogus": 1})
    assert r.status_code == 400 and r.json() == {"error": "unknown field 'bogus'"}
    r = httpx.post(server.url + "/api/generate", json={"model": "alpha", "prompt": "x", "images": ["aGk="]})
    assert r.status_code == 400 and "images" in r.json()["error"]
