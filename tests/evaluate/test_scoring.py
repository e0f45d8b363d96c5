"""The scoring primitives against plain full forward passes of the same model: shared-prefix
batches equal one sequence at a time, rolling windows predict every token once, greedy
continuations are recognised, generation stops at `until`."""

import pytest
import torch

from scribelm.evaluate.scoring import (
    encode, encode_pair, generate_until, loglikelihood, rolling_loglikelihood, rolling_windows,
)
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=48)).eval()
    return LM(model=model, tokenizer=tokenizer)


def _full_forward(lm, context, continuation):
    ctx, cont = encode_pair(lm, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).float(), -1)[0]
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


REQUESTS = [
    ("In the beginning God created the", " heaven"), ("In the beginning God created the", " earth and sea"),
    ("In the beginning God created the", " x"), ("Call me Ishmael.", " Some years ago"), ("", "It was"),
    ("Call me Ishmael. ", "Some"), ("It was the best of times,", " it was the worst of times, it was"),
]


def test_shared_prefix_equals_one_sequence_at_a_time(lm, one_thread):
    shared = loglikelihood(lm, REQUESTS, share_prefix=True, batch_size=3)
    whole = loglikelihood(lm, REQUESTS, share_prefix=False, batch_size=2)
    auto = loglikelihood(lm, REQUESTS, batch_size=16)
    reference = [_full_forward(lm, c, x) for c, x in REQUESTS]
    for got in (shared, whole, auto):
        assert [ll for ll, _ in got] == pytest.approx(reference, abs=1e-4)
        assert [g for _, g in got] == [g for _, g in whole]


def test_trailing_context_spaces_move_to_the_continuation(lm):
    assert encode_pair(lm, "Call me ", "Ishmael") == encode_pair(lm, "Call me", " Ishmael")
    assert encode_pair(lm, "", "It")[0] == [lm.tokenizer.bos_id]


def test_greedy_continuation_is_recognised(lm, one_thread):
    context = "In the beginning"
    ids = encode(lm, context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    continuation = lm.tokenizer.decode(ids[len(encode(lm, context)):])
    ctx_ids, cont_ids = encode_pair(lm, context, continuation)
    if ctx_ids + cont_ids != ids:
        pytest.skip("the greedy tokens do not survive a decode/encode round trip")
    (_, greedy), (_, other) = loglikelihood(lm, [(context, continuation), (context, continuation + " zq")])
    assert greedy and not other


def test_rolling_windows_predict_every_token_once():
    ids = list(range(100, 137))  # 37 tokens, a context of 10
    for stride in (None, 10, 4, 1):
        windows = rolling_windows(ids, 0, 10, stride)
        assert [t for _, pred in windows for t in pred] == ids
        assert windows[0][0] == [0]  # the first window conditions on the prefix token alone
        for ctx, pred in windows[1:]:
            start = ids.index(pred[0])
            assert ctx == ids[start - len(ctx):start]  # the text right before, as much as fits
            assert len(ctx) + len(pred) - 1 == 10  # later windows use the whole context


def test_rolling_loglikelihood_of_a_short_document_is_one_forward_pass(lm, one_thread):
    text = "In the beginning God created the heaven and the earth."
    (score,) = rolling_loglikelihood(lm, [text])
    assert score.loglikelihood == pytest.approx(_full_forward(lm, "", text), abs=1e-4)
    assert (score.words, score.bytes, score.tokens) == (10, 54, len(encode(lm, text)))
    long_text = " ".join([text] * 6)  # past the context: windows; a smaller stride gives more context, a different sum
    default, strided = rolling_loglikelihood(lm, [long_text])[0], rolling_loglikelihood(lm, [long_text], stride=8)[0]
    assert default.tokens == strided.tokens > 48
    assert default.loglikelihood != pytest.approx(strided.loglikelihood, abs=1e-3)


def test_generate_until_cuts_at_the_stop_string(lm, one_thread):
    free, = generate_until(lm, [("In the", {"max_gen_toks": 8})])
    cut = next((ch for ch in free[1:] if ch.strip()), None)
    assert cut is not None
    stopped, = generate_until(lm, [("In the", {"max_gen_toks": 8, "until": [cut]})])
    assert stopped == free[:free.index(cut)]
