"""Mixtral and Qwen2-MoE against the real `transformers`: random-initialised models saved with
`save_pretrained` load into scribelm with the same logits and router logits, the same
load-balancing loss, the same greedy tokens, and export back tensor for tensor."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import scribelm  # noqa: E402
from scribelm.moe import load_balancing_loss, router_logits  # noqa: E402
from tests.interop.test_hf import greedy, read_safetensors_dir  # noqa: E402

transformers.logging.set_verbosity_error()
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

VOCAB = 96
MOE_CONFIGS = {
    "mixtral": (
        "MixtralConfig", "MixtralForCausalLM",
        dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
             num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False, rope_theta=1e6),
    ),
    "qwen2_moe_shared": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=3,
             norm_topk_prob=False, tie_word_embeddings=False),
    ),
    "qwen2_moe_normalized": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
             norm_topk_prob=True, tie_word_embeddings=True),
    ),
}


def make_hf_moe(kind: str, seed: int = 0):
    config_class, model_class, kwargs = MOE_CONFIGS[kind]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, initializer_range=0.2, max_position_embeddings=128, rms_norm_eps=1e-5, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers starts norms at one and some tensors at zero; make every one count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith(("gate.weight", "shared_expert_gate.weight")) or p.abs().max() == 0:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    out = {}
    for kind in MOE_CONFIGS:
        make_hf_moe(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_logits_and_router_logits_match_transformers(moe_dirs, kind):
    lm = scribelm.load(moe_dirs[kind])
    reference = hf_model(moe_dirs[kind])
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lm.model(ids)
        theirs = reference(ids, output_router_logits=True)
    assert (ours - theirs.logits).abs().max().item() <= 1e-4
    ours_router = router_logits(lm.model)
    assert len(ours_router) == len(theirs.router_logits) == lm.config.n_layers
    for a, b in zip(ours_router, theirs.router_logits):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe_shared"])
def test_load_balancing_loss_matches_transformers(moe_dirs, kind):
    lm = scribelm.load(moe_dirs[kind])
    reference = hf_model(moe_dirs[kind])
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :5] = 0  # a left-padded row
    mask[2, 11:] = 0  # a right-padded row
    config = lm.config
    with torch.no_grad():
        lm.model(ids)
        ours = router_logits(lm.model)
        theirs = reference(ids, output_router_logits=True).router_logits
    for attention_mask in (None, mask):
        expected = load_balancing_loss_func(theirs, config.n_experts, config.experts_per_token, attention_mask)
        got = load_balancing_loss(ours, config.n_experts, config.experts_per_token, attention_mask)
        assert abs(float(got) - float(expected)) <= 1e-6
    # padding changes it: the masked tokens are really left out
    assert abs(float(load_balancing_loss(ours, config.n_experts, config.experts_per_token, mask))
               - float(load_balancing_loss(ours, config.n_experts, config.experts_per_token))) > 1e-6


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe_shared"])
def test_greedy_generation_matches_transformers(moe_dirs, kind):
    lm = scribelm.load(moe_dirs[kind])
    reference = hf_model(moe_dirs[kind])
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert greedy(lm.model, prompt, 32) == theirs


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_export_is_bit_for_bit(moe_dirs, tmp_path, kind):
    source = moe_dirs[kind]
    lm = scribelm.load(source)
    out = lm.save(tmp_path / "exported", format="hf")
    original, exported = read_safetensors_dir(source), read_safetensors_dir(out)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
    src, dst = json.loads((source / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert dst["architectures"] == src["architectures"]
    assert scribelm.load(out).config == lm.config
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(hf_model(out)(ids).logits, hf_model(source)(ids).logits)


def test_config_mapping(moe_dirs):
    mixtral = scribelm.load(moe_dirs["mixtral"]).config
    assert (mixtral.n_experts, mixtral.experts_per_token, mixtral.d_expert, mixtral.d_shared_expert) == (4, 2, 40, 0)
    assert mixtral.normalize_top_k and mixtral.name == "mixtral"
    qwen = scribelm.load(moe_dirs["qwen2_moe_shared"]).config
    assert (qwen.n_experts, qwen.experts_per_token, qwen.d_expert, qwen.d_shared_expert) == (6, 3, 24, 40)
    assert not qwen.normalize_top_k and qwen.qkv_bias and qwen.name == "qwen2_moe"
