"""Hugging Face checkpoints in and out: GPT-2, Llama, Mistral and Qwen2.

A Hugging Face model directory holds

    config.json                     the architecture ("model_type", sizes, RoPE, biases, ...)
    model.safetensors               the weights, or shards listed in model.safetensors.index.json
    tokenizer.json                  the tokenizer (the `tokenizers` format scribelm uses too)
    tokenizer_config.json           special tokens and the chat template
    generation_config.json          default decoding settings, above all the end-of-sequence ids

All four families are special cases of scribelm's one `Transformer`, so
importing is a translation of config.json into a `ModelConfig` plus a
renaming of tensors, one small table per family:

    Llama / Mistral / Qwen2                             scribelm
    model.embed_tokens.weight                           token_embedding.weight
    model.layers.{i}.input_layernorm.weight             blocks.{i}.attention_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight    blocks.{i}.attention.{q,k,v,o}.weight
    model.layers.{i}.post_attention_layernorm.weight    blocks.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight     blocks.{i}.mlp.{gate,up,down}.weight
    model.norm.weight                                   final_norm.weight
    lm_head.weight                                      unembedding.weight (absent when tied)

GPT-2 stores its projections as `Conv1D`, whose weight is (in, out) — the
transpose of `nn.Linear` — and fuses q, k and v into one `c_attn`; those are
transposed and split on the way in, joined and transposed back on the way out,
so a round trip reproduces every tensor bit for bit. Both models rotate the
halves of each head (Hugging Face's `rotate_half` layout) and compute RMSNorm
in float32 the same way, so no permutation of q/k rows is needed.

Every config option either maps exactly or is refused with its name: a
dynamic-NTK RoPE, a quantized checkpoint, an activation we do not have. The
one adaptation is sliding-window attention (Mistral v0.1, some Qwen2): within
the window it is plain causal attention, so the model's context is set to the
window — exact for every sequence it accepts — and a warning says so.

Weights are opened with `safetensors.safe_open`, which maps the file into
memory: the tensors are views of the page cache until written to, the model
is built on the meta device and the tensors are assigned to it, so loading
needs about one copy of the weights, not two. Pickle checkpoints
(`pytorch_model.bin`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scribelm.checkpoint import CONFIG_FILE, FORMAT, atomic_directory, check_generation, read_json_object
from scribelm.config import LIMITS, ModelConfig
from scribelm.errors import CheckpointError, ConfigError, ScribeError

SINGLE_WEIGHTS = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; Hugging Face's customary 5GB

# --------------------------------------------------------------------------- weight tables


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


def _expand(rules: tuple[WeightRule, ...], config: ModelConfig, present: set[str]) -> list[WeightRule]:
    """Concrete rules (layer indices filled in) for the scribelm tensors `present` in this config."""
    out = []
    for rule in rules:
        layers = range(config.n_layers) if "{i}" in rule.hf else [None]
        for i in layers:
            ours = tuple(o.format(i=i) for o in rule.ours)
            if all(o in present for o in ours):
                out.append(WeightRule(rule.hf.format(i=i), ours, rule.kind))
    return out


def _to_ours(rule: WeightRule, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
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


def _to_hf(rule: WeightRule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.kind == "same":
        return tensors[0].contiguous()
    if rule.kind == "conv1d":
        return tensors[0].t().contiguous()
    if rule.kind == "conv1d_qkv":
        return torch.cat(tensors, dim=0).t().contiguous()  # 3 × (C, C) -> (C, 3C)
    if rule.kind == "split_qkv":
        return torch.cat(tensors, dim=0)
    raise AssertionError(rule.kind)


def _hf_shape(rule: WeightRule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the Hugging Face tensor must have, given the scribelm shapes it maps to."""
    if rule.kind == "same":
        return shapes[0]
    if rule.kind == "conv1d":
        return tuple(reversed(shapes[0]))
    if rule.kind == "conv1d_qkv":
        return (shapes[0][1], sum(s[0] for s in shapes))
    return (sum(s[0] for s in shapes),)


# --------------------------------------------------------------------------- config translation


