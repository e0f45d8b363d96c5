import math

import pytest
import torch

from scribelm.errors import ScribeError
from scribelm.sampling import (
    IncrementalDetokenizer,
    RowSampler,
    SamplingSettings,
    apply_top_p,
    choose_tokens,
    process_logits,
    sample,
)


def rows(settings_list, vocab, prompts=None):
    prompts = prompts or [()] * len(settings_list)
    return [RowSampler(s, vocab, prompt_ids=p) for s, p in zip(settings_list, prompts)]


def kept(logits_row):
    return set(torch.nonzero(torch.isfinite(logits_row)).flatten().tolist())


# ----------------------------------------------------------------------------- top-p / top-k / min-p


@pytest.mark.parametrize(
    "p, expected",
    [(0.35, {2}), (0.5, {2, 0}), (0.69, {2, 0}), (0.75, {2, 0, 3}), (0.95, {2, 0, 3, 1}), (1.0, {2, 0, 3, 1, 4})],
)
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    # probabilities 0.3, 0.1, 0.4, 0.15, 0.05 (token 2 first, then 0, 3, 1, 4)
    probs = torch.tensor([[0.3, 0.1, 0.4, 0.15, 0.05]])
    out = apply_top_p(probs.log(), torch.tensor([p]))
    assert kept(out[0]) == expected
    # the same through the full processor chain, at temperature 1
    processed = process_logits(probs.log(), rows([SamplingSettings(top_p=p)], 5))
    assert kept(processed[0]) == expected


def test_top_p_set_is_minimal_on_random_distributions():
    torch.manual_seed(0)
    for _ in range(50):
        logits = torch.randn(1, 30) * 2
        p = float(torch.rand(()).clamp(0.05, 1.0))
        keep = kept(apply_top_p(logits, torch.tensor([p]))[0])
        probs = logits.softmax(-1)[0]
        mass = probs[list(keep)].sum().item()
        assert mass >= p - 1e-6  # reaches p
        smallest = min(probs[list(keep)].tolist())
        assert mass - smallest < p  # dropping its least likely member would fall below p
        # and it is a prefix of the ranking: nothing kept is less likely than something dropped
        dropped = set(range(30)) - keep
        if dropped:
            assert smallest >= max(probs[list(dropped)].tolist())


def test_rows_with_different_settings_are_processed_independently():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    settings = [SamplingSettings(top_k=3), SamplingSettings(top_p=0.5, temperature=0.7), SamplingSettings(min_p=0.2)]
    together = process_logits(logits, rows(settings, 50))
    for b, s in enumerate(settings):
        alone = process_logits(logits[b : b + 1], rows([s], 50))
        assert torch.equal(torch.isfinite(together[b]), torch.isfinite(alone[0]))
        assert torch.allclose(together[b][torch.isfinite(together[b])], alone[0][torch.isfinite(alone[0])])
    assert len(kept(together[0])) == 3
    probs = logits[2].softmax(-1)
    assert kept(together[2]) == set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())


def test_top_k_one_and_tiny_temperature_equal_greedy():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    expected = logits.argmax(-1)
    for s in (SamplingSettings(top_k=1, seed=3), SamplingSettings(temperature=1e-4, seed=3), SamplingSettings(temperature=0)):
        assert torch.equal(choose_tokens(logits, rows([s] * 8, 100)), expected)


def test_seed_reproduces_and_is_per_row():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    a = [choose_tokens(logits, rows([SamplingSettings(seed=7)], 100)).item() for _ in range(5)]
    assert len(set(a)) == 1
    draws = {choose_tokens(logits, rows([SamplingSettings(seed=s)], 100)).item() for s in range(30)}
    assert len(draws) > 5  # different seeds do sample differently
    # a seeded row draws the same whatever its neighbours are
    mixed = choose_tokens(logits.expand(3, -1), rows([SamplingSettings(seed=1), SamplingSettings(seed=7), SamplingSettings()], 100))
    assert mixed[1].item() == a[0]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    row = rows([SamplingSettings(seed=0)], 3)
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[choose_tokens(logits, row).item()] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


# ----------------------------------------------------------------------------- penalties and bias


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    row = rows([SamplingSettings(temperature=0, repetition_penalty=2.0)], 4, prompts=[[0]])
    row[0].observe(1)
    out = process_logits(logits, row)
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 4)
    row = rows([SamplingSettings(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)], 4, prompts=[[3]])
    for t in (0, 0, 0, 1):
        row[0].observe(t)
    out = process_logits(logits, row)
    # logit - count * frequency - [count > 0] * presence; prompt tokens do not count
    assert out[0].tolist() == pytest.approx([-0.75 - 0.5, -0.25 - 0.5, 0.0, 0.0])


