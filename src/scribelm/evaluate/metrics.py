"""Scores from model outputs, and how sure we are of them.

Per-sample scores, then an aggregate over the task, as lm-evaluation-harness
defines them:

    acc             1 if the most likely choice is the gold one (multiple choice), or
                    if greedy decoding gives the target (loglikelihood tasks)
    acc_norm        the same with each choice's log-likelihood divided by its length in
                    characters, so long answers are not punished for having more tokens
    acc_mutual_info log p(choice | question) - log p(choice | nothing): prefers answers
                    the question makes likelier, not answers that are likely anyway
    exact_match     prediction == target (options: ignore_case, ignore_punctuation,
                    ignore_numbers, regexes_to_ignore)
    squad_exact_match, squad_f1
                    SQuAD's answer comparison: lower case, strip punctuation and the
                    articles a/an/the, collapse spaces; F1 over the words; best over the
                    gold answers
    perplexity      exp(-mean log-likelihood) of a target (loglikelihood tasks)
    word_perplexity, byte_perplexity, bits_per_byte
                    whole documents (rolling): exp(-Σ loglik / Σ words), exp(-Σ loglik / Σ bytes),
                    -Σ loglik / Σ bytes / ln 2
    token_perplexity exp(-Σ loglik / Σ tokens): depends on the tokenizer, so only
                    comparable between models that share one

Standard errors: a mean of per-sample scores has the closed form s/√n (sample
standard deviation s, as lm-eval); perplexity is bootstrapped (resample the
samples with replacement, recompute, take the spread). Ratios of sums
(word/byte perplexity, bits per byte) are bootstrapped too, which lm-eval
leaves out.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Sequence

# ----------------------------------------------------------------------------- per sample


def multiple_choice_scores(lls: Sequence[float], choices: Sequence[str], gold: int,
                           unconditional: Sequence[float] | None = None) -> dict[str, float]:
    """acc and acc_norm (and acc_mutual_info when unconditional log-likelihoods are given)
    of one question; ties go to the first choice, as numpy's argmax."""
    def argmax(values: Sequence[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i))

    scores = {
        "acc": float(argmax(lls) == gold),
        "acc_norm": float(argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold),
    }
    if unconditional is not None:
        scores["acc_mutual_info"] = float(argmax([a - b for a, b in zip(lls, unconditional)]) == gold)
    return scores


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
                ignore_numbers: bool = False, regexes_to_ignore: Sequence[str] | None = None) -> float:
    """1.0 if the strings are equal after the chosen clean-ups (lm-eval's `exact_match`)."""
    for pattern in regexes_to_ignore or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    drop = (string.punctuation if ignore_punctuation else "") + (string.digits if ignore_numbers else "")
    if drop:
        table = str.maketrans("", "", drop)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def squad_exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer."""
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in _golds(golds))


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # nothing to overlap: right only if both are empty (as EM says)
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Word-overlap F1 between the normalised prediction and the best gold answer."""
    return max(_token_f1(prediction, g) for g in _golds(golds))


# ----------------------------------------------------------------------------- aggregates


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(-mean(lls))


def weighted_perplexity(pairs: Sequence[tuple[float, int]]) -> float:
    """exp(-Σ loglik / Σ count): per word or per byte."""
    return math.exp(-sum(ll for ll, _ in pairs) / sum(n for _, n in pairs))


def bits_per_byte(pairs: Sequence[tuple[float, int]]) -> float:
    return -sum(ll for ll, _ in pairs) / sum(n for _, n in pairs) / math.log(2)


def mean_stderr(values: Sequence[float]) -> float:
    """s/√n with the sample standard deviation (n-1): the binomial standard error for 0/1 scores."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def bootstrap_stderr(statistic: Callable[[float], float], lls: Sequence[float], counts: Sequence[int] | None = None,
                     *, iters: int = 1000, seed: int = 1234) -> float:
    """The standard deviation of statistic(Σ loglik / Σ count) over `iters` resamples (with
    replacement) of the samples; count is 1 per sample when not given (a plain mean)."""
    import numpy as np

    n = len(lls)
    if n < 2:
        return float("nan")
    ll = np.asarray(lls, dtype=np.float64)
    count = np.ones(n) if counts is None else np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ratios = []
    chunk = max(1, 2_000_000 // n)  # resamples per draw, so the index matrix stays small
    for start in range(0, iters, chunk):
        idx = rng.integers(0, n, size=(min(chunk, iters - start), n))
        ratios.append(ll[idx].sum(1) / count[idx].sum(1))
    with np.errstate(over="ignore"):
        values = np.array([statistic(r) for r in np.concatenate(ratios)])
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def _split(pairs: Sequence[tuple[float, int]]) -> tuple[list[float], list[int]]:
    return [ll for ll, _ in pairs], [c for _, c in pairs]


def _exp_neg(r: float) -> float:
    return math.exp(-r) if -r < 700 else float("inf")


#: metric name -> (aggregate, standard error of the aggregate, higher is better)
AGGREGATES: dict[str, tuple[Callable[[Sequence], float], Callable[[Sequence], float], bool]] = {
    "acc": (mean, mean_stderr, True),
    "acc_norm": (mean, mean_stderr, True),
    "acc_mutual_info": (mean, mean_stderr, True),
    "exact_match": (mean, mean_stderr, True),
    "squad_exact_match": (mean, mean_stderr, True),
    "squad_f1": (mean, mean_stderr, True),
    "perplexity": (perplexity, lambda xs: bootstrap_stderr(_exp_neg, xs), False),
    "word_perplexity": (weighted_perplexity, lambda xs: bootstrap_stderr(_exp_neg, *_split(xs)), False),
    "byte_perplexity": (weighted_perplexity, lambda xs: bootstrap_stderr(_exp_neg, *_split(xs)), False),
    "token_perplexity": (weighted_perplexity, lambda xs: bootstrap_stderr(_exp_neg, *_split(xs)), False),
    "bits_per_byte": (bits_per_byte, lambda xs: bootstrap_stderr(lambda r: -r / math.log(2), *_split(xs)), False),
}


def aggregate(metric: str, items: Sequence) -> tuple[float, float]:
    """(value, standard error) of a metric over a task's per-sample items."""
    value, stderr, _ = AGGREGATES[metric]
    return value(items), stderr(items)
