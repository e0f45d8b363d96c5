"""The mixture-of-experts families, Mixtral and Qwen2-MoE: config.json <-> ModelConfig and weights.

Both are a Mistral / Qwen2 attention stack whose MLPs are `scribelm.moe.MoE` layers, so
the config translation starts from the dense family's and adds the expert fields; the
weight tables add the router and one entry per expert (`{j}`) to Llama's. Checkpoints
store each expert as its own tensors (Mixtral: w1 gate, w3 up, w2 down), which is
also how scribelm holds them, so import and export copy tensors unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scribelm.config import ModelConfig
from scribelm.interop.hf.configs import (
    _count, _llama_like_from_hf, _llama_like_to_hf, _mistral_misfit, _qwen2_misfit, refuse,
)
from scribelm.interop.hf.weights import LLAMA_WEIGHTS, WeightRule, _same

if TYPE_CHECKING:
    from scribelm.interop.hf.families import Family

MIXTRAL_WEIGHTS: tuple[WeightRule, ...] = LLAMA_WEIGHTS + _same(
    ("model.layers.{i}.block_sparse_moe.gate.weight", "blocks.{i}.mlp.router.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", "blocks.{i}.mlp.experts.{j}.gate.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", "blocks.{i}.mlp.experts.{j}.up.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", "blocks.{i}.mlp.experts.{j}.down.weight"),
)

QWEN2_MOE_WEIGHTS: tuple[WeightRule, ...] = LLAMA_WEIGHTS + _same(
    ("model.layers.{i}.mlp.gate.weight", "blocks.{i}.mlp.router.weight"),
    ("model.layers.{i}.mlp.experts.{j}.gate_proj.weight", "blocks.{i}.mlp.experts.{j}.gate.weight"),
    ("model.layers.{i}.mlp.experts.{j}.up_proj.weight", "blocks.{i}.mlp.experts.{j}.up.weight"),
    ("model.layers.{i}.mlp.experts.{j}.down_proj.weight", "blocks.{i}.mlp.experts.{j}.down.weight"),
    ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "blocks.{i}.mlp.shared_expert.gate.weight"),
    ("model.layers.{i}.mlp.shared_expert.up_proj.weight", "blocks.{i}.mlp.shared_expert.up.weight"),
    ("model.layers.{i}.mlp.shared_expert.down_proj.weight", "blocks.{i}.mlp.shared_expert.down.weight"),
    ("model.layers.{i}.mlp.shared_expert_gate.weight", "blocks.{i}.mlp.shared_expert_gate.weight"),
)


def _fraction(hf: dict[str, Any], key: str, default: float, family: str) -> float:
    value = hf.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        refuse(f"{key}={value!r}", f"{family} needs a non-negative number there")
    return float(value)


def _experts(hf: dict[str, Any], key: str, family: str) -> tuple[int, int]:
    n_experts = _count(hf, key, family)
    top_k = _count(hf, "num_experts_per_tok", family, 2)
    if top_k > n_experts:
        refuse(f"num_experts_per_tok={top_k}", f"it exceeds {key}={n_experts}")
    return n_experts, top_k


def mixtral_from_hf(hf: dict[str, Any]) -> ModelConfig:
    n_experts, top_k = _experts(hf, "num_local_experts", "Mixtral")
    dense = _llama_like_from_hf({"sliding_window": None, **hf}, "Mistral")  # Mixtral's default: no window
    return dense.replace(
        n_experts=n_experts, experts_per_token=top_k, d_expert=dense.d_mlp, normalize_top_k=True,
        router_jitter=_fraction(hf, "router_jitter_noise", 0.0, "Mixtral"),
        router_aux_loss_coef=_fraction(hf, "router_aux_loss_coef", 0.001, "Mixtral"), name="mixtral",
    )


def qwen2_moe_from_hf(hf: dict[str, Any]) -> ModelConfig:
    n_experts, top_k = _experts(hf, "num_experts", "Qwen2-MoE")
    step = hf.get("decoder_sparse_step", 1)
    if step != 1 or hf.get("mlp_only_layers"):
        refuse(f"decoder_sparse_step={step} / mlp_only_layers={hf.get('mlp_only_layers')}",
               "scribelm gives every layer the same feed-forward; all layers must be sparse")
    dense = _llama_like_from_hf(hf, "Qwen2")
    return dense.replace(
        qkv_bias=bool(hf.get("qkv_bias", True)),
        n_experts=n_experts, experts_per_token=top_k,
        d_expert=_count(hf, "moe_intermediate_size", "Qwen2-MoE"),
        d_shared_expert=_count(hf, "shared_expert_intermediate_size", "Qwen2-MoE"),
        normalize_top_k=bool(hf.get("norm_topk_prob", False)), router_jitter=0.0,
        router_aux_loss_coef=_fraction(hf, "router_aux_loss_coef", 0.001, "Qwen2-MoE"), name="qwen2_moe",
    )


def _moe_misfit(config: ModelConfig) -> list[str]:
    return [] if config.n_experts else ["experts (has a dense MLP)"]


def mixtral_misfit(config: ModelConfig) -> list[str]:
    reasons = _moe_misfit(config)
    if config.n_experts:
        reasons += _mistral_misfit(config.replace(n_experts=0))  # the rest is a Mistral block
    if config.d_shared_expert:
        reasons.append("no shared expert")
    if not config.normalize_top_k:
        reasons.append("renormalised top-k routing weights")
    return reasons


def qwen2_moe_misfit(config: ModelConfig) -> list[str]:
    reasons = _moe_misfit(config)
    if config.n_experts:
        reasons += [r for r in _qwen2_misfit(config.replace(n_experts=0, qkv_bias=True))]
    if not config.d_shared_expert:
        reasons.append("a shared expert")
    return reasons


def mixtral_to_hf(config: ModelConfig, family: Family) -> dict[str, Any]:
    hf = _llama_like_to_hf(config, family)
    hf.update(
        intermediate_size=config.d_expert, sliding_window=config.sliding_window, num_local_experts=config.n_experts,
        num_experts_per_tok=config.experts_per_token, router_jitter_noise=config.router_jitter,
        router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False,
    )
    return hf


def qwen2_moe_to_hf(config: ModelConfig, family: Family) -> dict[str, Any]:
    hf = _llama_like_to_hf(config, family)
    hf.update(
        qkv_bias=config.qkv_bias, use_sliding_window=config.sliding_window is not None,
        sliding_window=config.sliding_window, max_window_layers=0 if config.sliding_window is not None else config.n_layers,
        num_experts=config.n_experts, num_experts_per_tok=config.experts_per_token,
        moe_intermediate_size=config.d_expert, shared_expert_intermediate_size=config.d_shared_expert,
        norm_topk_prob=config.normalize_top_k, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False,
    )
    return hf
