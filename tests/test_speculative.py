"""Speculative decoding changes the speed, never the output: the same tokens as plain
greedy decoding, and with sampling the same distribution, checked by a chi-square test
against the model's exact probabilities on a small vocabulary."""

import json

import pytest
import torch
from scipy.stats import chisquare

from scribelm import LM, Transformer
from scribelm.cli import main
from scribelm.errors import ScribeError
from scribelm.generate import BatchGeneration
from scribelm.sampling import SamplingSettings
from scribelm.speculative import NgramIndex, Speculator, accept_or_resample
from tests.conftest import CORPUS, tiny_config


def sharpened(model: Transformer, scale: float) -> Transformer:
    """Random weights scaled up: peaked next-token distributions, so greedy text repeats
    itself (prompt lookup then finds matches) and sampling is far from uniform."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(0)
    return LM(sharpened(Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), 4.0), tokenizer)


@pytest.fixture(scope="module")
def draft_lm(tokenizer):
    torch.manual_seed(1)
    return LM(sharpened(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, n_layers=1)), 4.0), tokenizer)


def fifty_prompts() -> list[str]:
    words = " ".join(dict.fromkeys(CORPUS)).split()
    prompts = [" ".join(words[i : i + 1 + i % 9]) for i in range(0, 48)]
    prompts.append("it was the age of wisdom, it was the age of wisdom, it was the age of")  # copy-heavy
    prompts.append(" ".join(words * 3)[:150])  # near the context's end: drafts are clipped there
    return prompts


def same(plain, fast) -> None:
    for a, b in zip(plain, fast, strict=True):
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (a.token_ids, a.text, a.finish_reason, a.stop_reason)


@pytest.mark.parametrize("limits", [dict(max_new_tokens=24, stop=["ing", "the w"]), dict(max_new_tokens=6)])
def test_greedy_is_token_identical_to_plain_decoding_on_50_prompts(lm, draft_lm, limits, one_thread):
    prompts = fifty_prompts()
    assert len(prompts) == 50 and max(len(lm.tokenizer.encode(p)) for p in prompts) > 40
    plain = lm.generate(prompts, temperature=0, return_details=True, **limits)
    assert any(c.finish_reason == "stop" for c in plain) or "stop" not in limits
    lookup = lm.generate(prompts, temperature=0, return_details=True, speculative="prompt_lookup", **limits)
    same(plain, lookup)
    drafted = lm.generate(prompts, temperature=0, return_details=True, draft=draft_lm, num_draft=3, **limits)
    same(plain, drafted)
    assert sum(c.accepted_draft_tokens for c in lookup) > 0 and sum(c.draft_tokens for c in drafted) > 0
    for c in lookup:  # every token is counted once: drafts kept never exceed the tokens emitted after the first
        assert c.accepted_draft_tokens <= max(len(c.token_ids) - 1, 0) and c.accepted_draft_tokens <= c.draft_tokens


def test_stop_token_ids_end_rows_where_plain_decoding_does(lm, draft_lm, one_thread):
    prompts = fifty_prompts()
    first = lm.generate(prompts, temperature=0, max_new_tokens=16, return_details=True)
    counts = torch.bincount(torch.tensor([t for c in first for t in c.token_ids[2:]]))
    stop = int(counts.argmax())  # a token many rows write, after their first few
    kw = dict(temperature=0, max_new_tokens=16, stop_token_ids=[stop], return_details=True)
    plain = lm.generate(prompts, **kw)
    assert sum(c.stop_reason == stop for c in plain) >= 5
    same(plain, lm.generate(prompts, speculative="prompt_lookup", **kw))
    same(plain, lm.generate(prompts, draft=draft_lm, num_draft=4, **kw))


def test_a_draft_that_is_the_model_itself_is_always_right(lm, one_thread):
    """Its guesses are the model's own greedy tokens: all kept, so k + 1 tokens per step; this
    holds only if the draft's cache follows every accepted token exactly."""
    prompts = fifty_prompts()[:8]
    plain = lm.generate(prompts, temperature=0, max_new_tokens=20, return_details=True)
    fast = lm.generate(prompts, temperature=0, max_new_tokens=20, return_details=True, draft=lm, num_draft=4)
    same(plain, fast)
    assert sum(c.accepted_draft_tokens for c in fast) == sum(c.draft_tokens for c in fast) > 0
    assert all(c.acceptance_rate == 1.0 for c in fast)
    # step by step, the draft's cache holds exactly the model's keys and values of the same tokens
    spec = Speculator("draft", 4, draft_model=lm.model)
    gen = BatchGeneration(lm.model, lm.tokenizer, [lm.tokenizer.encode(prompts[3])],
                          SamplingSettings(temperature=0, max_new_tokens=20), speculator=spec)
    for events in gen:
        if spec._draft_cache is not None:
            n = spec._draft_cache.row_length(0)
            assert 0 < n <= gen.cache.row_length(0)
            assert torch.allclose(spec._draft_cache.keys[:, 0, :, :n], gen.cache.keys[:, 0, :, :n], atol=1e-5)
            assert torch.allclose(spec._draft_cache.values[:, 0, :, :n], gen.cache.values[:, 0, :, :n], atol=1e-5)


