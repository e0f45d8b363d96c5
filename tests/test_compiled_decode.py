"""The compiled decode step gives the eager step's tokens (and, up to rounding, its log-probabilities)."""

import pytest
import torch

from scribelm import LM, Transformer
from scribelm.cache import KVCache
from scribelm.compiled_decode import CompiledStep, static_cache_length
from scribelm.decode import feed, prefill
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def varied_lm(tokenizer):
    torch.manual_seed(3)
    # A large init spreads the logits, so greedy continuations vary from step to step.
    return LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, init_std=0.3)).eval(), tokenizer)


def test_compiled_generation_gives_the_eager_tokens(varied_lm):
    """Prompts of different lengths in one batch (rows of the cache at different lengths)."""
    prompts = ["It was the best", "Call me Ishmael. Some years ago", "The"]
    args = dict(max_new_tokens=12, temperature=0, logprobs=True, return_details=True)
    eager = varied_lm.generate(prompts, **args)
    compiled = varied_lm.generate(prompts, compile=True, **args)
    for e, c in zip(eager, compiled):
        assert c.token_ids == e.token_ids and c.text == e.text and c.finish_reason == e.finish_reason
        assert len(set(e.token_ids)) > 3  # a real continuation, not one token repeated
        for le, lc in zip(e.logprobs, c.logprobs):
            assert lc.logprob == pytest.approx(le.logprob, abs=1e-4)


def test_compiled_step_advances_only_the_rows_it_feeds(varied_lm):
    model = varied_lm.model
    step = CompiledStep(model)
    cache, reference = (KVCache(model.config, 3, 64) for _ in range(2))
    with torch.inference_mode():
        for c in (cache, reference):
            prefill(model, c, 0, [[5, 6, 7], [8, 9, 10, 11, 12]])
        ours = step(cache, [13, 14])
        theirs = feed(model, reference, [13, 14])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert cache.lengths.tolist() == [4, 6, 0]


def test_static_cache_lengths_are_few():
    assert [static_cache_length(n, 4096) for n in (1, 64, 65, 300, 5000)] == [64, 64, 128, 512, 4096]


def test_compiled_engine_answers_as_eager_generation(varied_lm):
    """The server's step compiled over every slot: requests of different lengths that join
    one batch get LM.generate's greedy text."""
    import asyncio

    from scribelm.sampling import SamplingSettings
    from scribelm.serve.engine import Engine, FinishEvent, GenerationRequest

    prompts = ["Call me", "It was the best of times", "The quick brown"]
    expected = [varied_lm.generate(p, max_new_tokens=10, temperature=0) for p in prompts]
    engine = Engine(varied_lm, name="varied", max_batch=4, max_context=64, compile=True).start()
    loop = asyncio.new_event_loop()
    try:
        requests = [GenerationRequest(prompt_ids=varied_lm.tokenizer.encode(p), loop=loop, events=asyncio.Queue(),
                                      settings=SamplingSettings(max_new_tokens=10, temperature=0)) for p in prompts]
        for r in requests:
            engine.submit(r)

        async def text(r):
            pieces = []
            while not isinstance(event := await r.events.get(), FinishEvent):
                pieces.append(event.text)
            return "".join(pieces)

        async def every_text():
            return await asyncio.wait_for(asyncio.gather(*(text(r) for r in requests)), 300)

        got = loop.run_until_complete(every_text())
    finally:
        engine.stop()
        loop.close()
    assert got == expected
