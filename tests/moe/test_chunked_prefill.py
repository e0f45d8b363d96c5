"""Long prompts go through the cache in chunks: the same logits and the same cache as one pass."""

import pytest
import torch

from scribelm.cache import KVCache
from scribelm.decode import prefill
from scribelm.model import Transformer
from tests.conftest import tiny_config


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=6), dict(n_experts=4, experts_per_token=2)])
def test_chunked_prefill_equals_one_pass(overrides):
    torch.manual_seed(0)
    model = Transformer(tiny_config(**overrides)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 400, (n,), generator=g).tolist() for n in (23, 9, 17)]  # ends in chunks 3, 1, 2
    caches = [KVCache(model.config, 4, 32) for _ in range(2)]
    with torch.no_grad():
        whole = prefill(model, caches[0], 1, prompts)  # rows 1..3 of the cache
        pieces = prefill(model, caches[1], 1, prompts, chunk=8)
        assert (whole - pieces).abs().max().item() <= 1e-5
        assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [0, 23, 9, 17]
        for row, n in zip((1, 2, 3), (23, 9, 17)):
            assert torch.allclose(caches[0].keys[:, row, :, :n], caches[1].keys[:, row, :, :n], atol=1e-5)
        # each row's logits are its own prompt's, as if it ran alone
        for j, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0, -1]
            assert (alone - pieces[j]).abs().max().item() <= 1e-4