def test_repeated_text_is_drafted_from_the_prompt(lm, one_thread):
    prompt = "the age of wisdom, it was the age of wisdom, it was the age of wisdom, it was"
    c = lm.generate(prompt, temperature=0, max_new_tokens=30, return_details=True, speculative="prompt_lookup")
    assert c.acceptance_rate is not None and c.acceptance_rate > 0.3
    gen = BatchGeneration(lm.model, lm.tokenizer, [lm.tokenizer.encode(prompt)],
                          SamplingSettings(temperature=0, max_new_tokens=30), speculator=Speculator("prompt_lookup", 5))
    steps = [len(events) for events in gen]
    assert sum(steps) == 30 and len(steps) < 30 and max(steps) > 1  # several tokens per pass


def test_penalties_and_logprobs_are_those_of_plain_decoding(lm, one_thread):
    prompts = fifty_prompts()[40:46]
    kw = dict(temperature=0, max_new_tokens=16, repetition_penalty=1.3, logprobs=True, top_logprobs=2,
              return_details=True)
    plain = lm.generate(prompts, **kw)
    fast = lm.generate(prompts, speculative="prompt-lookup", num_draft=3, **kw)
    same(plain, fast)
    for a, b in zip(plain, fast):
        assert [t.token_id for t in a.logprobs] == [t.token_id for t in b.logprobs]
        assert [t.logprob for t in b.logprobs] == pytest.approx([t.logprob for t in a.logprobs], abs=1e-4)
        assert [x["token_id"] for t in b.logprobs for x in t.top] == [x["token_id"] for t in a.logprobs for x in t.top]


def test_streaming_text_equals_the_generated_text(lm, draft_lm):
    prompt = fifty_prompts()[48]
    text = lm.generate(prompt, temperature=0, max_new_tokens=20)
    assert "".join(lm.stream(prompt, temperature=0, max_new_tokens=20, speculative="prompt_lookup")) == text
    assert "".join(lm.stream(prompt, temperature=0, max_new_tokens=20, draft=draft_lm)) == text


# ----------------------------------------------------------------------------- sampling: the distribution is p


V = 8  # a vocabulary small enough that the joint distribution of three tokens has 512 cells


def small_lm(seed: int, layers: int = 2) -> LM:
    torch.manual_seed(seed)
    return LM(sharpened(Transformer(tiny_config(vocab_size=V, context_length=32, n_layers=layers)), 3.0), None)


