"""The prefix cache: a prompt that starts like an earlier one prefills only the rest, and answers as without."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from scribelm.serve.prefix_cache import BLOCK, PrefixCache, block_keys
from tests.serving import ServerThread, save_tiny_models

SYSTEM = ("You are a careful assistant. It was the best of times, it was the worst of times, it was the age of wisdom. "
          "In the beginning God created the heaven and the earth. Call me Ishmael.")


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("prefix"), tokenizer, context_length=512, text_only=True)


def serve(paths, prefix_bytes: int):
    return ServerThread(create_app(ModelPool({"alpha": paths["alpha"]}, max_batch=8, prefix_cache_bytes=prefix_bytes)))


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        messages += [{"role": "user", "content": f"Question {t}: the quick brown fox?"},
                     {"role": "assistant", "content": f"Answer {t}: the lazy dog."}]
    return messages + [{"role": "user", "content": "And now?"}]


def ask(client, messages, **extra):
    return client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2, **extra)


def answer_of(r):
    return [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in r.choices[0].logprobs.content]


def same_answer(a, b):
    assert [t for t, _, _ in a] == [t for t, _, _ in b]  # greedy tokens identical
    assert torch.allclose(torch.tensor([lp for _, lp, _ in a]), torch.tensor([lp for _, lp, _ in b]), atol=1e-5)
    assert [[t for t, _ in top] for _, _, top in a] == [[t for t, _ in top] for _, _, top in b]


def expected_cached(sent: list[list[int]], ids: list[int]) -> int:
    """Full blocks of the longest prefix shared with a prompt sent before, leaving one token to prefill."""
    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    shared = max((common(p, ids) for p in sent), default=0)
    return min(shared, len(ids) - 1) // BLOCK * BLOCK


def test_cached_prefixes_give_the_same_answers(paths, tokenizer):
    with serve(paths, 0) as cold_server:
        cold = openai.OpenAI(base_url=cold_server.url + "/v1", api_key="x", max_retries=0)
        expected = [answer_of(ask(cold, conversation(t))) for t in range(3)]
        assert ask(cold, conversation(0)).usage.prompt_tokens_details.cached_tokens == 0
    with serve(paths, 64 << 20) as warm_server:
        warm = openai.OpenAI(base_url=warm_server.url + "/v1", api_key="x", max_retries=0)
        first = ask(warm, conversation(0))
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        same_answer(answer_of(first), expected[0])
        sent = [tokenizer.encode_chat(conversation(0))]
        for t in range(3):  # each turn resends the conversation so far: its beginning is cached
            r = ask(warm, conversation(t))
            ids = tokenizer.encode_chat(conversation(t))
            assert r.usage.prompt_tokens == len(ids)
            assert r.usage.prompt_tokens_details.cached_tokens == expected_cached(sent, ids) > 0
            sent.append(ids)
            same_answer(answer_of(r), expected[t])
        streamed = list(warm.chat.completions.create(model="alpha", messages=conversation(2), max_tokens=4, stream=True,
                                                     stream_options={"include_usage": True}))
        assert streamed[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_concurrent_requests_share_a_prefix(paths):
    with serve(paths, 0) as cold_server:
        cold = openai.OpenAI(base_url=cold_server.url + "/v1", api_key="x", max_retries=0)
        expected = [answer_of(ask(cold, conversation(1) + [{"role": "user", "content": f"variant {k}"}])) for k in range(6)]
    with serve(paths, 64 << 20) as server:
        warm = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        ask(warm, conversation(1))  # the shared beginning is now cached

        async def all_at_once():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
                return await asyncio.gather(*(aclient.chat.completions.create(
                    model="alpha", messages=conversation(1) + [{"role": "user", "content": f"variant {k}"}], max_tokens=8,
                    temperature=0, logprobs=True, top_logprobs=2) for k in range(6)))

        for k, r in enumerate(asyncio.run(all_at_once())):
            assert r.usage.prompt_tokens_details.cached_tokens > 0
            same_answer(answer_of(r), expected[k])


def test_eviction_keeps_within_the_budget_and_drops_the_least_recently_used(paths, tokenizer):
    from scribelm.cache import KVCache
    from scribelm.config import ModelConfig

    config = ModelConfig(vocab_size=400, context_length=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64)
    cache = KVCache(config, 2, 256)
    cache.keys.normal_(), cache.values.normal_()
    block_bytes = 2 * config.n_layers * config.n_kv_heads * BLOCK * config.head_dim * 4
    store = PrefixCache(budget_bytes=5 * block_bytes)
    a, b = list(range(1, 65)), list(range(100, 164))  # 4 blocks each
    store.store(a, cache, 0)
    assert len(store) == 4 and store.nbytes == 4 * block_bytes
    assert len(store.lookup(a + [7])) == 4  # a is now the most recently used
    store.store(b, cache, 1)  # 8 blocks do not fit in 5: a's are the oldest and go, leaves first
    assert store.nbytes <= 5 * block_bytes and store.evictions == 3
    assert len(store.lookup(b + [7])) == 4
    kept = store.lookup(a + [7])
    assert len(kept) == 1  # a's first block survived: its descendants were evicted before it
    assert torch.equal(kept[0][0], cache.keys[:, 0, :, :BLOCK])
    assert block_keys(a)[:2] == block_keys(a[:40])[:2] and block_keys(a)[0] != block_keys(b)[0]
