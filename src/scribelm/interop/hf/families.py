"""The supported Hugging Face families: one `Family` each, naming its weight table and its
config translation, and how a config.json or a ModelConfig finds its family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from scribelm.config import ModelConfig
from scribelm.errors import CheckpointError, ConfigError, ScribeError
from scribelm.interop.hf.configs import (
    _gpt2_from_hf, _gpt2_misfit, _gpt2_to_hf, _llama_like_from_hf, _llama_like_to_hf, _llama_misfit, _mistral_misfit,
    _qwen2_misfit, refuse,
)
from scribelm.interop.hf.moe import (
    MIXTRAL_WEIGHTS, QWEN2_MOE_WEIGHTS, mixtral_from_hf, mixtral_misfit, mixtral_to_hf, qwen2_moe_from_hf,
    qwen2_moe_misfit, qwen2_moe_to_hf,
)
from scribelm.interop.hf.weights import GPT2_WEIGHTS, LLAMA_WEIGHTS, WeightRule

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
    "mixtral": Family("mixtral", "MixtralForCausalLM", "Mixtral", MIXTRAL_WEIGHTS, mixtral_from_hf, mixtral_to_hf,
                      mixtral_misfit),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2-MoE", QWEN2_MOE_WEIGHTS, qwen2_moe_from_hf,
                        qwen2_moe_to_hf, qwen2_moe_misfit),
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
        refuse(f"quantization_config ({method})", "load the unquantized weights and quantize with `scribe quantize`")
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
    for family in hinted + [FAMILIES[k] for k in ("llama", "qwen2", "gpt2", "mixtral", "qwen2_moe")]:
        if not family.misfit(config):
            return family
    reasons = "; ".join(f"{f.title} needs {', '.join(f.misfit(config))}" for f in (FAMILIES["llama"], FAMILIES["gpt2"]))
    raise ConfigError(f"this model's config maps onto no Hugging Face family: {reasons}")