def exact_joint(lm: LM, prompt: list[int], temperature: float, top_k: int) -> torch.Tensor:
    """P(t1, t2, t3 | prompt) of plain sampling (V, V, V), from full forward passes without a cache."""
    seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])  # (V*V, P + 2)
    with torch.no_grad():
        logits = lm.model(seqs)[:, -3:].float() / temperature  # (V*V, 3, V): next-token logits after prompt, t1, t2
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1).view(V, V, 3, V)
    p1 = probs[0, 0, 0]  # (V,)
    p2 = probs[:, 0, 1]  # (V, V): [t1, t2]
    p3 = probs[:, :, 2]  # (V, V, V): [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_p(samples: list[list[int]], expected: torch.Tensor) -> float:
    """p-value of the observed joint counts against the expected probabilities; cells expected
    fewer than 5 times are pooled into one, as the test requires."""
    counts = torch.zeros(V, V, V)
    for t in samples:
        counts[t[0], t[1], t[2]] += 1
    n = len(samples)
    exp, obs = (expected.flatten() * n).double(), counts.flatten().double()
    big = exp >= 5
    f_obs = torch.cat([obs[big], obs[~big].sum()[None]]).numpy()
    f_exp = torch.cat([exp[big], exp[~big].sum()[None]]).numpy()
    f_exp *= f_obs.sum() / f_exp.sum()
    return float(chisquare(f_obs, f_exp).pvalue)


N = 3000
PROMPT = [1, 2, 3, 4, 1, 2, 3, 5, 6, 2, 3]  # most tokens occur in it: prompt lookup drafts nearly every step


def sample(lm: LM, temperature: float, top_k: int, **speculation) -> list:
    return lm.generate(PROMPT, temperature=temperature, top_k=top_k, max_new_tokens=4, num_return_sequences=N,
                       seed=7, return_details=True, **speculation)


@pytest.mark.parametrize("method", ["prompt_lookup", "draft"])
def test_sampling_distribution_is_unchanged(method, one_thread):
    """The first three tokens of 3,000 samples, drafted two at a time, against the exact joint
    distribution (512 cells); drafts must be both kept and rejected for the test to mean anything."""
    target = small_lm(0)
    temperature, top_k = (1.0, 0) if method == "prompt_lookup" else (0.8, 6)
    speculation = {"speculative": "prompt_lookup"} if method == "prompt_lookup" else {"draft": small_lm(5, 1)}
    out = sample(target, temperature, top_k, num_draft=2, **speculation)
    expected = exact_joint(target, PROMPT, temperature, top_k)
    drafted, kept = sum(c.draft_tokens for c in out), sum(c.accepted_draft_tokens for c in out)
    assert drafted > N and 0.1 * drafted < kept < 0.9 * drafted
    assert chi_square_p([c.token_ids for c in out], expected) > 1e-3
    if method == "prompt_lookup":  # the test has power: plain sampling a little colder is told apart
        colder = sample(target, 0.85, top_k)
        assert chi_square_p([c.token_ids for c in colder], expected) < 1e-3


