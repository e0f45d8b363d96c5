"""Chunked prefill: a long prompt goes in a chunk per engine turn, running streams keep decoding,
and every answer is the one the whole-prompt prefill gives."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from scribelm.lm import LM
from scribelm.model import Transformer
from scribelm.sampling import SamplingSettings
from scribelm.serve.api import create_app
from scribelm.serve.engine import Engine, FinishEvent, GenerationRequest, ModelPool, TokenEvent
from tests.conftest import tiny_config
from tests.serving import ServerThread, save_tiny_models

CHUNK = 16


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(3)
    model = Transformer(tiny_config(context_length=256)).eval()
    with torch.no_grad():  # special tokens never win: every stream runs to max_tokens
        model.unembedding.weight[sorted(tokenizer.special_ids)] = 0.0
    return LM(model, tokenizer)


def prompts_of(tokenizer) -> list[list[int]]:
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8
    ids = tokenizer.encode(text)
    # short (one chunk), just over a chunk, several chunks, and one that ends exactly on a chunk boundary
    return [ids[:9], ids[: CHUNK + 1], ids[:100], ids[: 4 * CHUNK], ids[:5]]


def run_engine(lm, prompts, *, prefill_chunk: int, settings: dict, n: list[int] | None = None,
               prefix_cache_bytes: int = 0, order: list | None = None, speculator=None) -> dict[int, list[TokenEvent]]:
    """Submit every prompt before the engine starts (so what happens is decided by the engine, not by
    timing), run to the end; each choice's token events, by choice index (prompt k numbered from 10 k)."""
    engine = Engine(lm, max_batch=8, prefill_chunk=prefill_chunk, prefix_cache_bytes=prefix_cache_bytes,
                    speculator=speculator)

    async def main():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests = [engine.submit(GenerationRequest(list(p), SamplingSettings(**settings), n=(n or [1] * len(prompts))[k],
                                                    choice_offset=10 * k, loop=loop, events=events))
                    for k, p in enumerate(prompts)]
        engine.start()
        streams: dict[int, list[TokenEvent]] = {}
        finished = 0
        while finished < sum(r.n for r in requests):
            event = await asyncio.wait_for(events.get(), 60)
            assert not hasattr(event, "message"), event  # no ErrorEvent
            if order is not None:
                order.append(event)
            if isinstance(event, FinishEvent):
                finished += 1
            elif isinstance(event, TokenEvent):
                streams.setdefault(event.index, []).append(event)
        return streams

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def same_streams(a: dict[int, list[TokenEvent]], b: dict[int, list[TokenEvent]]) -> None:
    assert sorted(a) == sorted(b)
    for index in a:
        assert [e.token_id for e in a[index]] == [e.token_id for e in b[index]], index  # the same tokens
        if a[index][0].logprob is not None:
            lp_a = torch.tensor([e.logprob for e in a[index]])
            lp_b = torch.tensor([e.logprob for e in b[index]])
            assert torch.allclose(lp_a, lp_b, atol=1e-5), (index, (lp_a - lp_b).abs().max())
            assert [[t for t, _ in e.top_logprobs] for e in a[index]] == [[t for t, _ in e.top_logprobs] for e in b[index]]


def test_chunked_prefill_gives_the_answers_of_whole_prompts(lm, tokenizer, one_thread):
    prompts = prompts_of(tokenizer)
    greedy = dict(max_new_tokens=12, temperature=0.0, logprobs=True, top_logprobs=2)
    whole = run_engine(lm, prompts, prefill_chunk=0, settings=greedy)
    chunked = run_engine(lm, prompts, prefill_chunk=CHUNK, settings=greedy)
    same_streams(whole, chunked)
    assert all(len(whole[10 * k]) == 12 for k in range(len(prompts)))
    # Seeded sampling with several choices per prompt draws the same tokens too.
    sampled = dict(max_new_tokens=8, temperature=0.9, seed=7, logprobs=True, top_logprobs=1)
    choices = [1, 3, 2, 1, 1]
    same_streams(run_engine(lm, prompts, prefill_chunk=0, settings=sampled, n=choices),
                 run_engine(lm, prompts, prefill_chunk=CHUNK, settings=sampled, n=choices))


def test_chunked_prefill_of_a_sliding_window_model(tokenizer, one_thread):
    """A sliding-window model's rows hold the last W positions only (a rolling cache): chunks of a
    prompt longer than the window give the answers of the whole prompt too."""
    torch.manual_seed(4)
    model = Transformer(tiny_config(context_length=256, sliding_window=24)).eval()
    windowed = LM(model, tokenizer)
    prompts = prompts_of(tokenizer)
    greedy = dict(max_new_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2)
    same_streams(run_engine(windowed, prompts, prefill_chunk=0, settings=greedy),
                 run_engine(windowed, prompts, prefill_chunk=CHUNK, settings=greedy))


