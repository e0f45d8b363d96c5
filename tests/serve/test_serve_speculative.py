"""Speculative decoding in the server: concurrent requests that join, finish and move
between slots at different times get exactly the plain greedy text, and usage reports
the accepted and rejected guesses."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import scribelm
from scribelm.lm import LM
from scribelm.model import Transformer
from scribelm.serve.api import create_app
from scribelm.serve.engine import Engine, ModelPool
from tests.conftest import tiny_config
from tests.serving import ServerThread, save_tiny_models, wait_until

PROMPTS = [
    "it was the age of wisdom, it was the age of wisdom, it was the age of",
    "In the beginning God created",
    "Call me Ishmael. Call me Ishmael. Call me",
    "The quick brown fox jumps over the lazy dog; the quick brown",
    "It was the best of times",
    "café, naïve, café, naïve,",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("speculative")
    paths = save_tiny_models(root, tokenizer, text_only=True)
    torch.manual_seed(3)
    draft = Transformer(tiny_config(context_length=256, n_layers=1)).eval()
    paths["draft"] = str(LM(draft, tokenizer).save(root / "draft"))
    return paths


def complete_all(url: str, budgets: list[int]) -> list:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    def one(i):
        return client.completions.create(model="alpha", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=budgets[i],
                                         temperature=0, stop=["ages"] if i == 2 else None)

    with ThreadPoolExecutor(len(budgets)) as pool:  # more requests than slots: some wait, rows move as others end
        return list(pool.map(one, range(len(budgets))))


@pytest.mark.parametrize("method", ["prompt_lookup", "draft"])
def test_concurrent_requests_get_the_plain_greedy_text(paths, method):
    budgets = [24, 5, 17, 30, 9, 12, 21, 3]
    lm = scribelm.load(paths["alpha"])
    expected = [lm.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=b, temperature=0,
                            stop=["ages"] if i == 2 else None) for i, b in enumerate(budgets)]
    options = {"speculative": method} if method == "prompt_lookup" else {"draft": paths["draft"], "num_draft": 3}
    pool = ModelPool({"alpha": paths["alpha"]}, max_batch=3, **options)
    with ServerThread(create_app(pool)) as server:
        answers = complete_all(server.url, budgets)
        engine = pool.engines["alpha"]
        # the engine counts a step's tokens just after sending them: it counts each token once
        counted = wait_until(lambda: engine.generated_tokens == sum(a.usage.completion_tokens for a in answers))
    assert [a.choices[0].text for a in answers] == expected
    details = [a.usage.completion_tokens_details for a in answers if a.usage.completion_tokens_details]
    assert details and sum(d.accepted_prediction_tokens for d in details) > 0
    assert all(d.rejected_prediction_tokens >= 0 for d in details)
    assert counted


def test_serving_refuses_what_cannot_speculate(paths, tokenizer):
    lm = scribelm.load(paths["alpha"])
    from scribelm.speculative import Speculator

    with pytest.raises(scribelm.errors.ScribeError, match="without --compile"):
        Engine(lm, max_batch=2, max_context=64, compile=True, speculator=Speculator("prompt_lookup"))
    other = Transformer(tiny_config(vocab_size=tokenizer.vocab_size + 1)).eval()
    with pytest.raises(scribelm.errors.ScribeError, match="vocabulary"):
        Engine(lm, max_batch=2, max_context=64, speculator=Speculator("draft", draft_model=other))


def test_serve_flags_are_checked_before_anything_starts(paths, capsys):
    from scribelm.cli import main

    assert main(["serve", paths["alpha"], "--speculative", "draft", "--port", "0"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    assert main(["serve", paths["alpha"], "--draft", "/nonexistent/draft", "--port", "0"]) == 2
    assert "/nonexistent/draft" in capsys.readouterr().err


def test_structured_output_under_speculation(paths):
    """Guesses the grammar forbids are rejected like any other: greedy JSON equals plain decoding's,
    and sampled JSON validates."""
    import json
    import random

    import jsonschema

    from tests.serve.test_serve_structured import random_schema

    rng = random.Random(1)
    schemas = [{"type": "object", "properties": {"value": random_schema(rng)}, "required": ["value"],
                "additionalProperties": False} for _ in range(8)]
    messages = [{"role": "user", "content": "Describe a book as JSON, a book as JSON."}]
    answers, guessed = {}, 0
    for name, options in (("plain", {}), ("lookup", {"speculative": "prompt_lookup"})):
        with ServerThread(create_app(ModelPool({"alpha": paths["alpha"]}, max_batch=4, **options))) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            out = []
            for k, schema in enumerate(schemas):
                fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema, "strict": True}}
                greedy = client.chat.completions.create(model="alpha", messages=messages, response_format=fmt,
                                                        max_tokens=120, temperature=0)
                sampled = client.chat.completions.create(model="alpha", messages=messages, response_format=fmt,
                                                         max_tokens=120, temperature=1.0, seed=k)
                for r in (greedy, sampled):
                    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
                    details = r.usage.completion_tokens_details
                    guessed += details.accepted_prediction_tokens + details.rejected_prediction_tokens if details else 0
                out.append(greedy.choices[0].message.content)
            answers[name] = out
    assert answers["lookup"] == answers["plain"] and guessed > 0
