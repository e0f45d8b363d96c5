import itertools
import math

import pytest
import torch

from scribelm import LM, ModelConfig, Tokenizer, Transformer
from scribelm.cache import ContextOverflowError
from scribelm.errors import ScribeError
from scribelm.generate import BatchGeneration, beam_search
from scribelm.sampling import SamplingSettings
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def random_lm(tokenizer):
    torch.manual_seed(0)
    return LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size)).eval(), tokenizer)


def byte_token_ids(tokenizer) -> dict[int, int]:
    """byte value -> id of the token that is exactly that byte."""
    out = {}
    for i in range(tokenizer.vocab_size):
        b = tokenizer.token_bytes(i)
        if len(b) == 1 and i not in tokenizer.special_ids:
            out.setdefault(b[0], i)
    return out


def scripted_lm(tokenizer, script: list[int], context: int = 64) -> LM:
    """A model whose next token depends only on the position: after position p it
    predicts script[p] with near certainty (one-hot position embeddings, blocks
    that add nothing, an unembedding that maps position p to script[p])."""
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, context_length=context, d_model=context, n_layers=1, n_heads=1, d_mlp=8,
        activation="gelu", norm="rmsnorm", norm_bias=False, position="learned", qkv_bias=False,
        attn_out_bias=False, mlp_bias=False, tie_embeddings=False,
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.token_embedding.weight.zero_()
        model.position_embedding.weight.copy_(torch.eye(context))
        for block in model.blocks:
            block.attention.o.weight.zero_()
            block.mlp.down.weight.zero_()
        model.unembedding.weight.zero_()
        for p, token in enumerate(script):
            model.unembedding.weight[token, p] = 4.0  # logit 4·sqrt(context) = 32 for the scripted token
    return LM(model, tokenizer)


def as_byte_tokens(tokenizer, text: str) -> list[int]:
    table = byte_token_ids(tokenizer)
    return [table[b] for b in text.encode()]


