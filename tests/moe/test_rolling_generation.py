"""Sliding-window models generate through a rolling cache of W slots, in `LM.generate` and in the
server, token for token and logit for logit as the real `transformers` Mistral does over
sequences several windows long."""

import concurrent.futures

import pytest
import torch

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

import scribelm  # noqa: E402
from scribelm.cache import KVCache, RollingKVCache, new_cache  # noqa: E402
from scribelm.decode import prefill  # noqa: E402
from scribelm.generate import BatchGeneration  # noqa: E402
from scribelm.sampling import SamplingSettings  # noqa: E402
from tests.interop.test_hf import make_hf_model  # noqa: E402

WINDOW = 8
NEW = 40  # prompt + 40 new tokens: six windows and more


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, tokenizer):
    """A random Mistral with a window of 8 and the test tokenizer; special tokens' rows of the
    head are zero, so greedy decoding writes text and never stops early."""
    model = make_hf_model("mistral_gqa", vocab_size=tokenizer.vocab_size, sliding_window=WINDOW,
                          max_position_embeddings=128)
    with torch.no_grad():
        model.lm_head.weight[sorted(tokenizer.special_ids)] = 0.0
    path = tmp_path_factory.mktemp("rolling") / "mistral"
    model.save_pretrained(path)
    tokenizer.save(path)
    return model, path


def reference(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and the log-probability of each."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [float(step[0].float().log_softmax(-1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def test_lm_generate_uses_the_rolling_cache_and_matches_transformers(mistral, tokenizer):
    model, path = mistral
    lm = scribelm.load(path)
    assert lm.config.sliding_window == WINDOW and lm.tokenizer is not None
    prompts = [tokenizer.encode("In the beginning God created the heaven"), tokenizer.encode("Call me")]
    assert len(prompts[0]) != len(prompts[1])  # rows of different lengths decode together
    done = lm.generate(prompts, max_new_tokens=NEW, temperature=0, logprobs=True, return_details=True)
    for ids, completion in zip(prompts, done):
        tokens, logprobs = reference(model, ids, NEW)
        assert completion.token_ids == tokens
        ours = torch.tensor([t.logprob for t in completion.logprobs])
        assert (ours - torch.tensor(logprobs)).abs().max().item() <= 1e-4
    gen = BatchGeneration(lm.model, lm.tokenizer, prompts, SamplingSettings(max_new_tokens=NEW, temperature=0))
    gen.run()
    assert isinstance(gen.cache, RollingKVCache) and gen.cache.keys.shape[3] == WINDOW


def test_cache_memory_is_bounded_by_the_window(mistral):
    _, path = mistral
    config = scribelm.load(path).config
    per_window = KVCache(config, 2, WINDOW).nbytes()
    for length in (32, 64, 128):
        cache = new_cache(config, 2, length)
        assert isinstance(cache, RollingKVCache) and cache.nbytes() == per_window
        assert KVCache(config, 2, length).nbytes() == per_window * length // WINDOW
    assert isinstance(new_cache(config, 2, 64, rolling=False), KVCache)
    assert isinstance(new_cache(config.replace(sliding_window=None), 2, 64), KVCache)


@pytest.mark.parametrize("chunk", [5, 11, 512])
def test_chunked_prefill_of_uneven_prompts_is_exact(mistral, chunk):
    """Prompts of 37 and 21 tokens into a rolling cache, in chunks shorter and longer than W."""
    model, path = mistral
    lm = scribelm.load(path)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(10, 300, (37,), generator=g).tolist(), torch.randint(10, 300, (21,), generator=g).tolist()]
    cache = RollingKVCache(lm.config, 2)
    with torch.no_grad():
        logits = prefill(lm.model, cache, 0, prompts, chunk=chunk)  # (2, V)
        assert cache.lengths.tolist() == [37, 21]
        for b, ids in enumerate(prompts):
            assert (logits[b] - model(torch.tensor([ids])).logits[0, -1]).abs().max().item() <= 1e-4
        # then a decode step of both rows together, each at its own position
        nxt = logits.argmax(-1)
        stepped = lm.model(nxt[:, None], cache=cache, last_only=True)[:, 0]
        for b, ids in enumerate(prompts):
            expected = model(torch.tensor([ids + [int(nxt[b])]])).logits[0, -1]
            assert (stepped[b] - expected).abs().max().item() <= 1e-4


def test_beam_search_over_the_rolling_cache_matches_transformers(mistral, tokenizer):
    model, path = mistral
    lm = scribelm.load(path)
    ids = tokenizer.encode("It was the best of times")
    ours = lm.generate(ids, max_new_tokens=20, num_beams=3, return_details=True)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=20, num_beams=3, do_sample=False,
                                pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
    assert ours.token_ids == theirs


def test_server_completions_match_transformers(mistral, tokenizer):
    from scribelm.serve.api import create_app
    from scribelm.serve.engine import ModelPool
    from tests.serving import ServerThread

    model, path = mistral
    texts = ["In the beginning God created the heaven and the earth", "Call me Ishmael"]
    pool = ModelPool({"swa": str(path)}, max_batch=4)
    with ServerThread(create_app(pool)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

        def complete(text):
            return client.completions.create(model="swa", prompt=text, max_tokens=NEW, temperature=0, logprobs=1)

        with concurrent.futures.ThreadPoolExecutor(2) as pool_threads:  # both in the batch when they overlap
            answers = list(pool_threads.map(complete, texts))
        engine = pool.get("swa")
    lm = scribelm.load(path)
    for text, answer in zip(texts, answers):
        ids = tokenizer.encode(text)
        tokens, logprobs = reference(model, ids, NEW)
        choice = answer.choices[0]
        assert choice.text == lm.generate(ids, max_new_tokens=NEW, temperature=0)
        assert choice.text == tokenizer.decode(tokens)
        served = torch.tensor(choice.logprobs.token_logprobs)
        assert len(served) == NEW and (served - torch.tensor(logprobs)).abs().max().item() <= 1e-4
    assert isinstance(engine.cache, RollingKVCache) and engine.cache.keys.shape[3] == WINDOW


def test_server_scores_prompts_of_different_lengths_through_the_rolling_cache(mistral, tokenizer):
    """echo + logprobs over two prompts longer than the window: each prompt token's log-probability
    as transformers computes it (the rolling cache prefills such prompts one row at a time)."""
    from scribelm.serve.api import create_app
    from scribelm.serve.engine import ModelPool
    from tests.serving import ServerThread

    model, path = mistral
    texts = ["In the beginning God created the heaven and the earth. And the earth was without form",
             "Call me Ishmael. Some years ago, never mind how long"]
    pool = ModelPool({"swa": str(path)}, max_batch=4)
    with ServerThread(create_app(pool)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        scored = client.completions.create(model="swa", prompt=texts, max_tokens=0, echo=True, logprobs=1)
        assert pool.get("swa").prefix_cache is None  # a rolling cache holds no prompt's beginning
    for text, choice in zip(texts, sorted(scored.choices, key=lambda c: c.index)):
        ids = tokenizer.encode(text)
        assert len(ids) > WINDOW
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)  # (T-1, V)
        expected = logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        served = torch.tensor(choice.logprobs.token_logprobs[1:])
        assert choice.logprobs.token_logprobs[0] is None
        assert (served - expected).abs().max().item() <= 1e-4
