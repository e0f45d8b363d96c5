"""Structured output: a random-init model writes JSON that validates under random schemas, and
regex/grammar completions match, through the official `openai` client (its Pydantic `parse` too)."""

from __future__ import annotations

import asyncio
import json
import random
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from tests.serving import ServerThread, save_tiny_models

MESSAGES = [{"role": "user", "content": "Describe a book as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    paths = save_tiny_models(tmp_path_factory.mktemp("structured"), tokenizer, context_length=512)
    with ServerThread(create_app(ModelPool(paths, max_batch=16, max_queue=256))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema whose every valid document is short (strings, arrays and numbers are bounded)."""
    kinds = ["boolean", "integer", "string", "enum", "null", "pattern"] + (["object", "array"] * 2 if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(["title", "year", "tags", "ok", "author", "id", "score", "notes"], rng.randint(1, 4))
        properties = {n: random_schema(rng, depth + 1) for n in names}
        return {"type": "object", "properties": properties, "required": rng.sample(names, rng.randint(0, len(names))),
                "additionalProperties": False}
    if kind == "array":
        low = rng.randint(0, 1)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low, "maxItems": low + rng.randint(0, 2)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(2, 8)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", 7, None, "café", True], rng.randint(1, 3))}
    if kind == "pattern":
        return {"type": "string", "pattern": "^[a-z]{1,4}-[0-9]{2}$"}
    return {"type": kind}


def test_random_schemas_always_give_valid_json(server):
    rng = random.Random(0)
    schemas = [{"type": "object", "properties": {"value": random_schema(rng)}, "required": ["value"],
                "additionalProperties": False} for _ in range(100)]

    async def ask(aclient, k: int, schema: dict):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema, "strict": True}}
        return await aclient.chat.completions.create(model="alpha", messages=MESSAGES, response_format=fmt, n=2,
                                                     max_tokens=300, temperature=1.0, seed=k)

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300) as aclient:
            return await asyncio.gather(*(ask(aclient, k, s) for k, s in enumerate(schemas)))

    answers = asyncio.run(ask_all())
    outputs = 0
    for schema, answer in zip(schemas, answers):
        for choice in answer.choices:
            assert choice.finish_reason == "stop", (schema, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)
            outputs += 1
    assert outputs == 200


def test_json_object_mode_and_the_pydantic_parse_helper(client):
    # json_object bounds nothing, so a random model may write a string until max_tokens: what
    # stops parses as an object; what is cut off is still the start of one
    finished = 0
    for seed in range(10):
        r = client.chat.completions.create(model="alpha", messages=MESSAGES, response_format={"type": "json_object"},
                                           max_tokens=200, temperature=1.0, seed=seed)
        content = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
            finished += 1
        else:
            assert r.choices[0].finish_reason == "length" and content.startswith("{")
    assert finished >= 2

    class Book(pydantic.BaseModel):
        title: str = pydantic.Field(max_length=6)
        year: int = pydantic.Field(ge=1800, le=2030)
        fiction: bool

    parsed = client.chat.completions.parse(model="alpha", messages=MESSAGES, response_format=Book, max_tokens=100,
                                           temperature=0.8, seed=1)
    book = parsed.choices[0].message.parsed
    assert isinstance(book, Book) and 1800 <= book.year <= 2030


def test_regex_and_grammar_completions(client, server):
    for seed in range(5):
        r = client.completions.create(model="alpha", prompt="Code:", max_tokens=30, temperature=1.0, seed=seed,
                                      extra_body={"regex": "[a-z]{2,3}-[0-9]{2}"})
        assert re.fullmatch("[a-z]{2,3}-[0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="beta", prompt="Answer:", max_tokens=10, temperature=1.0, seed=3, n=4,
                                  extra_body={"grammar": 'start: "yes" | "no" | "maybe"'})
    assert {c.text for c in r.choices} <= {"yes", "no", "maybe"}


def test_constraints_leave_the_other_rows_of_the_batch_alone(client, server):
    args = dict(model="alpha", prompt="It was the best of", max_tokens=12, temperature=0, logprobs=1)
    alone = client.completions.create(**args)

    async def together():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            constrained = aclient.completions.create(**{**args, "max_tokens": 40}, extra_body={"regex": "[0-9]{30}"})
            return await asyncio.gather(aclient.completions.create(**args), constrained)

    plain, constrained = asyncio.run(together())
    assert plain.choices[0].text == alone.choices[0].text
    # a batch of another shape may round differently in the last bits; the choices themselves are the same
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(alone.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert re.fullmatch("[0-9]{30}", constrained.choices[0].text)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(a"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
])
def test_schemas_the_engine_cannot_compile_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES, **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "\n" not in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "regex": "[a-"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "regex"
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
