"""The weight tables: each Hugging Face tensor name and the scribelm tensor(s) it becomes.

A rule is written once per layer with `{i}` for the layer index; `expand_rules` fills the
indices in for a config, `to_ours` / `to_hf` convert one tensor each way (GPT-2's
Conv1D weights are transposed, its fused q/k/v split and joined), and `hf_shape` gives
the shape a file's tensor must have before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scribelm.config import ModelConfig

@dataclass(frozen=True)
class WeightRule:
    """One Hugging Face tensor and the scribelm tensor(s) it becomes.

    kind: "same"       copied as is
          "conv1d"     GPT-2 Conv1D (in, out) <-> nn.Linear (out, in): transposed
          "conv1d_qkv" GPT-2's fused c_attn weight (C, q+k+v): transposed, split into q, k, v
          "split_qkv"  GPT-2's fused c_attn bias (q+k+v,): split into q, k, v
    """

    hf: str
    ours: tuple[str, ...]
    kind: str = "same"


def _same(*pairs: tuple[str, str]) -> tuple[WeightRule, ...]:
    return tuple(WeightRule(hf, (ours,)) for hf, ours in pairs)


LLAMA_WEIGHTS: tuple[WeightRule, ...] = _same(
    ("model.embed_tokens.weight", "token_embedding.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "unembedding.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attention.q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attention.k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attention.v.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attention.o.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "blocks.{i}.attention.q.bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "blocks.{i}.attention.k.bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blocks.{i}.attention.v.bias"),
    ("model.layers.{i}.self_attn.o_proj.bias", "blocks.{i}.attention.o.bias"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight"),
    ("model.layers.{i}.mlp.gate_proj.bias", "blocks.{i}.mlp.gate.bias"),
    ("model.layers.{i}.mlp.up_proj.bias", "blocks.{i}.mlp.up.bias"),
    ("model.layers.{i}.mlp.down_proj.bias", "blocks.{i}.mlp.down.bias"),
)

GPT2_WEIGHTS: tuple[WeightRule, ...] = _same(
    ("transformer.wte.weight", "token_embedding.weight"),
    ("transformer.wpe.weight", "position_embedding.weight"),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("transformer.ln_f.bias", "final_norm.bias"),
    ("lm_head.weight", "unembedding.weight"),
    ("transformer.h.{i}.ln_1.weight", "blocks.{i}.attention_norm.weight"),
    ("transformer.h.{i}.ln_1.bias", "blocks.{i}.attention_norm.bias"),
    ("transformer.h.{i}.ln_2.weight", "blocks.{i}.mlp_norm.weight"),
    ("transformer.h.{i}.ln_2.bias", "blocks.{i}.mlp_norm.bias"),
    ("transformer.h.{i}.attn.c_proj.bias", "blocks.{i}.attention.o.bias"),
    ("transformer.h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.up.bias"),
    ("transformer.h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.down.bias"),
) + (
    WeightRule("transformer.h.{i}.attn.c_attn.weight",
               ("blocks.{i}.attention.q.weight", "blocks.{i}.attention.k.weight", "blocks.{i}.attention.v.weight"),
               "conv1d_qkv"),
    WeightRule("transformer.h.{i}.attn.c_attn.bias",
               ("blocks.{i}.attention.q.bias", "blocks.{i}.attention.k.bias", "blocks.{i}.attention.v.bias"),
               "split_qkv"),
    WeightRule("transformer.h.{i}.attn.c_proj.weight", ("blocks.{i}.attention.o.weight",), "conv1d"),
    WeightRule("transformer.h.{i}.mlp.c_fc.weight", ("blocks.{i}.mlp.up.weight",), "conv1d"),
    WeightRule("transformer.h.{i}.mlp.c_proj.weight", ("blocks.{i}.mlp.down.weight",), "conv1d"),
)


def expand_rules(rules: tuple[WeightRule, ...], config: ModelConfig, present: set[str]) -> list[WeightRule]:
    """Concrete rules (layer indices `{i}` and expert indices `{j}` filled in) for the scribelm
    tensors `present` in this config."""
    out = []
    for rule in rules:
        layers = range(config.n_layers) if "{i}" in rule.hf else [None]
        experts = range(config.n_experts) if "{j}" in rule.hf else [None]
        for i in layers:
            for j in experts:
                ours = tuple(o.format(i=i, j=j) for o in rule.ours)
                if all(o in present for o in ours):
                    out.append(WeightRule(rule.hf.format(i=i, j=j), ours, rule.kind))
    return out


def to_ours(rule: WeightRule, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    if rule.kind == "same":
        return [tensor]
    if rule.kind == "conv1d":
        return [tensor.t().contiguous()]
    sizes = [config.q_dim, config.kv_dim, config.kv_dim]
    if rule.kind == "conv1d_qkv":
        return [part.contiguous() for part in tensor.t().split(sizes, dim=0)]  # (C, 3C) -> 3 × (C, C)
    if rule.kind == "split_qkv":
        return [part.contiguous() for part in tensor.split(sizes, dim=0)]
    raise AssertionError(rule.kind)


def to_hf(rule: WeightRule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.kind == "same":
        return tensors[0].contiguous()
    if rule.kind == "conv1d":
        return tensors[0].t().contiguous()
    if rule.kind == "conv1d_qkv":
        return torch.cat(tensors, dim=0).t().contiguous()  # 3 × (C, C) -> (C, 3C)
    if rule.kind == "split_qkv":
        return torch.cat(tensors, dim=0)
    raise AssertionError(rule.kind)


def hf_shape(rule: WeightRule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the Hugging Face tensor must have, given the scribelm shapes it maps to."""
    if rule.kind == "same":
        return shapes[0]
    if rule.kind == "conv1d":
        return tuple(reversed(shapes[0]))
    if rule.kind == "conv1d_qkv":
        return (shapes[0][1], sum(s[0] for s in shapes))
    return (sum(s[0] for s in shapes),)
