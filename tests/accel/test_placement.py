"""Weights in huge pages (scribelm.accel.placement): same parameters, same values, same
sharing; nothing copied twice; nothing done where the system has no huge pages."""

import copy

import pytest
import torch

import scribelm
from scribelm.accel import accelerate, placement
from scribelm.accel.packing import packed_view
from scribelm.config import ModelConfig
from scribelm.quant import quantize_model


def _model(tie: bool = True) -> scribelm.Transformer:
    config = ModelConfig(vocab_size=3000, context_length=64, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_mlp=512, activation="swiglu", norm="rmsnorm", position="rope", tie_embeddings=tie)
    torch.manual_seed(0)
    return scribelm.Transformer(config).eval()


@pytest.fixture
def huge_pages(monkeypatch):
    """Placement on, whatever this machine's THP setting (madvise is only advice)."""
    monkeypatch.setattr(placement, "huge_pages_available", lambda: True)


def _storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def test_parameters_keep_identity_values_and_sharing(huge_pages):
    model = _model()
    ids = torch.randint(0, 3000, (2, 12))
    expected = model(ids)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    accelerate(model)
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1])
    assert model.unembedding.weight is model.token_embedding.weight  # still tied
    attention = model.blocks[0].attention
    assert packed_view((attention.q, attention.k, attention.v), "weight") is not None  # still side by side
    big = [p for p in model.parameters() if p.numel() * p.element_size() >= placement.MIN_STORAGE_BYTES]
    arenas = {p.untyped_storage().data_ptr() for p in big}
    assert len(arenas) == 1 and arenas <= model._huge_page_storages
    (p,) = [p for p in big if p is model.token_embedding.weight]
    assert p.data_ptr() % placement._ALIGN == 0
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_a_second_pass_moves_nothing_and_new_codes_are_placed(huge_pages):
    model = accelerate(_model())
    addresses = [p.data_ptr() for p in model.parameters()]
    accelerate(model)
    assert [p.data_ptr() for p in model.parameters()] == addresses
    quantized = quantize_model(copy.deepcopy(model), 8, unembedding=True)
    codes = quantized.blocks[0].mlp.up.qweight
    assert codes.untyped_storage().data_ptr() in quantized._huge_page_storages


def test_only_live_bytes_are_copied(huge_pages, monkeypatch):
    """A storage mostly dead (a copy of a placed model whose layers were replaced) is not copied whole."""
    model = accelerate(_model())
    twin = copy.deepcopy(model)  # one storage holding every weight, outside any huge-page block
    sizes = []
    real = placement.huge_page_buffer
    monkeypatch.setattr(placement, "huge_page_buffer", lambda n: sizes.append(n) or real(n))
    quantize_model(twin, 8)  # the float block weights die; the embedding lives on in the old storage
    embedding_bytes = twin.token_embedding.weight.numel() * 4
    codes = sum(m.qweight.numel() for m in twin.modules() if hasattr(m, "qweight"))
    assert sizes and sizes[0] < embedding_bytes + codes + 64 * 1024


def test_nothing_happens_without_huge_pages(monkeypatch):
    monkeypatch.setattr(placement, "huge_pages_available", lambda: False)
    model = _model()
    unpacked = [model.token_embedding.weight, model.blocks[0].attention.o.weight, model.blocks[1].mlp.down.weight]
    addresses = [p.data_ptr() for p in unpacked]
    accelerate(model)  # packs q/k/v and gate/up, moves nothing else
    assert [p.data_ptr() for p in unpacked] == addresses
    assert not getattr(model, "_huge_page_storages", set())


def test_a_placed_model_trains():
    model = accelerate(_model())
    ids = torch.randint(0, 3000, (2, 12))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_cast_keeps_the_weights_in_huge_pages_and_shared_memory_stays_shared(huge_pages, monkeypatch):
    monkeypatch.setattr(placement, "MIN_TOTAL_BYTES", 0)  # this small model's bfloat16 weights are below the floor
    model = accelerate(_model())
    model.to(torch.bfloat16)
    weight = model.blocks[0].mlp.down.weight
    assert weight.dtype == torch.bfloat16 and weight.untyped_storage().data_ptr() in model._huge_page_storages
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters())
