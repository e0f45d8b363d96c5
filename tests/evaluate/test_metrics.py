"""Answer comparison (SQuAD's normalisation, EM, F1) on cases with known answers and against
torchmetrics' SQuAD metric; aggregates and their standard errors."""

import math
import random

import pytest

from scribelm.evaluate.metrics import (
    aggregate, bits_per_byte, exact_match, mean_stderr, multiple_choice_scores, normalize_answer, squad_exact_match,
    squad_f1, weighted_perplexity,
)


def test_normalisation_strips_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # an article only as a whole word


def test_exact_match_and_f1_hand_written():
    assert squad_exact_match("the Paris.", "Paris") == 1.0
    assert squad_exact_match("Paris, France", "Paris") == 0.0
    assert squad_exact_match("Lyon", ["Paris", "lyon"]) == 1.0  # best over the gold answers
    assert squad_f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert squad_f1("a cat sat", ["the dog", "cat sat down"]) == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert squad_f1("", "Paris") == 0.0
    assert squad_f1("the", "a") == squad_exact_match("the", "a") == 1.0  # both empty once normalised
    assert squad_f1("nothing alike", "Paris") == 0.0


def test_lm_eval_exact_match_options():
    assert exact_match("Paris", "paris") == 0.0
    assert exact_match("Paris", "paris", ignore_case=True) == 1.0
    assert exact_match("Paris!", "Paris", ignore_punctuation=True) == 1.0
    assert exact_match("A: 42", "42", regexes_to_ignore=[r"^A: "]) == 1.0
    assert exact_match("route 66", "route", ignore_numbers=True) == 0.0  # the space stays
    assert exact_match("route66", "route", ignore_numbers=True) == 1.0


def test_squad_scores_equal_torchmetrics_on_random_cases():
    squad = pytest.importorskip("torchmetrics.functional.text").squad
    rnd = random.Random(0)
    words = ["the", "a", "an", "Paris", "paris,", "cat", "dog!", "sat", "on", "mat", "Mat.", "red", "blue", "x-ray"]
    for i in range(300):
        prediction = " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 5)))
        golds = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 4))) for _ in range(rnd.randint(1, 3))]
        reference = squad([{"prediction_text": prediction, "id": str(i)}],
                          [{"answers": {"answer_start": [0] * len(golds), "text": golds}, "id": str(i)}])
        assert 100 * squad_exact_match(prediction, golds) == pytest.approx(float(reference["exact_match"]), abs=1e-4)
        assert 100 * squad_f1(prediction, golds) == pytest.approx(float(reference["f1"]), abs=1e-4)


def test_multiple_choice_acc_norm_divides_by_characters():
    # the long right answer loses on raw log-likelihood and wins per character
    scores = multiple_choice_scores([-6.0, -4.0], ["a long answer", "no"], gold=0)
    assert scores == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice_scores([-1.0, -1.0], ["x", "y"], gold=0)["acc"] == 1.0  # ties go to the first
    mutual = multiple_choice_scores([-5.0, -3.0], ["x", "y"], gold=0, unconditional=[-9.0, -3.5])
    assert mutual["acc_mutual_info"] == 1.0


def test_aggregates_and_standard_errors():
    values = [1.0, 0.0, 1.0, 1.0]
    assert aggregate("acc", values) == (0.75, pytest.approx(math.sqrt(0.25 / 4)))
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)
    pairs = [(-10.0, 5), (-20.0, 15)]
    assert weighted_perplexity(pairs) == pytest.approx(math.exp(30 / 20))
    assert bits_per_byte(pairs) == pytest.approx(30 / 20 / math.log(2))
    value, stderr = aggregate("bits_per_byte", pairs * 10)
    assert value == pytest.approx(30 / 20 / math.log(2)) and 0 < stderr < value
    assert aggregate("perplexity", [-1.0, -1.0])[1] == pytest.approx(0.0, abs=1e-12)  # no spread, no error