def test_the_acceptance_rule_keeps_p_exactly():
    """The rule alone, by exact enumeration: P(token) = q-draft accepted + rejected-then-resampled = p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    # P(emit x) = sum_d q(d) [ 1{x = d} min(1, p/q)(d) + (1 - min(1, p/q)(d)) residual(x) ]
    residual = (p - q).clamp(min=0) / (p - q).clamp(min=0).sum()
    accept = (p / q).clamp(max=1)
    emitted = q * accept + (q * (1 - accept)).sum() * residual
    assert emitted.tolist() == pytest.approx(p.tolist())
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        draft = int(torch.multinomial(q, 1, generator=generator))
        counts[accept_or_resample(p, draft, q, generator)[0]] += 1
    assert chisquare(counts.numpy(), (p * 4000).numpy()).pvalue > 1e-3
    # a point-mass draft is kept with probability p(draft), else a token other than it is drawn
    kept = sum(accept_or_resample(p, 3, None, generator) == (3, True) for _ in range(2000))
    assert abs(kept / 2000 - 0.05) < 0.02
    assert all(accept_or_resample(p, 3, None, generator) != (3, False) for _ in range(200))


# ----------------------------------------------------------------------------- drafting, and bad input


def test_ngram_index_proposes_what_followed_the_latest_match():
    index = NgramIndex(max_ngram=3, min_ngram=1)
    index.extend([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7])
    assert index.propose(3) == [1, 2, 5]  # the 3-gram 5 6 7 last occurred before 1 2 ...
    index.extend([4])
    assert index.propose(2) == []  # 4 never occurred before
    index.extend([9])
    assert index.propose(4) == [5, 6, 7, 1]  # only the 1-gram 9 matches
    assert index.propose(0) == []


def test_bad_requests_are_refused_in_one_line(lm, draft_lm, tokenizer):
    with pytest.raises(ScribeError, match="unknown speculative method"):
        lm.generate("It", speculative="medusa")
    with pytest.raises(ScribeError, match="num_draft"):
        lm.generate("It", speculative="prompt_lookup", num_draft=0)
    with pytest.raises(ScribeError, match="num_draft is for speculative"):
        lm.generate("It", num_draft=3)
    with pytest.raises(ScribeError, match="needs a draft model"):
        lm.generate("It", speculative="draft")
    with pytest.raises(ScribeError, match="beam search"):
        lm.generate("It", speculative="prompt_lookup", num_beams=2)
    with pytest.raises(ScribeError, match="sliding context"):
        lm.generate("It", speculative="prompt_lookup", context_overflow="slide")
    with pytest.raises(ScribeError, match="compile"):
        lm.generate("It", speculative="prompt_lookup", compile=True)
    other = LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size + 8)).eval(), None)
    with pytest.raises(ScribeError, match="vocabulary"):
        lm.generate("It", draft=other)


def test_cli_speculative_flags(tmp_path, lm, draft_lm, capsys):
    lm.save(tmp_path / "model")
    draft_lm.save(tmp_path / "draft")
    prompt = fifty_prompts()[48]
    expected = lm.generate(prompt, max_new_tokens=12, temperature=0)
    assert main(["generate", str(tmp_path / "model"), prompt, "--max-new-tokens", "12", "--temperature", "0",
                 "--speculative", "prompt-lookup"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", str(tmp_path / "model"), prompt, "--max-new-tokens", "12", "--temperature", "0",
                 "--draft", str(tmp_path / "draft"), "--num-draft", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == expected and data["draft_tokens"] > 0 and 0 <= data["accepted_draft_tokens"] <= data["draft_tokens"]
    assert main(["generate", str(tmp_path / "model"), prompt, "--speculative", "draft"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "model"), prompt, "--num-draft", "3"]) == 2
    assert "--num-draft goes with" in capsys.readouterr().err


def test_a_row_whose_guesses_keep_failing_guesses_less(lm, one_thread):
    """Near-uniform sampling keeps almost no draft: the row backs off instead of paying for a
    wide pass every step, and guesses again once one is kept."""
    prompt = fifty_prompts()[48]
    c = lm.generate(prompt, temperature=50.0, max_new_tokens=60, seed=3, return_details=True,
                    speculative="prompt_lookup", num_draft=4)
    always = (len(c.token_ids) - 1) * 4  # what guessing at every step would have drafted, at most
    assert 0 < c.draft_tokens < always / 3 and c.accepted_draft_tokens < c.draft_tokens
    greedy = lm.generate(prompt, temperature=0, max_new_tokens=60, return_details=True,
                         speculative="prompt_lookup", num_draft=4)
    assert greedy.acceptance_rate > 0.5  # copying text: a guess every step


def test_sliding_window_models_speculate_over_a_full_cache(tokenizer, one_thread):
    """Such a model otherwise decodes through a rolling cache of its window, whose rows cannot be
    set back; speculating, it keeps every position and masks to the window, with the same tokens."""
    torch.manual_seed(2)
    lm = LM(sharpened(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, sliding_window=8)), 4.0), tokenizer)
    prompts = fifty_prompts()[40:50]
    plain = lm.generate(prompts, temperature=0, max_new_tokens=20, return_details=True)
    same(plain, lm.generate(prompts, temperature=0, max_new_tokens=20, return_details=True, speculative="prompt_lookup"))
    same(plain, lm.generate(prompts, temperature=0, max_new_tokens=20, return_details=True, draft=lm, num_draft=3))