# ----------------------------------------------------------------------------- the cache inside the loop


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "none"])
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_generation_logprobs_equal_full_forward(position, kv_heads):
    """Every step's log-probabilities (KV cache, batched with padding) equal a forward pass
    over the whole sequence without a cache."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(position=position, n_kv_heads=kv_heads)).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    settings = SamplingSettings(temperature=0, max_new_tokens=8, logprobs=True, top_logprobs=3)
    done = BatchGeneration(model, None, prompts, settings).run()
    for prompt, c in zip(prompts, done):
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            full = model(ids).log_softmax(-1)[0]  # (T, V)
        for k, lp in enumerate(c.logprobs):
            row = full[len(prompt) - 1 + k]
            assert lp.token_id == row.argmax().item()
            assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
            assert [t["token_id"] for t in lp.top] == row.topk(3).indices.tolist()


# ----------------------------------------------------------------------------- greedy equivalences


def test_top_k_1_and_low_temperature_equal_greedy(random_lm):
    greedy = random_lm.generate("It was the", max_new_tokens=15, temperature=0)
    assert random_lm.generate("It was the", max_new_tokens=15, top_k=1, seed=5) == greedy
    assert random_lm.generate("It was the", max_new_tokens=15, temperature=1e-5, seed=5) == greedy


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_batched_equals_one_by_one(tokenizer, position):
    torch.manual_seed(1)
    lm = LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, position=position)).eval(), tokenizer)
    prompts = ["It", "Call me Ishmael. Some years", "The quick brown fox", "In the beginning God created the heaven"]
    batched = lm.generate(prompts, max_new_tokens=12, temperature=0, return_details=True)
    alone = [lm.generate(p, max_new_tokens=12, temperature=0, return_details=True) for p in prompts]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert len({len(tokenizer.encode(p)) for p in prompts}) == 4  # really different lengths


def test_seeds_reproduce(random_lm):
    a = random_lm.generate("It was", max_new_tokens=12, seed=11, temperature=1.2)
    assert random_lm.generate("It was", max_new_tokens=12, seed=11, temperature=1.2) == a
    others = {random_lm.generate("It was", max_new_tokens=12, seed=s, temperature=1.2) for s in range(3)}
    assert len(others) > 1
    # a seeded prompt gives the same text inside a batch
    batch = random_lm.generate(["Call me", "It was"], max_new_tokens=12, seed=11, temperature=1.2)
    assert batch[1] == a
    # several return sequences differ from each other and reproduce too
    three = random_lm.generate("It was", max_new_tokens=10, seed=3, num_return_sequences=3)
    assert isinstance(three, list) and len(three) == 3 and len(set(three)) > 1
    assert random_lm.generate("It was", max_new_tokens=10, seed=3, num_return_sequences=3) == three


# ----------------------------------------------------------------------------- beam search


def test_beam_search_with_one_beam_equals_greedy(random_lm):
    model = random_lm.model
    greedy = BatchGeneration(model, None, [[5, 9, 3]], SamplingSettings(temperature=0, max_new_tokens=10)).run()[0]
    beam = beam_search(model, None, [5, 9, 3], SamplingSettings(num_beams=1, max_new_tokens=10))[0]
    assert beam.token_ids == greedy.token_ids
    # and through the public API, with a tokenizer (EOS possible)
    assert random_lm.generate("It was", max_new_tokens=10, num_beams=1, temperature=0) == random_lm.generate(
        "It was", max_new_tokens=10, temperature=0)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_exhaustive_optimum(length_penalty):
    torch.manual_seed(3)
    V, EOS, max_new = 4, 0, 3
    model = Transformer(tiny_config(vocab_size=V, d_model=16, n_heads=2, n_kv_heads=1, d_mlp=32)).eval()
    with torch.no_grad():  # a peaky distribution so that the choice matters
        model.unembedding.weight.mul_(40)
    prompt = [1, 2]

    candidates = []
    for n in range(1, max_new + 1):
        for body in itertools.product(range(1, V), repeat=n - 1):
            candidates.append(list(body) + [EOS])  # ends with EOS
    candidates += [list(s) for s in itertools.product(range(1, V), repeat=max_new)]  # runs out of tokens
    # every candidate's log-probabilities from one batched forward (right-padded: causal, so harmless)
    padded = torch.tensor([prompt + c + [1] * (max_new - len(c)) for c in candidates])
    with torch.no_grad():
        table = model(padded).log_softmax(-1)  # (N, T, V)
    totals = {
        tuple(c): sum(table[n, len(prompt) - 1 + i, t].item() for i, t in enumerate(c)) for n, c in enumerate(candidates)
    }

    def score(seq):
        return totals[tuple(seq)] / len(seq) ** length_penalty
    best = max(candidates, key=score)
    settings = SamplingSettings(num_beams=40, max_new_tokens=max_new, stop_token_ids=[EOS],
                                length_penalty=length_penalty, num_return_sequences=3)
    found = beam_search(model, None, prompt, settings)
    assert found[0].token_ids == best
    assert found[0].score == pytest.approx(score(best), abs=1e-4)
    assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)
    ranked = sorted(candidates, key=score, reverse=True)
    assert [c.token_ids for c in found] == ranked[:3]
    greedy = BatchGeneration(model, None, [prompt], SamplingSettings(temperature=0, max_new_tokens=max_new,
                                                                     stop_token_ids=[EOS])).run()[0]
    assert score(best) >= score(greedy.token_ids) - 1e-6


def test_beam_search_details_through_lm(random_lm):
    out = random_lm.generate("It was", max_new_tokens=6, num_beams=4, num_return_sequences=2, return_details=True)
    assert len(out) == 2 and out[0].score >= out[1].score
    assert all(c.finish_reason in ("stop", "length") for c in out)
    texts = random_lm.generate(["It was", "Call me"], max_new_tokens=6, num_beams=3)
    assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)


# ----------------------------------------------------------------------------- streaming and stops


MULTIBYTE = "Hé 你好🎉 ok"


def test_streaming_equals_generate_with_multibyte_output(tokenizer):
    script = as_byte_tokens(tokenizer, MULTIBYTE) + [tokenizer.eos_id]
    lm = scripted_lm(tokenizer, script)
    prompt = [tokenizer.bos_id]
    deltas = list(lm.stream(prompt, max_new_tokens=40, temperature=0))
    details = lm.generate(prompt, max_new_tokens=40, temperature=0, return_details=True)
    assert "".join(deltas) == details.text == MULTIBYTE
    assert all("\ufffd" not in d for d in deltas)
    assert details.finish_reason == "stop" and details.stop_reason == tokenizer.eos_id
    assert details.token_ids == script  # EOS included in ids, not in text
    # sampled (the script is near-certain) streams the same
    assert "".join(lm.stream(prompt, max_new_tokens=40, seed=0)) == MULTIBYTE


def test_streaming_equals_generate_on_random_model(random_lm):
    for seed in range(3):
        text = random_lm.generate("你好", max_new_tokens=25, seed=seed, temperature=1.5)
        assert "".join(random_lm.stream("你好", max_new_tokens=25, seed=seed, temperature=1.5)) == text


def test_stop_strings_across_token_boundaries(tokenizer):
    script = as_byte_tokens(tokenizer, "hello world, 你好 again") + [tokenizer.eos_id]
    lm = scripted_lm(tokenizer, script)
    prompt = [tokenizer.bos_id]
    d = lm.generate(prompt, max_new_tokens=40, temperature=0, stop=["lo w"], return_details=True)
    assert d.text == "hel" and d.finish_reason == "stop" and d.stop_reason == "lo w"
    assert len(d.token_ids) == len("hello w")  # stopped on the token that completed the stop string
    deltas = list(lm.stream(prompt, max_new_tokens=40, temperature=0, stop=["lo w"]))
    assert "".join(deltas) == "hel"
    # a stop string inside a multi-byte character sequence; the earliest of several wins
    assert lm.generate(prompt, max_new_tokens=40, temperature=0, stop=["好 a", "again"]) == "hello world, 你"
    # a partial match that never completes is released at the end
    assert lm.generate(prompt, max_new_tokens=40, temperature=0, stop=["again!"]) == "hello world, 你好 again"
    # stop token ids
    d = lm.generate(prompt, max_new_tokens=40, temperature=0, stop_token_ids=[script[5]], return_details=True)
    assert d.text == "hello" and d.stop_reason == script[5]
    # max new tokens
    d = lm.generate(prompt, max_new_tokens=4, temperature=0, return_details=True)
    assert d.text == "hell" and d.finish_reason == "length"


def test_chat_applies_template_and_stops_at_end_of_turn(tokenizer):
    end = tokenizer.token_to_id("<|end|>")
    script = as_byte_tokens(tokenizer, "Hi there") + [end] + as_byte_tokens(tokenizer, "junk")
    messages = [{"role": "user", "content": "hello"}]
    n_prompt = len(tokenizer.encode_chat(messages))
    lm = scripted_lm(tokenizer, [0] * (n_prompt - 1) + script)
    assert lm.chat(messages, temperature=0, max_new_tokens=30) == "Hi there"
    assert "".join(lm.chat(messages, temperature=0, max_new_tokens=30, stream=True)) == "Hi there"


# ----------------------------------------------------------------------------- context and bad input


def test_context_overflow_error_and_sliding_window(tokenizer):
    torch.manual_seed(0)
    lm = LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=16)).eval(), tokenizer)
    long_prompt = list(range(10, 30))  # 20 tokens
    with pytest.raises(ContextOverflowError, match="the prompt is 20 tokens but the model's context is 16"):
        lm.generate(long_prompt, max_new_tokens=3)
    d = lm.generate(list(range(10, 15)), max_new_tokens=40, temperature=0, return_details=True)
    assert d.finish_reason == "length" and len(d.token_ids) == 16 - 5 + 1  # stopped when the context filled
    slid = lm.generate(list(range(10, 15)), max_new_tokens=40, temperature=0, context_overflow="slide", return_details=True)
    assert len(slid.token_ids) == 40 and slid.finish_reason == "length"
    assert slid.token_ids[:12] == d.token_ids  # identical until the window first slides
    slid_long = lm.generate(long_prompt, max_new_tokens=5, temperature=0, context_overflow="slide", return_details=True)
    assert len(slid_long.token_ids) == 5
    # the window keeps the most recent tokens: same as prompting with them directly
    assert slid_long.token_ids == lm.generate(long_prompt[-12:], max_new_tokens=5, temperature=0, return_details=True).token_ids


def test_empty_prompt(tokenizer, random_lm):
    out = random_lm.generate("", max_new_tokens=3, temperature=0, return_details=True)  # starts from BOS
    assert out.prompt_tokens == 1 and len(out.token_ids) == 3
    no_bos = Tokenizer.train(["abc abc abd"] * 5, vocab_size=270, special_tokens=["<|eos|>"])
    assert no_bos.bos_id is None
    lm = LM(random_lm.model, no_bos)
    with pytest.raises(ScribeError, match="the prompt is empty and the tokenizer has no BOS token"):
        lm.generate("", max_new_tokens=3)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(temperature=math.nan), "temperature is NaN"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(temprature=0.5), "unknown generation setting"),
        (dict(logit_bias={100000: 1}), "outside the vocabulary"),
    ],
)
def test_bad_input_through_lm(random_lm, settings, message):
    with pytest.raises(ScribeError, match=message):
        random_lm.generate("It was", max_new_tokens=3, **settings)
    with pytest.raises(ScribeError, match=message):
        random_lm.stream("It was", max_new_tokens=3, **settings)  # raises before iteration


def test_streaming_refuses_beams(random_lm):
    with pytest.raises(ScribeError, match="streaming gives one sequence"):
        random_lm.stream("It was", num_beams=2)


def test_checkpoint_generation_defaults_apply(tmp_path, random_lm):
    lm = LM(random_lm.model, random_lm.tokenizer, {"temperature": 0, "max_new_tokens": 7, "chat_template": "x"})
    d = lm.generate("It was", return_details=True)
    assert len(d.token_ids) == 7 or d.finish_reason == "stop"
    assert d.text == random_lm.generate("It was", temperature=0, max_new_tokens=7)


# ----------------------------------------------------------------------------- text decoded at the end


def _fields(completions):
    return [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in completions]


def test_deferred_text_equals_the_text_streamed_token_by_token(random_lm, tokenizer):
    prompts = [tokenizer.encode(p) for p in ("It was", "Call me", "In the beginning")] * 2
    settings = SamplingSettings(max_new_tokens=20, temperature=1.5, seed=4)
    streamed = BatchGeneration(random_lm.model, tokenizer, prompts, settings, seed_offsets=list(range(6))).run()
    deferred = BatchGeneration(random_lm.model, tokenizer, prompts, settings, seed_offsets=list(range(6)),
                               defer_text=True)
    events = [e for step in deferred for e in step]
    assert _fields(deferred.completions) == _fields(streamed)
    assert all(e.text == "" for e in events if not e.finished)  # everything comes with the last event
    assert "".join(e.text for e in events) == "".join(c.text for c in streamed)
    # multi-byte characters cut across tokens, and a stop token (whose text is not shown)
    stop = as_byte_tokens(tokenizer, "!")[0]
    script = as_byte_tokens(tokenizer, "é€ 😀 ok") + [stop]
    scripted = scripted_lm(tokenizer, script)
    greedy = SamplingSettings(max_new_tokens=30, temperature=0, stop_token_ids=[stop])
    both = [BatchGeneration(scripted.model, tokenizer, [[script[0]]], greedy, defer_text=d).run() for d in (False, True)]
    assert _fields(both[1]) == _fields(both[0]) and both[1][0].finish_reason == "stop"
    assert both[1][0].text == "é€ 😀 ok"


def test_stop_strings_keep_the_running_text(random_lm, tokenizer):
    prompt = [tokenizer.encode("It was")]
    full = BatchGeneration(random_lm.model, tokenizer, prompt, SamplingSettings(max_new_tokens=20, temperature=0)).run()[0]
    stop = full.text[3:5]
    settings = SamplingSettings(max_new_tokens=20, temperature=0, stop=[stop])
    plain, deferred = (BatchGeneration(random_lm.model, tokenizer, prompt, settings, defer_text=d).run()[0]
                       for d in (False, True))
    assert deferred.text == plain.text == full.text[: full.text.index(stop)] and deferred.finish_reason == "stop"