def test_logit_bias_forces_and_bans():
    torch.manual_seed(0)
    logits = torch.randn(1, 20)
    force = SamplingSettings(logit_bias={"7": 100}, seed=0)
    assert choose_tokens(logits, rows([force], 20)).item() == 7
    top = logits.argmax().item()
    ban = SamplingSettings(temperature=0, logit_bias={top: -100})
    assert choose_tokens(logits, rows([ban], 20)).item() == logits[0].topk(2).indices[1].item()


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature is NaN"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be positive"),
        (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\]"),
        (dict(logit_bias={1: 500}), r"logit_bias for token 1 must be in \[-100, 100\]"),
        (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
        (dict(max_new_tokens=-3), "max_new_tokens must be >= 0"),
        (dict(stop=[""]), "stop strings must be non-empty"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 exceeds num_beams=2"),
        (dict(context_overflow="wrap"), "context_overflow must be one of"),
        (dict(top_k=1.5), "top_k must be an integer"),
    ],
)
def test_bad_settings_are_clear_errors(changes, message):
    with pytest.raises(ScribeError, match=message):
        SamplingSettings(**changes)


def test_token_ids_outside_vocab_are_refused():
    with pytest.raises(ScribeError, match="token id 50 in the settings is outside the vocabulary"):
        RowSampler(SamplingSettings(logit_bias={50: 1.0}), 20)


# ----------------------------------------------------------------------------- incremental detokenizer


class ByteTokenizer:
    """Token i is byte i: the worst case for multi-byte characters."""

    def token_bytes(self, i):
        return bytes([i])


def push_all(detok, data: bytes):
    deltas = [detok.push(b) for b in data]
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas


def test_detokenizer_never_splits_a_character():
    text = "añ你好🎉!"
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = push_all(detok, text.encode())
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:3] == ["a", "", "ñ"]  # the first byte of ñ waits for the second


def test_detokenizer_incomplete_tail_becomes_replacement_char():
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = push_all(detok, "ok".encode() + "你".encode()[:2])
    assert "".join(deltas) == "ok\ufffd"


def test_detokenizer_holds_back_possible_stop_and_drops_it():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["END", "\n\n"])
    deltas = push_all(detok, b"abc EN then END more")
    assert "".join(deltas) == "abc EN then "
    assert detok.stopped and detok.stop_string == "END"
    # 'E' and 'N' were held until the next character showed they did not start 'END'
    assert deltas[4:7] == ["", "", "EN "]
    # no delta ever showed text of the stop string
    assert "END" not in "".join(deltas)


def test_detokenizer_stop_string_spanning_multibyte_tokens():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["好🎉"])
    deltas = push_all(detok, "你好🎉再见".encode())
    assert "".join(deltas) == "你"
    assert detok.stopped


# ----------------------------------------------------------------------------- the batched draw


def test_batched_draw_follows_each_rows_distribution():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 6) * 1.5, -1)  # (4, 6) one distribution per row
    samplers = rows([SamplingSettings(seed=s) for s in range(4)], 6)
    counts = torch.zeros(4, 6)
    for _ in range(3000):
        counts[torch.arange(4), choose_tokens(probs.log(), samplers)] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_batched_draw_matches_the_row_drawn_alone_step_after_step():
    torch.manual_seed(1)
    logits = torch.randn(20, 3, 50)  # 20 steps of 3 rows
    alone = rows([SamplingSettings(seed=11, top_k=20)], 50)
    batch = rows([SamplingSettings(seed=5), SamplingSettings(seed=11, top_k=20), SamplingSettings(temperature=0)], 50)
    seq_alone = [choose_tokens(logits[t, 1:2], alone).item() for t in range(20)]
    seq_batch = [choose_tokens(logits[t], batch).tolist() for t in range(20)]
    assert [s[1] for s in seq_batch] == seq_alone
    assert [s[2] for s in seq_batch] == logits[:, 2].argmax(-1).tolist()  # a greedy neighbour stays greedy
    assert len(set(seq_alone)) > 3


def test_draw_never_picks_a_removed_token_even_at_the_ends_of_the_unit_interval():
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]] * 2)
    lowest, highest = torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64), None
    assert sample(logits, logits, lowest).tolist() == [1, 3]
    highest = torch.tensor([1.0 - 2**-53, 0.9999999999], dtype=torch.float64)
    assert sample(logits, logits, highest).tolist() == [3, 3]


def test_a_row_with_no_distribution_falls_back_to_the_raw_argmax():
    raw = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 0.0, 5.0]])
    processed = torch.full((2, 3), float("-inf"))
    assert sample(processed, raw, torch.tensor([0.5, 0.5], dtype=torch.float64)).tolist() == [1, 2]
