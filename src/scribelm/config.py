"""The model's shape, as data.

Every architectural choice of the transformer is a field of `ModelConfig`:
how wide, how deep, how many heads (and how many key/value heads for
grouped-query attention), which activation, which norm and where it sits,
how positions are encoded, which projections carry biases, whether the
unembedding shares the embedding's weights. One `Transformer` class reads
this config, so GPT-2, GPT-3, Llama, Mistral and Qwen2 are presets, not
copies of the model code.

    >>> cfg = ModelConfig.from_preset("gpt3-175b")
    >>> cfg.n_layers, cfg.d_model, cfg.n_heads
    (96, 12288, 96)
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from scribelm.errors import ConfigError, reject_unknown_fields

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "rope", "none")

#: Largest accepted size of each dimension: far beyond any published model, yet small enough that
#: a mistyped or hostile config.json (n_layers: 1e9) is refused before anything is built from it.
LIMITS = {
    "vocab_size": 1 << 24, "context_length": 1 << 24, "d_model": 1 << 17, "n_layers": 1 << 12,
    "n_heads": 1 << 12, "n_kv_heads": 1 << 12, "head_dim": 1 << 12, "d_mlp": 1 << 20,
}


@dataclass
class ModelConfig:
    """Every architectural choice of a decoder-only transformer."""

    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head); fewer: grouped-query
    head_dim: int | None = None  # None: d_model // n_heads
    d_mlp: int | None = None  # None: 4 * d_model
    activation: str = "gelu"  # one of ACTIVATIONS; swiglu/geglu add a gate projection
    norm: str = "layernorm"  # one of NORMS
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x))
    norm_bias: bool = True  # LayerNorm's additive bias (RMSNorm has none)
    position: str = "learned"  # one of POSITIONS
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_context_length"}, {"type": "linear", "factor"}, {"type": "yarn" or "dynamic", "factor", "original_context_length", ...}
    qkv_bias: bool = True  # biases on the query, key and value projections
    attn_out_bias: bool = True  # bias on the attention output projection
    mlp_bias: bool = True  # biases on the MLP projections
    tie_embeddings: bool = False  # unembedding reuses the token embedding matrix
    dropout: float = 0.0
    init_std: float = 0.02
    sliding_window: int | None = None  # each query sees only the last W keys (itself included); None: all earlier ones
    # Sparse mixture of experts (scribelm.moe): 0 experts keeps the dense MLP; otherwise a router
    # sends each token to its top `experts_per_token` of `n_experts` MLPs of width `d_expert`.
    n_experts: int = 0
    experts_per_token: int = 2
    d_expert: int | None = None  # None: d_mlp
    d_shared_expert: int = 0  # width of an always-on expert with its own sigmoid gate (Qwen2-MoE); 0: none
    normalize_top_k: bool = True  # rescale the chosen routing weights to sum to 1 (Mixtral) or keep them (Qwen2-MoE)
    router_jitter: float = 0.0  # training only: the MoE input is multiplied by noise from U(1-jitter, 1+jitter)
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss added in training
    name: str = "custom"

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads > 0 and self.d_model % self.n_heads != 0:
                raise ConfigError(
                    f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                    "choose a head count that divides the width, or set head_dim explicitly"
                )
            self.head_dim = self.d_model // max(self.n_heads, 1)
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.d_expert is None:
            self.d_expert = self.d_mlp
        self.validate()

    # -- checks ---------------------------------------------------------------
    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _allowed_types(hints[f.name])
            if value is None and type(None) in allowed:
                continue
            if isinstance(value, bool) and bool not in allowed:
                ok = False  # True is an int in Python; refuse it where a number is meant
            elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
                ok = True
                object.__setattr__(self, f.name, float(value))
            else:
                ok = isinstance(value, tuple(t for t in allowed if t is not type(None)))
            if not ok:
                want = " or ".join(sorted(t.__name__ for t in allowed))
                raise ConfigError(
                    f"config field '{f.name}' must be {want}, got {type(value).__name__} {value!r}"
                )

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")

        for name, limit in LIMITS.items():
            positive(name)
            if getattr(self, name) > limit:
                raise ConfigError(f"config field '{name}' is {getattr(self, name)}, above the limit of {limit}; "
                                  "check the number (the largest published models stay far below it)")
        for name, allowed in (
            ("activation", ACTIVATIONS),
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
            ("position", POSITIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field '{name}' must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                "each key/value head must serve the same number of query heads"
            )
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.position == "sinusoidal" and self.d_model % 2 != 0:
            raise ConfigError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        self._validate_experts()
        if self.sliding_window is not None and not 0 < self.sliding_window <= LIMITS["context_length"]:
            raise ConfigError(f"sliding_window must be a positive number of tokens, got {self.sliding_window}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.norm_eps < math.inf:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if not 0 < self.rope_theta < math.inf:
            raise ConfigError(f"config field 'rope_theta' must be a positive number, got {self.rope_theta}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind == "llama3" and self.rope_scaling.get("low_freq_factor") == self.rope_scaling.get("high_freq_factor"):
                raise ConfigError("rope_scaling of type 'llama3' needs low_freq_factor != high_freq_factor")
            required = {
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_context_length"),
                "linear": ("factor",),  # position interpolation: every frequency divided by `factor`
                "yarn": ("factor", "original_context_length"),  # + optional beta_fast, beta_slow, attention_factor
                "dynamic": ("factor", "original_context_length"),  # NTK base raised past the original context
            }
            if kind not in required:
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(map(repr, required))}")
            for key in required[kind]:
                if key not in self.rope_scaling:
                    raise ConfigError(f"rope_scaling of type {kind!r} needs the key '{key}'")
                value = self.rope_scaling[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ConfigError(f"rope_scaling '{key}' must be a positive number, got {value!r}")

    def _validate_experts(self) -> None:
        if not 0 <= self.n_experts <= 1 << 12:
            raise ConfigError(f"n_experts must be between 0 (a dense MLP) and {1 << 12}, got {self.n_experts}")
        if not self.n_experts:
            return
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(
                f"experts_per_token={self.experts_per_token} must be between 1 and n_experts={self.n_experts}; "
                "each token is sent to that many of the experts"
            )
        if not 0 < self.d_expert <= LIMITS["d_mlp"]:
            raise ConfigError(f"d_expert must be positive and at most {LIMITS['d_mlp']}, got {self.d_expert}")
        if not 0 <= self.d_shared_expert <= LIMITS["d_mlp"]:
            raise ConfigError(f"d_shared_expert must be between 0 (none) and {LIMITS['d_mlp']}, got {self.d_shared_expert}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ConfigError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if not 0.0 <= self.router_aux_loss_coef < math.inf:
            raise ConfigError(f"router_aux_loss_coef must be a non-negative number, got {self.router_aux_loss_coef}")

    # -- derived --------------------------------------------------------------
    @property
    def gated_mlp(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    # -- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping of field names to values, got {type(data).__name__}")
        reject_unknown_fields(data, cls, "config field", ConfigError)
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> "ModelConfig":
        data = self.to_dict()
        data.update(changes)
        return ModelConfig.from_dict(data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        data = dict(PRESETS[name])
        data["name"] = name
        data.update(overrides)
        return cls.from_dict(data)


def _allowed_types(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for arg in typing.get_args(hint):
            out.extend(_allowed_types(arg))
        return tuple(out)
    if origin is not None:
        return (origin,)
    return (hint,)


_GPT2 = dict(
    vocab_size=50257, context_length=1024, activation="gelu_tanh", norm="layernorm", norm_eps=1e-5,
    position="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
)
_LLAMA = dict(
    activation="swiglu", norm="rmsnorm", norm_eps=1e-5, norm_bias=False, position="rope",
    qkv_bias=False, attn_out_bias=False, mlp_bias=False,
)

#: Named shapes. `tiny` trains on a laptop CPU in minutes; the others are the
#: published shapes of well-known models (weights are not included).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_mlp=768,
        activation="swiglu", norm="rmsnorm", norm_bias=False, position="rope", qkv_bias=False,
        attn_out_bias=False, mlp_bias=False, tie_embeddings=True,
    ),
    "gpt2-124m": dict(_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(_GPT2, d_model=1600, n_layers=48, n_heads=25),
    "llama-style-1b": dict(
        _LLAMA, vocab_size=128256, context_length=8192, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        d_mlp=8192, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_context_length": 8192},
    ),
    "llama2-7b": dict(
        _LLAMA, vocab_size=32000, context_length=4096, d_model=4096, n_layers=32, n_heads=32, d_mlp=11008,
        tie_embeddings=False, norm_eps=1e-5,
    ),
    "mistral-7b": dict(
        _LLAMA, vocab_size=32000, context_length=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        d_mlp=14336, rope_theta=1000000.0, tie_embeddings=False,
    ),
    # Mixtral 8x7B (Jiang et al. 2024): Mistral-7B blocks whose MLP is 8 experts, 2 per token.
    "mixtral-8x7b": dict(
        _LLAMA, vocab_size=32000, context_length=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        d_mlp=14336, rope_theta=1000000.0, tie_embeddings=False, n_experts=8, experts_per_token=2,
        router_aux_loss_coef=0.02,
    ),
    "qwen2-0.5b": dict(
        _LLAMA, vocab_size=151936, context_length=32768, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
        d_mlp=4864, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
    ),
    # GPT-3 175B as published (Brown et al. 2020, table 2.1): GPT-2 style blocks.
    "gpt3-175b": dict(
        vocab_size=50257, context_length=2048, d_model=12288, n_layers=96, n_heads=96, d_mlp=49152,
        activation="gelu", norm="layernorm", position="learned", qkv_bias=True, attn_out_bias=True,
        mlp_bias=True, tie_embeddings=False,
    ),
}