def _require(hf: dict[str, Any], key: str, family: str) -> Any:
    if hf.get(key) is None:
        raise CheckpointError(f"config.json of this {family} model has no '{key}'; the file is incomplete")
    return hf[key]


# Hugging Face's name for each size -> scribelm's, whose limit (config.LIMITS) applies to it.
_SIZE_FIELDS = {
    "hidden_size": "d_model", "n_embd": "d_model", "num_hidden_layers": "n_layers", "n_layer": "n_layers",
    "num_attention_heads": "n_heads", "n_head": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "d_mlp", "n_inner": "d_mlp", "vocab_size": "vocab_size",
    "max_position_embeddings": "context_length", "n_positions": "context_length",
}


def _count(hf: dict[str, Any], key: str, family: str, default: Any = None) -> int:
    """A positive whole number from config.json (`default` when absent or null) within
    scribelm's limit for that size, or a refusal naming the key."""
    value = hf.get(key)
    if value is None:
        if default is None:
            _require(hf, key, family)
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or (
            isinstance(value, float) and not value.is_integer()) or value <= 0:
        raise CheckpointError(f"config.json of this {family} model: '{key}' must be a positive whole number, got {value!r}")
    limit = LIMITS.get(_SIZE_FIELDS.get(key, ""))
    if limit is not None and value > limit:
        raise CheckpointError(f"config.json of this {family} model: '{key}' is {int(value)}, above the limit of {limit}; "
                              "check the number (the largest published models stay far below it)")
    return int(value)


def _refuse(option: str, why: str) -> None:
    raise ConfigError(f"unsupported config option {option}: {why}; scribelm refuses rather than approximate")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scribelm rope_scaling) from either transformers 5's `rope_parameters`
    or the older `rope_theta` + `rope_scaling` pair.

    Read as transformers reads it: a non-empty legacy `rope_scaling` takes the place of
    `rope_parameters` whole (its own `rope_theta`, else the top-level one, else 10000),
    so a config holding both is run with the legacy entry, and so is it here."""
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(f"config.json: '{key}' must be an object, got {type(hf[key]).__name__}")
    spec = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in spec.values()):
        _refuse("rope_parameters per layer type", "every layer must share one RoPE")
    theta = spec.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        _refuse(f"partial_rotary_factor={partial}", "scribelm rotates every feature of a head")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        try:
            return float(theta), {
                "type": "llama3",
                "factor": float(spec["factor"]),
                "low_freq_factor": float(spec["low_freq_factor"]),
                "high_freq_factor": float(spec["high_freq_factor"]),
                "original_context_length": int(spec["original_max_position_embeddings"]),
            }
        except KeyError as err:
            raise CheckpointError(f"config.json: llama3 rope scaling lacks {err}") from None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(spec["factor"])}
    if kind == "dynamic":
        _refuse("rope_scaling type 'dynamic'", "dynamic NTK scaling changes the frequencies with the sequence length at run time")
    _refuse(f"rope_scaling type {kind!r}", "supported RoPE types are default, llama3 and linear")
    raise AssertionError  # unreachable


def _rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """Both spellings: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5)."""
    scaling = config.rope_scaling
    legacy: dict[str, Any] | None = None
    if scaling is not None and scaling["type"] == "llama3":
        legacy = {
            "rope_type": "llama3", "factor": scaling["factor"], "low_freq_factor": scaling["low_freq_factor"],
            "high_freq_factor": scaling["high_freq_factor"],
            "original_max_position_embeddings": scaling["original_context_length"],
        }
    elif scaling is not None and scaling["type"] == "linear":
        legacy = {"rope_type": "linear", "factor": scaling["factor"]}
    parameters = dict(legacy or {"rope_type": "default"}, rope_theta=config.rope_theta)
    return {"rope_theta": config.rope_theta, "rope_scaling": legacy, "rope_parameters": parameters}


def _window_context(context: int, window: int | None, family: str) -> int:
    """Sliding-window attention equals causal attention on sequences no longer than the
    window; cap the context there so every accepted input gives the reference's numbers."""
    if window is None or window >= context:
        return context
    warnings.warn(
        f"this {family} model uses sliding-window attention ({window} tokens) and scribelm uses full attention: "
        f"the context is capped at {window} tokens (instead of {context}), where both are identical",
        stacklevel=3,
    )
    return int(window)


