"""The inference matmul path (oneDNN on CPU) and packed q/k/v and gate/up projections (scribelm.accel)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from scribelm.config import ModelConfig
from scribelm.accel import accelerate
from scribelm.accel.dense import Linear, inference_on_cpu, linear
from scribelm.accel.packing import _packed_operands, fused_linear, pack_linears
from scribelm.model import Transformer


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, context_length=32, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=96,
                  activation="swiglu", norm="rmsnorm", position="rope", qkv_bias=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def qkv(model: Transformer, layer: int = 0):
    attention = model.blocks[layer].attention
    return attention.q, attention.k, attention.v


@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48), (1, 1, 48), (0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(shape, bias):
    torch.manual_seed(0)
    weight, b = torch.randn(33, 48), (torch.randn(33) if bias else None)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(linear(x, weight, b), F.linear(x, weight, b), atol=1e-5, rtol=1e-5)
    # a transposed (non-contiguous) input gives the same answer
    xt = torch.randn(48, 7).t()
    with torch.no_grad():
        assert torch.allclose(linear(xt, weight, b), F.linear(xt, weight, b), atol=1e-5, rtol=1e-5)


def test_fast_paths_only_where_no_gradient_is_wanted():
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    fast_path_available = inference_on_cpu(x, layer.weight.detach(), None)
    assert not inference_on_cpu(x, layer.weight, layer.bias)  # grad enabled and the weight requires it
    with torch.no_grad():
        assert inference_on_cpu(x, layer.weight, layer.bias) == fast_path_available
    assert not inference_on_cpu(x.double(), layer.weight.double(), None)  # float32 only
    assert not inference_on_cpu(x.bfloat16(), layer.weight.bfloat16(), None)


def test_linear_trains_like_nn_linear():
    torch.manual_seed(0)
    ours = Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8)
    ours(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert torch.allclose(ours.weight.grad, reference.weight.grad)
    assert torch.allclose(ours.bias.grad, reference.bias.grad)


def test_new_model_is_packed_and_fused_equals_separate():
    torch.manual_seed(0)
    model = accelerate(Transformer(tiny_config())).eval()
    assert _packed_operands(qkv(model)) is not None
    assert _packed_operands((model.blocks[0].mlp.gate, model.blocks[0].mlp.up)) is not None
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        fused = fused_linear(x, qkv(model))
        separate = [layer(x) for layer in qkv(model)]
    for a, b in zip(fused, separate):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_packing_keeps_parameters_names_and_values():
    torch.manual_seed(0)
    model = accelerate(Transformer(tiny_config()))
    unpacked = copy.deepcopy(model)
    for layer in qkv(unpacked):  # give each weight its own storage again
        layer.weight.data = layer.weight.data.clone()
        layer.bias.data = layer.bias.data.clone()
    assert _packed_operands(qkv(unpacked)) is None
    params_before = [id(layer.weight) for layer in qkv(unpacked)]
    assert pack_linears(qkv(unpacked))
    assert [id(layer.weight) for layer in qkv(unpacked)] == params_before  # optimizers stay valid
    assert _packed_operands(qkv(unpacked)) is not None
    for name, tensor in unpacked.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.allclose(unpacked(ids), model(ids), atol=1e-5)


def test_packed_model_trains_like_unpacked_one():
    torch.manual_seed(0)
    packed = accelerate(Transformer(tiny_config()))
    unpacked = copy.deepcopy(packed)
    for block in unpacked.blocks:
        for layer in (block.attention.q, block.attention.k, block.attention.v, block.mlp.gate, block.mlp.up):
            layer.weight.data = layer.weight.data.clone()
    ids = torch.randint(0, 97, (2, 9))
    for model in (packed, unpacked):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            model.loss(ids, ids).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert _packed_operands(qkv(packed)) is not None  # in-place updates keep the layout
    for name, tensor in packed.state_dict().items():
        assert torch.allclose(tensor, unpacked.state_dict()[name], atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(packed(ids), unpacked(ids), atol=1e-5)


def test_cast_packs_again_and_safetensors_round_trip(tmp_path):
    model = accelerate(Transformer(tiny_config()))
    half = model.to(torch.bfloat16)
    operands = _packed_operands(qkv(half))
    assert operands is not None and operands[0].dtype == torch.bfloat16
    model = half.float()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "unembedding.weight"}, str(path))
    loaded = load_file(str(path))
    for name, tensor in loaded.items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_wrapped_layer_falls_back_to_separate_products():
    model = Transformer(tiny_config(qkv_bias=False))
    q, k, v = qkv(model)

    class Scaled(torch.nn.Module):  # stands in for an adapter wrapping a layer
        def __init__(self, inner):
            super().__init__()
            self.inner, self.out_features = inner, inner.out_features

        def forward(self, x):
            return 2 * self.inner(x)

    x = torch.randn(1, 3, 48)
    with torch.no_grad():
        q_out, _, _ = fused_linear(x, (Scaled(q), k, v))
        assert torch.allclose(q_out, 2 * q(x), atol=1e-6)
        assert not pack_linears((Scaled(q), k, v))


def test_plain_model_has_no_inference_layers_and_accelerate_keeps_its_numbers_and_keys():
    from scribelm import model as plain
    from scribelm.accel import is_accelerated
    from scribelm.accel.passes import PackedAttention, PackedMLP

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    assert all(type(m) in (torch.nn.Linear, plain.Attention, plain.MLP, plain.RMSNorm)
               for m in model.modules() if isinstance(m, (torch.nn.Linear, plain.Attention, plain.MLP, plain.RMSNorm)))
    assert not is_accelerated(model) and _packed_operands(qkv(model)) is None
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids)
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    assert accelerate(model) is model and is_accelerated(model)
    assert isinstance(model.blocks[0].attention, PackedAttention) and isinstance(model.blocks[0].mlp, PackedMLP)
    assert type(model.blocks[0].attention.q) is Linear and _packed_operands(qkv(model)) is not None
    assert accelerate(model) is model  # again: harmless
    state = model.state_dict()
    assert list(state) == list(keys_before)
    assert all(torch.equal(state[k], v) for k, v in keys_before.items())
    with torch.no_grad():
        assert torch.allclose(model(ids), before, atol=1e-5)


def test_lm_accelerates_its_model_and_training_a_plain_model_matches_an_accelerated_one():
    from scribelm.accel import is_accelerated
    from scribelm.lm import LM

    torch.manual_seed(0)
    plain_model = Transformer(tiny_config())
    fast = copy.deepcopy(plain_model)
    assert is_accelerated(LM(fast, None).model)
    ids = torch.randint(0, 97, (2, 9))
    for model in (plain_model, fast):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.loss(ids, ids).backward()
        optimizer.step()
    for name, tensor in plain_model.state_dict().items():
        assert torch.allclose(tensor, fast.state_dict()[name], atol=1e-6), name


def test_int4_names_one_format_and_qlora_formats_are_nf4_and_sym4():
    from scribelm.accel.fourbit import FORMATS, Quantized4bit

    assert set(FORMATS) == {"nf4", "sym4"}
    assert Quantized4bit(torch.randn(8, 64), "int4", 32).kind == "sym4"  # the earlier name is still read
