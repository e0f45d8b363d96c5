"""The serving stack against the official `openai` client on a real loopback server."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from tests.serving import ServerThread, save_tiny_models, wait_until

KEY = "sk-test-0123456789"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "It was the best of times"}]


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("serve-models"), tokenizer)


@pytest.fixture(scope="module")
def server(model_paths):
    pool = ModelPool(model_paths, max_batch=16, max_queue=64)
    app = create_app(pool, api_key=KEY, max_body_bytes=64 * 1024)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def no_eos(tokenizer):
    """logit_bias that forbids the special tokens (end tokens, roles), so generations are text that runs to max_tokens."""
    return {str(i): -100 for i in tokenizer.special_ids}


def engine(server, name="alpha"):
    return server.app.state.pool.get(name)


# ----------------------------------------------------------------------------- chat and completions


def test_chat_non_stream_and_usage(client, tokenizer, no_eos):
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=12, temperature=0, logit_bias=no_eos)
    assert r.object == "chat.completion" and r.model == "alpha"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_non_stream_and_logprobs(client, tokenizer, no_eos):
    prompt = "Call me Ishmael."
    r = client.completions.create(model="alpha", prompt=prompt, max_tokens=10, temperature=0, logprobs=3, logit_bias=no_eos)
    assert r.object == "text_completion"
    choice = r.choices[0]
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt)) and r.usage.completion_tokens == 10
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 10
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top one
    # logprobs' tokens are the tokens of the text
    assert "".join(lp.tokens).replace("\ufffd", "") == choice.text.replace("\ufffd", "")
    echoed = client.completions.create(model="alpha", prompt=prompt, max_tokens=10, temperature=0, echo=True, logit_bias=no_eos)
    assert echoed.choices[0].text == prompt + choice.text


def test_chat_stream_equals_non_stream_and_reports_usage(client, no_eos):
    args = dict(model="alpha", messages=MESSAGES, max_tokens=16, temperature=0, logit_bias=no_eos)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream(client, no_eos):
    args = dict(model="beta", prompt="In the beginning", max_tokens=9, temperature=0, logit_bias=no_eos)
    whole = client.completions.create(**args)
    text = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    assert text == whole.choices[0].text and whole.model == "beta"


def test_n_choices(client, no_eos):
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, n=3, max_tokens=12, temperature=1.0, seed=3, logit_bias=no_eos)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 3  # each choice draws with its own generator
    assert r.usage.completion_tokens == 36
    seen = {}
    for chunk in client.chat.completions.create(model="alpha", messages=MESSAGES, n=2, max_tokens=6, seed=3, stream=True, logit_bias=no_eos):
        for c in chunk.choices:
            seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
    assert sorted(seen) == [0, 1]


def test_seeds_reproduce(client, no_eos):
    def run(seed):
        return client.completions.create(model="alpha", prompt="The quick", max_tokens=20, temperature=1.0, top_p=0.9,
                                          seed=seed, logit_bias=no_eos).choices[0].text
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_strings(client, no_eos):
    args = dict(model="alpha", prompt="Call me", max_tokens=40, temperature=0, logit_bias=no_eos)
    full = client.completions.create(**args).choices[0].text
    stop = full[12:15]
    assert len(stop) == 3
    expected = full[: full.find(stop)]
    r = client.completions.create(**args, stop=[stop, "never-there"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=stop, stream=True) if c.choices)
    assert streamed == expected


def test_sixteen_concurrent_streams_match_one_by_one(server, client, no_eos):
    prompts = [f"{word} {i}" for i, word in enumerate(["It was", "Call me", "The quick", "In the", "café", "emoji"] * 3)][:16]

    def one(prompt):
        stream = client.completions.create(model="alpha", prompt=prompt, max_tokens=24, temperature=0, stream=True, logit_bias=no_eos)
        return "".join(c.choices[0].text for c in stream if c.choices)

    alone = [one(p) for p in prompts]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def stream(prompt):
            s = await aclient.completions.create(model="alpha", prompt=prompt, max_tokens=24, temperature=0, stream=True, logit_bias=no_eos)
            return "".join([c.choices[0].text async for c in s if c.choices])

        try:
            return await asyncio.gather(*(stream(p) for p in prompts))
        finally:
            await aclient.close()

    assert asyncio.run(together()) == alone
    assert engine(server).peak_active > 1  # they really shared decode steps


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tokenizer):
    """One slot, a queue of one, and models with a long context whose answers run long."""
    paths = save_tiny_models(tmp_path_factory.mktemp("long-models"), tokenizer, context_length=4096, text_only=True)
    pool = ModelPool(paths, max_batch=1, max_queue=1)
    with ServerThread(create_app(pool)) as running:
        yield running


LONG = dict(model="alpha", messages=MESSAGES, max_tokens=4000, temperature=0, stream=True)


def test_disconnect_frees_the_slot(small_server):
    c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    eng = engine(small_server)
    stream = c.chat.completions.create(**LONG)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert eng.active_count == 1
    stream.close()
    assert wait_until(lambda: eng.active_count == 0, timeout=5)
    assert eng.generated_tokens < 4000
    # and the server goes on serving
    assert c.completions.create(model="alpha", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_queue_limit_returns_429_and_gone_clients_leave_the_queue(small_server):
    import threading

    c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    eng = engine(small_server)
    assert wait_until(lambda: eng.active_count == 0)
    before = eng.generated_tokens
    running = c.chat.completions.create(**LONG)
    next(iter(running))
    assert wait_until(lambda: eng.active_count == 1)

    # a non-streamed request whose client gives up while it waits leaves the queue
    def impatient():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(small_server.url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 5}, timeout=1.0)

    waiter = threading.Thread(target=impatient)
    waiter.start()
    assert wait_until(lambda: eng.queue_depth == 1)
    waiter.join()
    assert wait_until(lambda: eng.queue_depth == 0, timeout=5)

    # one slot busy, one request waiting: the next one is turned away
    queued = c.chat.completions.create(**LONG)
    assert wait_until(lambda: eng.active_count == 1 and eng.queue_depth == 1)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 429
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.body["code"] == "rate_limit_exceeded"
    running.close()
    queued.close()
    assert wait_until(lambda: eng.active_count == 0 and eng.queue_depth == 0)
    assert c.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2).choices
    assert eng.generated_tokens - before < 4000  # both long answers were cut short by their clients leaving


# ----------------------------------------------------------------------------- auth and bad input


def test_api_key(server):
    for key in ("wrong-key", KEY + "x"):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # /health needs no key


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_openai_errors_and_server_goes_on(server, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server.url + "/v1/chat/completions"
    assert "parse the JSON" in _error(httpx.post(url, content=b'{"model": "alpha", "messages": [', headers=auth), 400)["message"]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gamma", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=-5)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="alpha", prompt="hello", max_tokens=1000)
    assert "256" in info.value.body["message"] and "1000" in info.value.body["message"]  # the numbers
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:  # refused, not silently ignored
        client.chat.completions.create(model="alpha", messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}])
    assert info.value.body["param"] == "tools"
    big = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 100_000}]})
    assert _error(httpx.post(url, content=big, headers=auth), 413)["code"] == "request_too_large"
    assert _error(httpx.get(server.url + "/v1/nothing", headers=auth), 404)
    assert _error(httpx.get(url, headers=auth), 405)
    # still serving
    r = client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- models, health, metrics


def test_models_health_metrics(server, client):
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta"]
    assert client.models.retrieve("beta").id == "beta"
    health = httpx.get(server.url + "/health").json()
    assert health["models"]["alpha"]["loaded"]
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for family in ("scribe_requests_total", "scribe_generated_tokens_total", "scribe_prompt_tokens_total",
                   "scribe_queue_depth", "scribe_active_sequences", "scribe_tokens_per_second",
                   "scribe_time_to_first_token_seconds_bucket"):
        assert family in text
    generated = [line for line in text.splitlines() if line.startswith('scribe_generated_tokens_total{model="alpha"}')]
    assert int(generated[0].split()[-1]) > 0


def test_models_load_lazily_and_unload_when_idle(model_paths):
    import time

    pool = ModelPool(model_paths, idle_unload=0.2)
    assert pool.engines == {}
    engine = pool.get("beta")
    assert list(pool.engines) == ["beta"] and pool.get("beta") is engine
    time.sleep(0.3)
    assert pool.unload_idle() == ["beta"] and pool.engines == {}
    assert pool.get("beta") is not engine  # loaded again on demand
    pool.close()


def test_page_is_served(server):
    r = httpx.get(server.url + "/")  # the page holds no data; the API behind it checks the key
    assert r.status_code == 200 and "<title>scribelm chat</title>" in r.text


def test_server_matches_lm_generate(server, client, model_paths, no_eos):
    """The engine's batched, slot-cached decoding gives what the library's own generation loop gives."""
    import scribelm

    lm = scribelm.load(model_paths["beta"])
    bias = {int(k): v for k, v in no_eos.items()}
    for prompt, settings in (("Call me", dict(temperature=0)), ("The quick", dict(temperature=0.9, top_p=0.9, seed=11))):
        expected = lm.generate(prompt, max_new_tokens=15, logit_bias=bias, **settings)
        api = {k.replace("max_new_tokens", "max_tokens"): v for k, v in settings.items()}
        got = client.completions.create(model="beta", prompt=prompt, max_tokens=15, logit_bias=no_eos, **api)
        assert got.choices[0].text == expected
    reply = lm.chat(MESSAGES, max_new_tokens=20, temperature=0)
    assert client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=20, temperature=0).choices[0].message.content == reply


def test_hugging_face_directory_is_served_like_transformers_generates(tmp_path, tokenizer):
    """A transformers Llama directory served by name answers with what transformers' own greedy generate gives."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, tie_word_embeddings=False)
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / "hf-llama"
    hf.save_pretrained(path)
    tokenizer.save(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_id], "do_sample": False}))
    with ServerThread(create_app(ModelPool({"llama": str(path)}))) as hf_server:
        c = openai.OpenAI(base_url=hf_server.url + "/v1", api_key="unused", max_retries=0)
        prompt = "The quick brown fox"
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
        if tokenizer.eos_id in out:
            out = out[: out.index(tokenizer.eos_id)]
        r = c.completions.create(model="llama", prompt=prompt, max_tokens=12)  # greedy: the model's generation_config
        assert r.choices[0].text == tokenizer.decode(out, skip_special_tokens=True)


def test_a_cache_that_cannot_fit_is_a_clear_error(model_paths):
    import scribelm
    from scribelm.serve.engine import Engine

    with pytest.raises(scribelm.ScribeError, match="lower --max-batch or --max-context"):
        Engine(scribelm.load(model_paths["alpha"]), max_batch=10**9)


def test_quantized_model_is_served(tmp_path, model_paths):
    """A weight-only int8 checkpoint runs in the engine and answers as its own LM.generate does."""
    import scribelm
    from scribelm.quant import quantize_model

    lm = scribelm.load(model_paths["alpha"])
    quantize_model(lm.model, bits=8)
    path = lm.save(tmp_path / "alpha-int8")
    quantized = scribelm.load(path)
    with ServerThread(create_app(ModelPool({"alpha-int8": str(path)}))) as q_server:
        c = openai.OpenAI(base_url=q_server.url + "/v1", api_key="unused", max_retries=0)
        got = c.completions.create(model="alpha-int8", prompt="Call me", max_tokens=10, temperature=0).choices[0].text
    assert got == quantized.generate("Call me", max_new_tokens=10, temperature=0)
