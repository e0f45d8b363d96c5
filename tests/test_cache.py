"""The KV cache with per-row lengths: rows of different lengths give what each gives alone."""

import pytest
import torch

from scribelm.cache import ContextOverflowError, KVCache
from scribelm.model import Transformer
from tests.conftest import tiny_config


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_slot_cache_rows_of_different_lengths_decode_as_if_alone(position):
    """One decode step over slots holding 3, 7 and 5 tokens gives each row the logits of a full forward pass."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(position=position)).eval()
    sequences = [torch.randint(0, 400, (n,)).tolist() for n in (3, 7, 5)]
    cache = KVCache(model.config, batch_size=4, max_length=64)
    with torch.no_grad():
        for slot, ids in enumerate(sequences):  # prefill each prompt (all but its last token) into its slot
            model(torch.tensor([ids[:-1]]), cache=cache.rows(slot))
            cache.set_length(slot, len(ids) - 1)
        step = model(torch.tensor([[ids[-1]] for ids in sequences]), cache=cache)[:, -1]
        for b, ids in enumerate(sequences):
            alone = model(torch.tensor([ids]))[0, -1]
            torch.testing.assert_close(step[b], alone, rtol=1e-5, atol=1e-5)
    assert cache.lengths[:3].tolist() == [3, 7, 5]


@pytest.mark.parametrize("position", ["rope", "learned", "sinusoidal"])
def test_right_padded_prefill_then_ragged_decode_equals_each_row_alone(position):
    """Prompts of 4, 9 and 6 tokens prefilled together (right-padded), then decoded several
    steps over rows of different lengths: every step's logits are each row's own."""
    torch.manual_seed(1)
    model = Transformer(tiny_config(position=position)).eval()
    prompts = [torch.randint(0, 400, (n,)).tolist() for n in (4, 9, 6)]
    follow = torch.randint(0, 400, (3, 5))
    P = max(len(p) for p in prompts)
    ids = torch.zeros(3, P, dtype=torch.long)
    padding = torch.zeros(3, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)], padding[b, : len(p)] = torch.tensor(p), 1
    cache = KVCache(model.config, batch_size=3, max_length=32)
    with torch.no_grad():
        first = model(ids, cache=cache, attention_mask=padding, last_only=True)[:, 0]  # (3, V)
        for b, p in enumerate(prompts):
            cache.set_length(b, len(p))
        steps = [model(follow[:, t : t + 1], cache=cache)[:, 0] for t in range(follow.shape[1])]
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + follow[b].tolist()]))[0]  # (n + 5, V)
            torch.testing.assert_close(first[b], alone[len(p) - 1], rtol=1e-5, atol=1e-5)
            for t, logits in enumerate(steps):
                torch.testing.assert_close(logits[b], alone[len(p) + t], rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [9, 14, 11]


def test_rows_share_one_length_again_after_slot_operations():
    cfg = tiny_config()
    cache = KVCache(cfg, batch_size=3, max_length=16)
    cache.set_length(0, 5)
    cache.copy_row(0, 2)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.lengths.tolist() == [5, 5, 5] and cache.length == 5
    cache.reset()
    assert cache.length == 0


def test_a_row_past_its_end_is_a_context_overflow():
    model = Transformer(tiny_config()).eval()
    cache = KVCache(model.config, batch_size=2, max_length=8)
    cache.set_length(1, 8)
    with pytest.raises(ContextOverflowError):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


def test_last_only_gives_the_last_position_of_each_row():
    torch.manual_seed(2)
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 400, (2, 6))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, last_only=True), full[:, -1:])