_LLAMA_ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}


def _llama_like_from_hf(hf: dict[str, Any], family: str) -> ModelConfig:
    name = family.lower()
    act = hf.get("hidden_act", "silu")
    if act not in _LLAMA_ACTIVATIONS:
        _refuse(f"hidden_act={act!r}", f"supported for {family}: {', '.join(_LLAMA_ACTIVATIONS)}")
    d_model = _count(hf, "hidden_size", family)
    n_heads = _count(hf, "num_attention_heads", family)
    theta, scaling = _rope_from_hf(hf)
    context = _count(hf, "max_position_embeddings", family, {"llama": 2048, "mistral": 131072, "qwen2": 32768}[name])
    if name == "llama":
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    elif name == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        layer_types = hf.get("layer_types")
        if layer_types is not None and "sliding_attention" not in layer_types:
            window = None
        if window is not None and layer_types is None and hf.get("max_window_layers", 28) >= hf["num_hidden_layers"]:
            window = None  # only layers from max_window_layers on slide
        context = _window_context(context, window, family)
    else:  # mistral
        qkv_bias = out_bias = mlp_bias = False
        context = _window_context(context, hf.get("sliding_window", 4096), family)  # transformers' default: 4096
    return ModelConfig(
        vocab_size=_count(hf, "vocab_size", family),
        context_length=context,
        d_model=int(d_model),
        n_layers=_count(hf, "num_hidden_layers", family),
        n_heads=int(n_heads),
        n_kv_heads=_count(hf, "num_key_value_heads", family, n_heads),
        head_dim=_count(hf, "head_dim", family, d_model // n_heads),
        d_mlp=_count(hf, "intermediate_size", family),
        activation=_LLAMA_ACTIVATIONS[act],
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_bias=False,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,  # a training choice, not a property of the weights
        init_std=float(hf.get("initializer_range", 0.02)),
        name=name,
    )


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def _gpt2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        _refuse(f"activation_function={act!r}", f"supported for GPT-2: {', '.join(_GPT2_ACTIVATIONS)}")
    if not hf.get("scale_attn_weights", True):
        _refuse("scale_attn_weights=false", "scribelm always scales attention scores by 1/sqrt(head_dim)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        _refuse("scale_attn_by_inverse_layer_idx=true", "scribelm scales every layer's scores alike")
    if hf.get("add_cross_attention", False):
        _refuse("add_cross_attention=true", "scribelm is decoder-only")
    d_model = _count(hf, "n_embd", "GPT-2")
    return ModelConfig(
        vocab_size=_count(hf, "vocab_size", "GPT-2"),
        context_length=_count(hf, "n_positions", "GPT-2", hf.get("n_ctx") or 1024),
        d_model=d_model,
        n_layers=_count(hf, "n_layer", "GPT-2"),
        n_heads=_count(hf, "n_head", "GPT-2"),
        d_mlp=_count(hf, "n_inner", "GPT-2", 4 * d_model),
        activation=_GPT2_ACTIVATIONS[act],
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm_bias=True,
        position="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout=0.0,
        init_std=float(hf.get("initializer_range", 0.02)),
        name="gpt2",
    )


# -- export: which family can hold a scribelm config, and its config.json


def _llama_like_misfit(config: ModelConfig) -> list[str]:
    reasons = []
    if config.position != "rope":
        reasons.append(f"RoPE positions (has {config.position!r})")
    if config.norm != "rmsnorm":
        reasons.append(f"RMSNorm (has {config.norm!r})")
    if config.norm_position != "pre":
        reasons.append("pre-norm blocks (has post-norm)")
    if config.activation not in ("swiglu", "geglu"):
        reasons.append(f"a gated MLP, swiglu or geglu (has {config.activation!r})")
    return reasons


def _llama_misfit(config: ModelConfig) -> list[str]:
    reasons = _llama_like_misfit(config)
    if config.qkv_bias != config.attn_out_bias:
        reasons.append("biases on all four attention projections or on none (one attention_bias switch)")
    return reasons


def _mistral_misfit(config: ModelConfig) -> list[str]:
    reasons = _llama_like_misfit(config)
    if config.qkv_bias or config.attn_out_bias or config.mlp_bias:
        reasons.append("no biases")
    if config.activation != "swiglu":
        reasons.append("SwiGLU")
    if config.rope_scaling is not None:
        reasons.append("no RoPE scaling")
    return reasons


def _qwen2_misfit(config: ModelConfig) -> list[str]:
    reasons = _llama_like_misfit(config)
    if not config.qkv_bias or config.attn_out_bias or config.mlp_bias:
        reasons.append("q/k/v biases and no other biases")
    if config.activation != "swiglu":
        reasons.append("SwiGLU")
    if config.head_dim * config.n_heads != config.d_model:
        reasons.append("head_dim = d_model / n_heads")
    return reasons


def _gpt2_misfit(config: ModelConfig) -> list[str]:
    reasons = []
    if config.position != "learned":
        reasons.append(f"learned positions (has {config.position!r})")
    if config.norm != "layernorm" or not config.norm_bias:
        reasons.append("LayerNorm with bias")
    if config.norm_position != "pre":
        reasons.append("pre-norm blocks (has post-norm)")
    if config.activation not in ("gelu_tanh", "gelu", "relu", "silu"):
        reasons.append(f"an ungated MLP (has {config.activation!r})")
    if not (config.qkv_bias and config.attn_out_bias and config.mlp_bias):
        reasons.append("biases on every projection")
    if config.n_kv_heads != config.n_heads:
        reasons.append("as many key/value heads as query heads")
    if config.head_dim * config.n_heads != config.d_model:
        reasons.append("head_dim = d_model / n_heads")
    return reasons


def _llama_like_to_hf(config: ModelConfig, family: Family) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_mlp,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}[config.activation],
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        **_rope_to_hf(config),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "use_cache": True,
    }
    if family.model_type == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    elif family.model_type == "mistral":
        hf.update(sliding_window=None)
    elif family.model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    return hf


