"""The completions-server backend reads the legacy OpenAI echo/logprobs answer as lm-eval's
`local-completions` model does: on answers carrying this model's real per-token
log-probabilities, it gives lm-eval's parse and local scoring's numbers. An unreachable
server is one clear line."""

import socket

import pytest
import torch

from scribelm.cli import main
from scribelm.evaluate.remote import CompletionsBackend, parse_echo_logprobs
from scribelm.evaluate.scoring import encode, encode_pair, loglikelihood
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(3)
    return LM(model=Transformer(tiny_config(vocab_size=tokenizer.vocab_size)).eval(), tokenizer=tokenizer)


def echo_answer(lm, prompt: str, index: int) -> dict:
    """One choice as a legacy completions server answers echo + logprobs 1 + max_tokens 1:
    the prompt's tokens with their log-probabilities (the first null), then one generated token."""
    ids = encode(lm, prompt)
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(torch.tensor([ids])).float(), -1)[0]  # (T, V)
    ids = ids + [int(logprobs[-1].argmax())]
    pieces = [lm.tokenizer.decode([i]) for i in ids]
    assert "".join(pieces[:-1]) == prompt  # ASCII text: tokens decode one by one
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(ids))]
    values = [None] + [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]
    tops = [None] + [{lm.tokenizer.decode([int(logprobs[t - 1].argmax())]): float(logprobs[t - 1].max())}
                     for t in range(1, len(ids))]
    return {"index": index, "text": prompt + pieces[-1], "finish_reason": "length",
            "logprobs": {"tokens": pieces, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}}


def test_echo_answers_read_as_lm_eval_reads_them(lm):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    pairs = [("In the beginning God created the", " heaven"), ("Call me", " Ishmael. Some years"),
             ("It was the best of times, ", "it was")]
    local = loglikelihood(lm, pairs)
    answer = {"choices": [echo_answer(lm, ctx + cont, i) for i, (ctx, cont) in enumerate(pairs)]}
    context_lengths = [len(encode_pair(lm, ctx, cont)[0]) for ctx, cont in pairs]
    theirs = LocalCompletionsAPI.parse_logprobs(answer, ctxlens=context_lengths)
    ours = [parse_echo_logprobs(c, ctx, ctx + cont) for c, (ctx, cont) in zip(answer["choices"], pairs)]
    for (ll, greedy), (their_ll, their_greedy), (local_ll, local_greedy) in zip(ours, theirs, local):
        assert ll == pytest.approx(their_ll, abs=1e-6) and ll == pytest.approx(local_ll, abs=1e-4)
        assert greedy == their_greedy == local_greedy


def test_unreachable_server_is_one_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = CompletionsBackend(f"http://127.0.0.1:{port}/v1", model="m", timeout_s=5)
    assert backend.url == f"http://127.0.0.1:{port}/v1/completions"
    assert main(["eval", "--base-url", f"http://127.0.0.1:{port}/v1", "--tasks", "kjv_cloze", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach http://127.0.0.1:{port}/v1/completions") and err.count("\n") == 1
    assert main(["eval", "--base-url", "localhost:8080", "--tasks", "kjv_cloze"]) == 2
    assert "must start with http://" in capsys.readouterr().err
