"""T5 samples through the one decode core: every token it draws is one that
`transformers`' own logits warpers (temperature, top-k, top-p) keep at that step, with the
model's log-probability there equal to transformers', and streaming gives the text `generate`
gives. (Seeded draws use scribelm's batched inverse-CDF sampler, so they are reproducible but
not the same tokens as torch.multinomial's.)"""

import pytest
import torch

import scribelm
from scribelm.generate import stream
from tests.encoders.test_t5 import save_tiny_hf_t5

PROMPT = [5, 17, 42, 8, 9, 60, 33, 2, 71]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5sample")
    return save_tiny_hf_t5(path, "gated-gelu", False, seed=3), scribelm.load(path)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7), dict(temperature=1.3, top_k=10), dict(temperature=0.9, top_p=0.8),
    dict(temperature=0.8, top_k=5, top_p=0.9),
])
def test_sampled_tokens_are_what_transformers_warpers_keep(t5, settings):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    reference, lm = t5
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings["temperature"])])
    if settings.get("top_k"):
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p"):
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    start = reference.config.decoder_start_token_id
    for seed in (0, 1, 2):
        ours = lm.generate(PROMPT, max_new_tokens=32, seed=seed, return_details=True, logprobs=True, **settings)
        assert ours.prompt_tokens == len(PROMPT) and ours.token_ids
        decoder_ids = torch.tensor([[start, *ours.token_ids]])
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([PROMPT]), decoder_input_ids=decoder_ids).logits[0]  # (T+1, V)
        for t, token in enumerate(ours.token_ids):
            kept = warpers(decoder_ids[:, : t + 1], logits[t : t + 1].clone())[0]
            assert torch.isfinite(kept[token]), f"step {t}: token {token} is outside transformers' warped support"
            assert ours.logprobs[t].logprob == pytest.approx(float(logits[t].log_softmax(-1)[token]), abs=1e-4)


def test_limits_of_sampling_are_greedy_and_seeds_reproduce(t5):
    _, lm = t5
    greedy = lm.generate(PROMPT, max_new_tokens=20, temperature=0, return_details=True).token_ids
    assert lm.generate(PROMPT, max_new_tokens=20, temperature=1.0, top_k=1, seed=5, return_details=True).token_ids == greedy
    assert lm.generate(PROMPT, max_new_tokens=20, temperature=1e-6, seed=5, return_details=True).token_ids == greedy
    first = lm.generate(PROMPT, max_new_tokens=20, temperature=1.5, seed=11, return_details=True).token_ids
    assert lm.generate(PROMPT, max_new_tokens=20, temperature=1.5, seed=11, return_details=True).token_ids == first
    choices = lm.generate(PROMPT, max_new_tokens=20, temperature=1.5, seed=11, num_return_sequences=3,
                          return_details=True)
    assert choices[0].token_ids == first  # choice i draws with seed + i
    assert len({tuple(c.token_ids) for c in choices}) > 1


def test_streaming_gives_the_generated_text(t5, tokenizer):
    _, lm = t5
    lm.tokenizer = tokenizer  # any tokenizer turns the decoder's ids into text
    try:
        for settings in (dict(temperature=0), dict(temperature=1.2, top_p=0.9, seed=4)):
            whole = lm.generate(PROMPT, max_new_tokens=24, **settings)
            pieces = list(stream(lm, PROMPT, max_new_tokens=24, **settings))
            assert len(pieces) > 1 and "".join(pieces) == whole
            assert "".join(lm.stream(PROMPT, max_new_tokens=24, **settings)) == whole
    finally:
        lm.tokenizer = None
