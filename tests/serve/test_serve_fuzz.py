"""The API fuzzed from its own OpenAPI schema (schemathesis) against a live `scribe serve`.

Bodies that fit the schema and bodies that break it, a few hundred in all,
derandomized (the same cases every run). Every answer must be a success or an
error in OpenAI's shape, never a 5xx, and the server must still answer a
normal request afterwards.
"""

from __future__ import annotations

import json

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (the dev extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.serving import ServeProcess, save_tiny_models  # noqa: E402

EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 40}  # per operation: ~500 requests in all


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    paths = save_tiny_models(tmp_path_factory.mktemp("fuzz-models"), tokenizer, context_length=128)
    with ServeProcess(f"alpha={paths['alpha']}", "--max-batch", "4", "--max-queue", "64", "--quiet") as process:
        yield process


def _aim(case, mode: GenerationMode):
    """Valid cases name the served model and ask for few tokens, so that they reach the engine
    quickly; the rest of the body is schemathesis' own."""
    if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "alpha"
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int):
                case.body[key] = min(case.body[key], 8)
    return case


def _check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, what
        error = body["error"]
        if response.request.url.path.startswith("/api/"):  # Ollama's routes answer in Ollama's shape
            assert isinstance(error, str) and error, what
            return
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"], what
    elif response.headers.get("content-type", "").startswith("application/json"):
        response.json()


def test_api_fuzzed_from_its_schema(served):
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= labels
    cases = 0
    statuses: dict[tuple[str, int], int] = {}
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for operation in operations:
            for mode, examples in EXAMPLES.items():
                if mode is GenerationMode.NEGATIVE and (operation.method.upper() != "POST" or not len(operation.body)):
                    continue  # routes whose body the schema does not describe (GET, Ollama's): nothing to break

                @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case):
                    nonlocal cases
                    case = _aim(case, mode)
                    kwargs = case.as_transport_kwargs(base_url=served.url)
                    body = kwargs.get("json")
                    response = http.request(case.method, case.formatted_path, params=kwargs.get("params"),
                                            content=json.dumps(body) if body is not None else kwargs.get("data"),
                                            headers={"Content-Type": "application/json"})
                    cases += 1
                    key = (operation.label, response.status_code)
                    statuses[key] = statuses.get(key, 0) + 1
                    _check(response, f"{case.method} {case.formatted_path} {str(body)[:300]}")

                run()
        assert cases >= 200
        # the generated bodies both reached the model and were refused
        for route in ("POST /v1/chat/completions", "POST /v1/completions"):
            assert statuses.get((route, 200), 0) >= 5 and statuses.get((route, 400), 0) >= 5, statuses
        # and it still serves
        r = http.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