def _gpt2_to_hf(config: ModelConfig, family: Family) -> dict[str, Any]:
    return {
        "architectures": [family.architecture],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_mlp,
        # "gelu_new" is GPT-2's own spelling of the tanh approximation
        "activation_function": {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[config.activation],
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "use_cache": True,
    }


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: its names, its weight table, its config translation."""

    model_type: str
    architecture: str
    title: str
    weights: tuple[WeightRule, ...]
    from_hf: Callable[[dict[str, Any]], ModelConfig]
    to_hf: Callable[[ModelConfig, "Family"], dict[str, Any]]
    misfit: Callable[[ModelConfig], list[str]]  # what this family would need that the config lacks
    ignored: str = r"$^"  # tensors that carry no weights: old causal-mask buffers, cached RoPE tables
    prefix: str = ""  # the base model's prefix, absent in checkpoints saved from the base model

    def normalize(self, name: str) -> str:
        if self.prefix and not name.startswith(self.prefix) and not name.startswith("lm_head."):
            return self.prefix + name
        return name


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "GPT2LMHeadModel", "GPT-2", GPT2_WEIGHTS, _gpt2_from_hf, _gpt2_to_hf, _gpt2_misfit,
                   ignored=r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$", prefix="transformer."),
    "llama": Family("llama", "LlamaForCausalLM", "Llama", LLAMA_WEIGHTS, lambda hf: _llama_like_from_hf(hf, "Llama"),
                    _llama_like_to_hf, _llama_misfit, ignored=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    "mistral": Family("mistral", "MistralForCausalLM", "Mistral", LLAMA_WEIGHTS,
                      lambda hf: _llama_like_from_hf(hf, "Mistral"), _llama_like_to_hf, _mistral_misfit,
                      ignored=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "Qwen2", LLAMA_WEIGHTS, lambda hf: _llama_like_from_hf(hf, "Qwen2"),
                    _llama_like_to_hf, _qwen2_misfit, ignored=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def _supported() -> str:
    return ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())


def family_of(hf: dict[str, Any]) -> Family:
    """The family of a Hugging Face config.json, or a refusal naming what it is."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    if architectures:
        raise ConfigError(f"architecture {', '.join(map(str, architectures))} is not supported; supported: {_supported()}")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise ConfigError(f"model_type {model_type!r} is not supported; supported: {_supported()}")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config.json (as a dict) into a ModelConfig, exactly or not at all."""
    family = family_of(hf)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "unknown") if isinstance(hf["quantization_config"], dict) else "unknown"
        _refuse(f"quantization_config ({method})", "load the unquantized weights and quantize with `scribe quantize`")
    try:
        return family.from_hf(hf)
    except (TypeError, ValueError, KeyError) as err:
        if isinstance(err, ScribeError):
            raise
        raise CheckpointError(f"config.json of this {family.title} model is malformed ({err!r})") from None


def family_for(config: ModelConfig, architecture: str | None = None) -> Family:
    """The Hugging Face family to export a config as. A name like 'mistral-7b' or 'qwen2'
    (how imported models are named) picks that family when it fits; otherwise Llama or GPT-2."""
    if architecture is not None:
        family = _BY_ARCHITECTURE.get(architecture) or FAMILIES.get(architecture)
        if family is None:
            raise ConfigError(f"cannot export as {architecture!r}; supported: {_supported()}")
        misfit = family.misfit(config)
        if misfit:
            raise ConfigError(f"this model cannot be exported as {family.architecture}, which needs {'; '.join(misfit)}")
        return family
    name = config.name.lower()
    hinted = [f for key, f in FAMILIES.items() if name.startswith(key)]
    for family in hinted + [FAMILIES["llama"], FAMILIES["qwen2"], FAMILIES["gpt2"]]:
        if not family.misfit(config):
            return family
    reasons = "; ".join(f"{f.title} needs {', '.join(f.misfit(config))}" for f in (FAMILIES["llama"], FAMILIES["gpt2"]))
    raise ConfigError(f"this model's config maps onto no Hugging Face family: {reasons}")


# --------------------------------------------------------------------------- files


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    return read_json_object(
        Path(path) / CONFIG_FILE, CheckpointError,
        missing=f"{Path(path)} has no {CONFIG_FILE}; a Hugging Face model directory needs one",
    )


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A directory whose config.json looks like Hugging Face's (has model_type or architectures)."""
    try:
        data = read_hf_config(path)
    except CheckpointError:
        return False
    return data.get("format") != FORMAT and ("model_type" in data or "architectures" in data)


def _weight_files(path: Path) -> dict[str, Path]:
    """Every tensor name -> the safetensors file that holds it."""
    single, index = path / SINGLE_WEIGHTS, path / INDEX_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{single} is corrupt or truncated ({err}); download it again") from None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err!r})") from None
        if not isinstance(weight_map, dict) or any(not isinstance(v, str) or Path(v).name != v for v in weight_map.values()):
            raise CheckpointError(f"{index} must map tensor names to shard file names inside {path}")
        missing = sorted({shard for shard in weight_map.values() if not (path / shard).is_file()})
        if missing:
            raise CheckpointError(
                f"{path} is missing {len(missing)} weight shard(s) listed in {INDEX_FILE}: {', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}; download the complete model"
            )
        return {name: path / shard for name, shard in weight_map.items()}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} has only PyTorch pickle weights ({', '.join(pickles[:3])}), which scribelm never opens because "
            "unpickling can run code; convert them to safetensors where you trust the file, e.g. "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT)` with transformers, then load OUT"
        )
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise CheckpointError(
            f"{path} has {', '.join(others[:3])} but neither {SINGLE_WEIGHTS} nor {INDEX_FILE}; "
            "it is not in the transformers layout"
        )
    raise CheckpointError(f"{path} has no weights ({SINGLE_WEIGHTS} or {INDEX_FILE})")


def _read_generation_config(path: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json as it is (Hugging Face names), with config.json's token ids filled in."""
    generation: dict[str, Any] = {}
    file = path / GENERATION_CONFIG
    if file.is_file():
        try:
            generation = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file} is not valid JSON ({err})") from None
        if not isinstance(generation, dict):
            raise CheckpointError(f"{file} must hold a JSON object")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # transformers falls back to config.json
        if generation.get(key) is None and hf.get(key) is not None:
            generation[key] = hf[key]
    return generation


def _ids(value: Any, key: str = "eos_token_id") -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise CheckpointError(f"{GENERATION_CONFIG}: '{key}' must be a token id or a list of them, got {value!r}")
    return list(values)


def _setting(generation: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """generation[key] as `kind` (`default` when absent or null), or a refusal naming the key."""
    value = generation.get(key)
    if value is None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole):
        raise CheckpointError(f"{GENERATION_CONFIG}: '{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def generation_from_hf(generation: dict[str, Any], tokenizer=None) -> dict[str, Any]:
    """Hugging Face generation settings -> scribelm's (`LM.generation_config`, read by
    `LM.generate`), so that decoding behaves as `transformers.generate` does by default:
    every eos id stops, do_sample=false means greedy, sampling keeps transformers' top_k=50
    unless the file sets it, and BOS is prepended when the tokenizer would add it."""
    out: dict[str, Any] = {}
    stops = _ids(generation.get("eos_token_id"))
    if stops:
        out["stop_token_ids"] = stops
    if generation.get("do_sample"):
        out["temperature"] = _setting(generation, "temperature", float, 1.0)
        out["top_k"] = _setting(generation, "top_k", int, 50)
        out["top_p"] = _setting(generation, "top_p", float, 1.0)
        if _setting(generation, "min_p", float):
            out["min_p"] = _setting(generation, "min_p", float)
    else:
        out["temperature"] = 0.0  # greedy (or beam search when num_beams > 1)
    for key, kind in (("repetition_penalty", float), ("max_new_tokens", int), ("num_beams", int), ("length_penalty", float)):
        if generation.get(key) is not None:
            out[key] = _setting(generation, key, kind)
    if isinstance(generation.get("early_stopping"), bool):
        out["early_stopping"] = generation["early_stopping"]
    if tokenizer is not None:
        out["add_bos_token"] = _tokenizer_adds_bos(tokenizer)
    return check_generation(out, GENERATION_CONFIG)


def generation_to_hf(generation: dict[str, Any], tokenizer=None) -> dict[str, Any]:
    """scribelm's generation settings -> generation_config.json, the inverse of `generation_from_hf`
    (an unset temperature is scribelm's default 1.0: sampling, no top-k)."""
    out: dict[str, Any] = {}
    stops = _ids(generation.get("stop_token_ids"))
    if tokenizer is not None:
        if tokenizer.bos_id is not None:
            out["bos_token_id"] = tokenizer.bos_id
        if tokenizer.eos_id is not None and tokenizer.eos_id not in stops:
            stops.insert(0, tokenizer.eos_id)  # scribelm always stops at the tokenizer's EOS
        if tokenizer.pad_id is not None:
            out["pad_token_id"] = tokenizer.pad_id
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    temperature = float(generation.get("temperature", 1.0))
    if temperature == 0:
        out["do_sample"] = False
    else:
        out.update(do_sample=True, temperature=temperature, top_k=int(generation.get("top_k", 0)),
                   top_p=float(generation.get("top_p", 1.0)))
        if generation.get("min_p"):
            out["min_p"] = float(generation["min_p"])
    for key in ("repetition_penalty", "max_new_tokens", "num_beams", "length_penalty", "early_stopping"):
        if generation.get(key) is not None:
            out[key] = generation[key]
    return out


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether transformers' tokenizer puts BOS in front of encoded text: the
    tokenizer_config.json flag when present, else what tokenizer.json's post-processor does."""
    flag = tokenizer.extra_config.get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    bos = tokenizer.bos_id
    if bos is None:
        return False
    ids = tokenizer.backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos


def _gpt2_vocab_merges_tokenizer(path: Path):
    """GPT-2's original tokenizer files (vocab.json + merges.txt) as the byte-level BPE
    that transformers builds from them: same merges, same pre-tokenizer, same specials."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    from scribelm.tokenizer import Tokenizer

    config: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        try:
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path / 'tokenizer_config.json'} is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / 'tokenizer_config.json'} must hold a JSON object")
    try:
        backend = Backend(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    except Exception as err:  # the Rust library raises its own Exception type
        raise CheckpointError(f"vocab.json / merges.txt in {path} cannot be read as a BPE tokenizer: {err}") from None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

    def name(value: Any) -> str | None:
        return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None

    specials = {name(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials |= {name(t) for t in (config.get("added_tokens_decoder") or {}).values() if isinstance(t, dict) and t.get("special")}
    specials.discard(None)
    if not specials and backend.token_to_id("<|endoftext|>") is not None:
        specials = {"<|endoftext|>"}  # GPT-2's one special token, its BOS and EOS
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials)])
    bos = name(config.get("bos_token")) or ("<|endoftext|>" if "<|endoftext|>" in specials else None)
    eos = name(config.get("eos_token")) or bos
    template = config.get("chat_template")
    extra = {k: v for k, v in config.items() if k not in ("bos_token", "eos_token", "pad_token", "chat_template")}
    extra["tokenizer_class"] = "GPT2Tokenizer"
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=name(config.get("pad_token")),
                     chat_template=template if isinstance(template, str) else None, extra_config=extra)


def _load_tokenizer(path: Path):
    from scribelm.tokenizer import Tokenizer

    if not (path / "tokenizer.json").is_file():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tokenizer = _gpt2_vocab_merges_tokenizer(path)
        else:
            return None  # e.g. only a SentencePiece tokenizer.model: the model loads, text needs a tokenizer.json
    else:
        tokenizer = Tokenizer.load(path)
    template_file = path / "chat_template.jinja"  # where transformers >= 4.43 saves it
    if not tokenizer.chat_template and template_file.is_file():
        try:
            tokenizer.chat_template = template_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{template_file} is not UTF-8 text ({err})") from None
    return tokenizer


# --------------------------------------------------------------------------- load

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


_HF_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def _check_layer_count(path: Path, family: Family, config: ModelConfig, names: Iterable[str]) -> None:
    """Refuse a layer count the weight names contradict before a model is built from it
    (building follows the config, so a wrong count would cost in proportion to the mistake)."""
    layers = {int(m.group(1)) for name in names if (m := _HF_LAYER.search(name))}
    if layers != set(range(config.n_layers)):
        key = "n_layer" if family.model_type == "gpt2" else "num_hidden_layers"
        held = f"layers {min(layers)}..{max(layers)}" if layers else "no layers"
        raise CheckpointError(
            f"{path / CONFIG_FILE} says {key}={config.n_layers} but the weights hold {held}; "
            "the config and the weights disagree"
        )


def load_hf(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a Hugging Face model directory as an `LM` (weights memory-mapped, dtype kept unless `dtype`)."""
    from scribelm.lm import LM
    from scribelm.model import Transformer

    path = Path(path)
    hf = read_hf_config(path)
    family = family_of(hf)
    config = config_from_hf(hf)
    files = _weight_files(path)
    _check_layer_count(path, family, config, files)
    # the small side files before the weights: a mistake in them is reported first
    tokenizer = _load_tokenizer(path)
    generation = generation_from_hf(_read_generation_config(path, hf), tokenizer)

    with torch.device("meta"):  # no memory: the tensors are assigned below
        model = Transformer(config)
    expected = {
        name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if not (config.tie_embeddings and name == "unembedding.weight")
    }
    rules = _expand(family.weights, config, set(expected))
    by_name = {family.normalize(name): name for name in files}  # our spelling -> the file's spelling

    missing = [r.hf for r in rules if r.hf not in by_name]
    if missing:
        raise CheckpointError(
            f"{path} lacks weight(s) its config.json needs: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    used = {r.hf for r in rules}
    ignored = re.compile(family.ignored)
    unexpected = sorted(
        n for n in by_name
        if n not in used and not ignored.match(n) and not (config.tie_embeddings and n == "lm_head.weight")
    )
    if unexpected:
        raise CheckpointError(
            f"{path} holds weight(s) a plain {family.architecture} with this config.json does not have: "
            f"{', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
        )

    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles: dict[Path, tuple[Any, set[str]]] = {}  # one open mapping per file, with its tensor names

        def handle(file: Path):
            if file not in handles:
                opened = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                handles[file] = (opened, set(opened.keys()))
            return handles[file]

        try:
            for rule in rules:
                file_name = by_name[rule.hf]
                f, names = handle(files[file_name])
                if file_name not in names:
                    raise CheckpointError(f"{files[file_name]} does not hold {file_name}, though {INDEX_FILE} says so")
                got = tuple(f.get_slice(file_name).get_shape())
                want = _hf_shape(rule, [expected[o] for o in rule.ours])
                if got != want:
                    raise CheckpointError(
                        f"weight {file_name} in {files[file_name].name} has shape {got} but config.json implies {want}; "
                        "the weights and config.json disagree"
                    )
                stored = _SAFETENSORS_DTYPES.get(f.get_slice(file_name).get_dtype())
                if rule.kind == "same" and (dtype is None or dtype == stored):
                    state[rule.ours[0]] = f.get_tensor(file_name)  # a view of the memory-mapped file
                    continue
                # A tensor that is copied (transposed, split, cast) is read through its own short-lived
                # mapping: pages touched by the copy leave memory with it, so the peak stays near one
                # copy of the weights instead of the copies plus the whole mapped file.
                with safe_open(str(files[file_name]), framework="pt", device="cpu") as once:
                    tensor = once.get_tensor(file_name)
                    if dtype is not None:
                        tensor = tensor.to(dtype)
                    parts = _to_ours(rule, tensor, config)
                    del tensor
                for ours, part in zip(rule.ours, parts):
                    state[ours] = part
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"a weight file in {path} is corrupt or truncated ({err}); download it again") from None

    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.unembedding.weight = model.token_embedding.weight
    model = model.to(device)
    model.eval()
    return LM(model=model, tokenizer=tokenizer, generation_config=generation)


# --------------------------------------------------------------------------- export


def parse_size(size: int | str) -> int:
    """'5GB' -> 5·10^9, '500MiB' -> 500·2^20, 1000 -> 1000 (bytes)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not match:
            raise ConfigError(f"cannot read the size {size!r}; write it like 5GB, 500MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
        value = int(number * scale[unit])
    if value <= 0:
        raise ConfigError(f"the shard size must be positive, got {size!r}")
    return value


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Fill shards in order up to `max_bytes` each; a larger tensor gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def hf_state_dict(model: torch.nn.Module, family: Family) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names (GPT-2's fused and transposed as Conv1D)."""
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    present = {k for k in state if not (config.tie_embeddings and k == "unembedding.weight")}
    rules = _expand(family.weights, config, present)
    uncovered = sorted(present - {o for r in rules for o in r.ours})
    if uncovered:  # adapters, quantized layers, anything a plain Transformer does not have
        raise ScribeError(
            f"the model holds tensors a {family.architecture} has no place for: {', '.join(uncovered[:4])}"
            f"{' ...' if len(uncovered) > 4 else ''}; merge adapters and undo quantization before exporting"
        )
    on_cpu = {k: v if v.is_meta else v.cpu() for k, v in state.items()}  # meta: names and shapes only
    return {r.hf: _to_hf(r, [on_cpu[o] for o in r.ours]) for r in rules}


def _dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def save_hf(
    lm,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    architecture: str | None = None,
) -> Path:
    """Write `lm` as a Hugging Face model directory (atomically) that transformers loads.

    architecture: force a family ("LlamaForCausalLM", "mistral", ...); by default the
    config's name picks one that fits, else Llama or GPT-2.
    """
    config = lm.config
    family = family_for(config, architecture)
    max_bytes = parse_size(max_shard_size)
    tensors = hf_state_dict(lm.model, family)

    tokenizer = lm.tokenizer
    generation = generation_to_hf(lm.generation_config or {}, tokenizer)
    hf = family.to_hf(config, family)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        hf[key] = generation.get(key)
    hf["dtype"] = hf["torch_dtype"] = _dtype_name(lm.model)  # transformers 5 reads dtype, 4 torch_dtype

    path = Path(path)
    shards = _shards(tensors, max_bytes)
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_WEIGHTS), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2))
    return path


__all__ = [
    "FAMILIES", "Family", "WeightRule", "config_from_hf", "family_for", "family_of", "generation_from_hf",
    "generation_to_hf", "hf_state_dict",
    "is_hf_directory", "load_hf", "parse_size", "read_hf_config", "save_hf",
]
