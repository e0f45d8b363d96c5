"""config.json <-> ModelConfig, family by family: every option maps exactly or is refused by name.

Sizes are checked against scribelm's limits before anything is built; RoPE is read in
both spellings transformers has used (`rope_theta` + `rope_scaling`, `rope_parameters`);
sliding-window attention (Mistral, Mixtral, Qwen2 with every layer sliding) is computed
for real (`ModelConfig.sliding_window`); the one adaptation is a Qwen2 whose layers
partly slide: the context is capped at the window, where full and windowed attention
agree, and a warning says so. A `*_misfit` function
lists what a family would need that a config lacks, so export picks a family that fits.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

from scribelm.config import LIMITS, ModelConfig
from scribelm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from scribelm.interop.hf.families import Family

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


def refuse(option: str, why: str) -> None:
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
        refuse("rope_parameters per layer type", "every layer must share one RoPE")
    theta = spec.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        refuse(f"partial_rotary_factor={partial}", "scribelm rotates every feature of a head")
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
    if kind in ("yarn", "dynamic"):
        return float(theta), _stretched_rope_from_hf(kind, spec, hf)
    refuse(f"rope_scaling type {kind!r}", "supported RoPE types are default, llama3, linear, yarn and dynamic")
    raise AssertionError  # unreachable


def _stretched_rope_from_hf(kind: str, spec: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """YaRN / dynamic NTK (scribelm.rope_scaling): the original context is the spec's
    `original_max_position_embeddings` (YaRN) or the model's `max_position_embeddings` (dynamic)."""
    factor = spec.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
        raise CheckpointError(f"config.json: {kind} rope scaling needs a positive 'factor', got {factor!r}")
    original = hf.get("max_position_embeddings") if kind == "dynamic" else (
        spec.get("original_max_position_embeddings") or hf.get("max_position_embeddings"))
    if original is None:
        raise CheckpointError(f"config.json: {kind} rope scaling needs max_position_embeddings")
    scaling: dict[str, Any] = {"type": kind, "factor": float(factor), "original_context_length": int(original)}
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow"):
            if spec.get(key):
                scaling[key] = float(spec[key])
        if spec.get("truncate") is not None:
            scaling["truncate"] = bool(spec["truncate"])
        if spec.get("attention_factor") is not None:
            scaling["attention_factor"] = float(spec["attention_factor"])
        elif spec.get("mscale") and spec.get("mscale_all_dim"):  # DeepSeek's spelling: a ratio of two mscales
            def mscale(m: float) -> float:
                return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
            scaling["attention_factor"] = mscale(spec["mscale"]) / mscale(spec["mscale_all_dim"])
    return scaling


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
    elif scaling is not None and scaling["type"] == "yarn":
        legacy = {"rope_type": "yarn", "factor": scaling["factor"],
                  "original_max_position_embeddings": scaling["original_context_length"],
                  **{k: scaling[k] for k in ("beta_fast", "beta_slow", "truncate", "attention_factor") if k in scaling}}
    elif scaling is not None and scaling["type"] == "dynamic":
        legacy = {"rope_type": "dynamic", "factor": scaling["factor"]}  # its original context: max_position_embeddings
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
        refuse(f"hidden_act={act!r}", f"supported for {family}: {', '.join(_LLAMA_ACTIVATIONS)}")
    d_model = _count(hf, "hidden_size", family)
    n_heads = _count(hf, "num_attention_heads", family)
    theta, scaling = _rope_from_hf(hf)
    context = _count(hf, "max_position_embeddings", family, {"llama": 2048, "mistral": 131072, "qwen2": 32768}[name])
    if scaling is not None and scaling["type"] in ("yarn", "dynamic"):  # stretched to factor × the original
        context = min(max(context, int(scaling["original_context_length"] * scaling["factor"])), LIMITS["context_length"])
    sliding_window = None
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
        every_layer_slides = (all(t == "sliding_attention" for t in layer_types) if layer_types is not None
                              else hf.get("max_window_layers", 28) == 0)
        if window is not None and every_layer_slides:
            sliding_window = _count(hf, "sliding_window", family)  # computed for real, as Mistral's
        else:
            context = _window_context(context, window, family)  # some layers slide, some not: capped
    else:  # mistral
        qkv_bias = out_bias = mlp_bias = False
        window = hf.get("sliding_window", 4096)  # transformers' default: 4096
        sliding_window = None if window is None else _count(hf, "sliding_window", family)
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
        sliding_window=sliding_window,
        name=name,
    )


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def _gpt2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        refuse(f"activation_function={act!r}", f"supported for GPT-2: {', '.join(_GPT2_ACTIVATIONS)}")
    if not hf.get("scale_attn_weights", True):
        refuse("scale_attn_weights=false", "scribelm always scales attention scores by 1/sqrt(head_dim)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        refuse("scale_attn_by_inverse_layer_idx=true", "scribelm scales every layer's scores alike")
    if hf.get("add_cross_attention", False):
        refuse("add_cross_attention=true", "scribelm is decoder-only")
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
    if config.n_experts:
        reasons.append(f"a dense MLP (has {config.n_experts} experts)")
    return reasons


def _full_attention_misfit(config: ModelConfig) -> list[str]:
    if config.sliding_window is not None and config.sliding_window < config.context_length:
        return [f"full attention (has a sliding window of {config.sliding_window})"]
    return []


def _llama_misfit(config: ModelConfig) -> list[str]:
    reasons = _llama_like_misfit(config) + _full_attention_misfit(config)
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
    reasons = _full_attention_misfit(config)
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
        "max_position_embeddings": (config.rope_scaling["original_context_length"]  # dynamic NTK's reference length
                                    if (config.rope_scaling or {}).get("type") == "dynamic" else config.context_length),
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
        hf.update(sliding_window=config.sliding_window)
    elif family.model_type == "qwen2":
        sliding = config.sliding_window is not None  # then every layer slides: max_window_layers 0
        hf.update(use_sliding_window=sliding, sliding_window=config.sliding_window,
                  max_window_layers=0 if sliding else config.n_layers)
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
