import json

import pytest
import torch

from scribelm.adapters import (
    AdapterError,
    Linear4bit,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapters,
    merge_lora,
    quantize_base,
    save_adapters,
    storage_bytes,
)
from scribelm.adapters.quant4 import NF4_LEVELS, dequantize_4bit, dequantize_model, quantize_4bit
from scribelm.config import ModelConfig
from scribelm.model import Transformer
from tests.conftest import tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def perturb_adapters(model, seed=1):
    """Give the zero-initialised B matrices values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


IDS = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("targets, count", [("attention-qv", 4), ("attention", 8), ("mlp", 6), ("all-linear", 14),
                                            ("o,down", 4), ("blocks.1.*", 7), (["blocks.0.attention.k"], 1)])
def test_targets_by_preset_and_pattern_and_lora_is_a_noop_at_init(targets, count):
    model = make_model()
    before = model(IDS)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    assert len(names) == count and "unembedding" not in names
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(model(IDS), before, atol=0, rtol=0)


def test_target_that_matches_nothing_is_refused():
    with pytest.raises(AdapterError, match="'attn.q_proj' matches no linear layer; layers are named like blocks.0.attention.q"):
        apply_lora(make_model(), LoRAConfig(targets="attn.q_proj"))
    with pytest.raises(AdapterError, match="rank"):
        LoRAConfig(rank=0)


def test_only_adapter_parameters_get_gradients():
    model = make_model(dropout=0.1).train()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    model.loss(IDS[:, :-1], IDS[:, 1:]).backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None
        else:
            assert p.grad is None, name
    # B starts at zero, so A's gradient is zero at first and B's is not
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_saved_adapters_are_small_and_reload_onto_a_fresh_base(tmp_path):
    model = make_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets="attention"))
    perturb_adapters(model)
    expected = model(IDS)
    out = save_adapters(model, tmp_path / "adapter", base_model="tiny-base")
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["rank"] == 2 and meta["alpha"] == 4 and meta["base_model"] == "tiny-base"
    assert len(meta["modules"]) == 8
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == {f"{m}.lora_{x}" for m in meta["modules"] for x in "AB"}
    adapter_params = sum(t.numel() for t in saved.values())
    assert adapter_params < 0.1 * make_model().num_parameters()
    fresh = make_model()
    load_adapters(fresh, out)
    torch.testing.assert_close(fresh(IDS), expected)
    # a base of another shape is refused with a reason
    other = Transformer(tiny_config(d_model=64, n_heads=4)).eval()
    with pytest.raises(AdapterError, match="has shape .* load it onto the base model"):
        load_adapters(other, out)
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapters(make_model(), tmp_path)


@pytest.mark.parametrize("targets", ["attention-qv", "all-linear"])
def test_merged_model_gives_the_same_logits(targets):
    model = make_model(qkv_bias=True, mlp_bias=True)
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=targets))
    perturb_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        base_only = make_model(qkv_bias=True, mlp_bias=True)(IDS)
        assert (adapted - base_only).abs().max() > 1e-3  # the adapters do something
        merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)
    # the merged weights are plain, loadable state: same names as the base
    assert set(model.state_dict()) == set(make_model(qkv_bias=True, mlp_bias=True).state_dict())


# --------------------------------------------------------------------------- 4-bit base


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_4bit_roundtrip_and_forward_match_the_dequantized_reference(kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    torch.nn.init.normal_(linear.weight, std=0.02)
    q = Linear4bit.from_linear(linear, kind=kind, group_size=32)
    x = torch.randn(3, 5, 96, requires_grad=True)
    w = q.dequantize()
    reference = x @ w.t() + linear.bias
    y = q(x)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
    # close to the full-precision layer: 4-bit error is a few percent of the output
    full = linear(x)
    assert (y - full).norm() / full.norm() < 0.12
    # dequantized values are exactly level × group scale
    codes, scales = quantize_4bit(linear.weight, kind, 32)
    assert codes.dtype == torch.uint8 and codes.numel() == 96 * 40 // 2 and scales.numel() == 96 * 40 // 32
    if kind == "nf4":
        first = dequantize_4bit(codes, scales, (96 * 40,), kind)[:32] / scales[0].float()
        assert all(any(abs(v - l) < 1e-6 for l in NF4_LEVELS) for v in first.tolist())
    # the backward pass is the dequantized weight's: dx = dy W
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 40) @ w, atol=1e-5, rtol=1e-5)


def test_4bit_base_takes_under_0_3_of_bf16_and_trains_lora_on_top():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=2048, context_length=64, d_model=128, d_mlp=384)).eval()
    ids = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        full_logits = model(ids)
    bf16_bytes = model.num_parameters() * 2
    quantize_base(model, "nf4", group_size=64)
    ratio = storage_bytes(model) / bf16_bytes
    assert ratio <= 0.3, ratio
    with torch.no_grad():
        q_logits = model(ids)
    # errors of ~8% per matrix compound through the layers of a random model; the logits stay aligned
    assert torch.nn.functional.cosine_similarity(q_logits.flatten(), full_logits.flatten(), dim=0) > 0.95
    assert model.unembedding.quantized is model.token_embedding.quantized  # tied: stored once
    apply_lora(model, LoRAConfig(rank=4, targets="all-linear"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), q_logits)  # still a no-op at init
    model.train()
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad is not None and p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # merge folds adapters into dequantized weights; the rest turns back into plain layers
    perturb_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        dequantize_model(model)
        assert not any(isinstance(m, Linear4bit) for m in model.modules())
        torch.testing.assert_close(model(ids), adapted, atol=1e-4, rtol=1e-4)


def test_quantizing_after_lora_is_refused():
    model = make_model()
    apply_lora(model, LoRAConfig())
    with pytest.raises(Exception, match="quantize the base before adding LoRA"):
        quantize_base(model)