def test_chunked_prefill_with_speculative_decoding(lm, tokenizer, one_thread):
    """A long prompt that joins the batch after its chunks is speculated on like any other row."""
    from scribelm.generate import make_speculator

    prompts = prompts_of(tokenizer)
    greedy = dict(max_new_tokens=10, temperature=0.0)
    plain = run_engine(lm, prompts, prefill_chunk=0, settings=greedy)
    speculated = run_engine(lm, prompts, prefill_chunk=CHUNK, settings=greedy,
                            speculator=make_speculator(lm, "prompt_lookup", num_draft=3))
    assert {i: [e.token_id for e in s] for i, s in plain.items()} == {i: [e.token_id for e in s] for i, s in speculated.items()}


def test_chunked_prefill_with_a_cached_prefix(lm, tokenizer, one_thread):
    """A long prompt whose beginning is in the prefix cache starts from there and answers the same."""
    ids = prompts_of(tokenizer)[2]
    greedy = dict(max_new_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2)
    expected = run_engine(lm, [ids], prefill_chunk=0, settings=greedy)
    engine = Engine(lm, max_batch=4, prefill_chunk=CHUNK, prefix_cache_bytes=8 << 20)

    async def ask(prompt):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = engine.submit(GenerationRequest(list(prompt), SamplingSettings(**greedy), loop=loop, events=events))
        tokens = []
        while not isinstance(event := await asyncio.wait_for(events.get(), 60), FinishEvent):
            tokens.append(event)
        return request, {0: tokens}

    engine.start()
    try:
        _, first = asyncio.run(ask(ids[:80]))  # stores the keys/values of its blocks
        request, again = asyncio.run(ask(ids))
    finally:
        engine.stop()
    assert request.cached_tokens > CHUNK  # what the cache gave was not prefilled again
    same_streams(expected, again)


def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled(lm, tokenizer, one_thread):
    text = "Call me Ishmael. Some years ago, never mind how long precisely, having little money. " * 8
    long = tokenizer.encode(text)[:6 * CHUNK]
    short = tokenizer.encode("In the beginning")
    greedy = dict(max_new_tokens=30, temperature=0.0)
    chunks = -(-(len(long) - CHUNK + len(short)) // CHUNK) + 1  # turns until its last chunk (the first shares with the short)

    def short_tokens_before_long_starts(prefill_chunk: int) -> int:
        order: list = []
        run_engine(lm, [short, long], prefill_chunk=prefill_chunk, settings=greedy, order=order)
        first_long = next(i for i, e in enumerate(order) if isinstance(e, TokenEvent) and e.index == 10)
        return sum(1 for e in order[:first_long] if isinstance(e, TokenEvent) and e.index == 0)

    # Whole: the long prompt is prefilled in the turn the short one starts; both first tokens come together.
    assert short_tokens_before_long_starts(0) == 1
    # Chunked: the running stream gets a token every turn while the long prompt goes in chunk by chunk.
    assert short_tokens_before_long_starts(CHUNK) >= chunks - 1 >= 5


def test_server_streams_the_same_answers_with_and_without_chunks(tmp_path, tokenizer, one_thread):
    """Through the HTTP API with the openai client: concurrent long and short requests, chunked or not."""
    import concurrent.futures

    paths = save_tiny_models(tmp_path, tokenizer, context_length=256, text_only=True)
    long_prompt = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 5
    questions = [long_prompt, "Call me Ishmael.", long_prompt + " The end", "The quick brown fox"]

    def answers(prefill_chunk: int):
        pool = ModelPool({"alpha": paths["alpha"]}, max_batch=4, prefix_cache_bytes=0, prefill_chunk=prefill_chunk)
        with ServerThread(create_app(pool)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

            def ask(prompt):
                r = client.completions.create(model="alpha", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
                return r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs

            with concurrent.futures.ThreadPoolExecutor(len(questions)) as workers:
                return list(workers.map(ask, questions))

    for (tokens_a, lp_a), (tokens_b, lp_b) in zip(answers(0), answers(CHUNK)):
        assert tokens_a == tokens_b and len(tokens_a) == 10
        assert torch.allclose(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-5)


def test_prefill_chunk_must_not_be_negative(lm, tmp_path):
    from scribelm.errors import ScribeError
    from tests.serving import run_scribe_serve

    with pytest.raises(ScribeError, match="prefill_chunk"):
        Engine(lm, prefill_chunk=-1)
    done = run_scribe_serve(str(lm.save(tmp_path / "m")), "--port", "0", "--prefill-chunk", "-1")
    assert done.returncode == 2 and "error: --prefill-chunk must be 0" in done.stderr and "Traceback" not in done.stderr
