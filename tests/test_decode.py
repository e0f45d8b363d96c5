"""The decode core: one step from logits to events, with stops, text and per-row failures."""

import pytest
import torch

from scribelm.decode import DecodeRow, decode_step
from scribelm.sampling import SamplingSettings


def row(index, tokenizer, **settings):
    return DecodeRow(index, [1, 2, 3], SamplingSettings(temperature=0, **settings), tokenizer=tokenizer,
                     vocab_size=tokenizer.vocab_size)


def logits_for(tokens, vocab):
    logits = torch.full((len(tokens), vocab), -10.0)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return logits


def test_a_step_gives_each_row_its_token_text_and_ending(tokenizer):
    V = tokenizer.vocab_size
    letter = tokenizer.encode("a")[0]
    rows = [row(0, tokenizer, max_new_tokens=5), row(1, tokenizer, max_new_tokens=1),
            row(2, tokenizer, max_new_tokens=5, stop_token_ids=[letter])]
    stepped = decode_step(rows, logits_for([letter, letter, letter], V), [True, True, True])
    events = [e for _, e in stepped]
    assert [e.index for e in events] == [0, 1, 2] and all(e.token_id == letter for e in events)
    assert [e.finish_reason for e in events] == [None, "length", "stop"]
    assert events[1].text == "a" and events[2].text == "" and events[2].stop_reason == letter
    assert rows[0].generated == [letter] and not rows[0].done


def test_a_full_cache_ends_a_row_with_length(tokenizer):
    event = decode_step([row(0, tokenizer, max_new_tokens=5)], logits_for([7], tokenizer.vocab_size), [False])[0][1]
    assert event.finish_reason == "length"


def test_a_failing_row_is_reported_and_the_others_go_on(tokenizer):
    V = tokenizer.vocab_size
    rows = [row(0, tokenizer), row(1, tokenizer), row(2, tokenizer)]
    rows[1].settings.temperature = "hot"  # changed after it was checked: its sampling fails
    failed = []
    stepped = decode_step(rows, logits_for([5, 6, 7], V), [True] * 3, on_error=lambda r, err: failed.append(r.index))
    assert failed == [1]
    assert [(r.index, e.token_id) for r, e in stepped] == [(0, 5), (2, 7)]
    with pytest.raises(Exception):
        decode_step(rows, logits_for([5, 6, 7], V), [True] * 3)  # without on_error, the failure is raised
