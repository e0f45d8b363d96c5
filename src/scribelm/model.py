"""The transformer, top to bottom, like the textbook picture.

    ids (B, T)
     │ token embedding               (B, T, C)      C = d_model
     │ + positions (learned / sinusoidal; RoPE instead rotates q and k)
     ▼
    Block × n_layers, each:
     │ x = x + Attention(Norm(x))    masked (causal) multi-head self-attention
     │ x = x + MLP(Norm(x))          ReLU / GELU / SwiGLU feed-forward
     │ (post-norm configs: x = Norm(x + f(x)), as in GPT-1 and BERT)
     ▼
    final Norm → unembedding → logits (B, T, V);  softmax gives next-token probabilities

Everything that differs between GPT-2, GPT-3, Llama, Mistral and Qwen2 is a
field of `ModelConfig`; there is one model class. An encoder (BERT) is the same
class with `causal=False` (each position sees the whole sequence), post-norm,
token-type embeddings, a norm on the embeddings and the masked-LM transform.
An encoder-decoder (T5, `scribelm.seq2seq`) is two of them: its decoder's blocks add a
cross-attention sub-layer that reads the encoder's output (`EncoderMemory`), and
`position="relative"` adds T5's learned bias per head and distance to the scores. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`, which picks a fused
kernel (flash / memory-efficient) where one applies. Keys and values can be
written to a `KVCache` so that generation computes each position once.

This file is plain PyTorch and stays so: inference swaps in faster layers from
outside (`scribelm.accel.accelerate`: packed q/k/v, native CPU kernels) and
quantization swaps in quantized ones (`scribelm.quant`), keeping every
parameter's name, so training and exports use exactly what is written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.cache import ContextOverflowError, KVCache, RollingKVCache
from scribelm.config import ModelConfig
from scribelm.errors import ScribeError
from scribelm.moe import MoE
from scribelm.relative_position import RelativePositionBias
from scribelm.rope_scaling import (
    dynamic_ntk_inverse_frequencies, longrope_inverse_frequencies, yarn_attention_factor, yarn_inverse_frequencies,
)

# --------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Scale by the root-mean-square of the features (no centering, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 so bf16 activations do not lose the small variance.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.norm_bias)


# --------------------------------------------------------------------------- positions


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed encoding of 'Attention Is All You Need': sin on even features,
    cos on odd ones, wavelengths from 2π to 10000·2π. positions (B, T) -> (B, T, dim)."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * freqs  # (B, T, dim/2)
    encoding = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (B, T, dim/2, 2)
    return encoding.flatten(-2)  # (B, T, dim): sin, cos, sin, cos, ...


def rope_inverse_frequencies(config: ModelConfig, device: torch.device | None = None, seq_len: int = 0) -> torch.Tensor:
    """θ_i = base^(-2i/d) for each pair of head features, with Llama-3, linear, YaRN or dynamic
    NTK scaling if configured (scribelm.rope_scaling; dynamic depends on the sequence length)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling
    if scaling is not None and scaling["type"] == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_context_length"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    elif scaling is not None and scaling["type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]  # positions interpolated: angle(t) = t/factor · θ_i
    elif scaling is not None and scaling["type"] == "yarn":
        inv_freq = yarn_inverse_frequencies(dim, config.rope_theta, scaling, device)
    elif scaling is not None and scaling["type"] == "dynamic":
        inv_freq = dynamic_ntk_inverse_frequencies(dim, config.rope_theta, scaling, seq_len, device)
    elif scaling is not None and scaling["type"] == "longrope":
        inv_freq = longrope_inverse_frequencies(dim, config.rope_theta, scaling, seq_len, device)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of every (position, frequency) angle, for `apply_rope`:
    positions (B, T) -> (B, 1, T, head_dim) each; the sin is negated on the first half.
    attention_factor (YaRN) scales both, so every q·k score by its square."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    cos = torch.cat((cos, cos), dim=-1)  # (B, T, hd): halves layout, as Llama/HF
    sin = torch.cat((-sin, sin), dim=-1)  # (B, T, hd)
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of features (i, i + hd/2) by its position's angle θ:

        (x_i, x_j) -> (x_i·cos θ - x_j·sin θ,  x_j·cos θ + x_i·sin θ),   j = i + hd/2

    that is x·cos + swap_halves(x)·(-sin, +sin), with the sign carried by `sin`
    (rope_cos_sin). x (B, H, T, hd)."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # (B, H, T, hd): second half first
    return torch.addcmul(x * cos, swapped, sin)


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Masked multi-head self-attention; grouped-query when n_kv_heads < n_heads."""

    # softmax(q·kᵀ/√hd + mask)·v by SDPA's fused kernels; scribelm.inspect sets an explicit
    # one on a layer while its attention scores or pattern are being read.
    attend = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        self.scale = config.attention_scale  # None: SDPA's 1/sqrt(head_dim)
        self.q = nn.Linear(config.d_model, config.q_dim, bias=config.qkv_bias)
        self.k = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.v = nn.Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.o = nn.Linear(config.q_dim, config.d_model, bias=config.attn_out_bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, H·hd), k and v (B, T, KV·hd)."""
        return self.q(x), self.k(x), self.v(x)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, KV, S, hd), S = cached + T
        y = self.attend(
            q, k, v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H·hd)
        return self.o(y)  # (B, T, C)


class EncoderMemory:
    """What a decoder cross-attends to: the encoder's output states (B, S, C), its padding
    mask (B, S) or None, and each layer's keys and values of them, computed on first use
    and kept, so generation projects the encoder's output once per prompt, not per token."""

    def __init__(self, states: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        self.states = states
        self.mask = None if padding_mask is None else padding_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        self.keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class CrossAttention(Attention):
    """Queries from the decoder, keys and values from the encoder's output (no causal mask:
    the whole source is known). Same projections as self-attention."""

    def forward(self, x: torch.Tensor, memory: EncoderMemory) -> torch.Tensor:
        B, T, _ = x.shape
        if self.layer_index not in memory.keys_values:
            M, S, _ = memory.states.shape  # M = B, or 1 for one source shared by several rows (beams)
            k = self.k(memory.states).view(M, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (M, KV, S, hd)
            v = self.v(memory.states).view(M, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (M, KV, S, hd)
            memory.keys_values[self.layer_index] = (k, v)
        k, v = memory.keys_values[self.layer_index]
        if k.shape[0] != B:
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)  # (B, KV, S, hd): views, no copies
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        y = self.attend(
            q, k, v, attn_mask=memory.mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


# --------------------------------------------------------------------------- feed-forward


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """Position-wise feed-forward: up-project, activate (gated for SwiGLU/GeGLU), down-project."""

    def __init__(self, config: ModelConfig, d_mlp: int | None = None) -> None:
        super().__init__()
        d_mlp = d_mlp or config.d_mlp  # a mixture-of-experts' experts have their own width
        self.activation = _ACTIVATIONS[config.activation]
        self.up = nn.Linear(config.d_model, d_mlp, bias=config.mlp_bias)
        self.gate = nn.Linear(config.d_model, d_mlp, bias=config.mlp_bias) if config.gated_mlp else None
        self.down = nn.Linear(d_mlp, config.d_model, bias=config.mlp_bias)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> gate, up (B, T, d_mlp) each, for the gated activations."""
        return self.gate(x), self.up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            gate, up = self.project_gate_up(x)  # (B, T, d_mlp) each
            hidden = self.activation(gate) * up  # (B, T, d_mlp)
        else:
            hidden = self.activation(self.up(x))  # (B, T, d_mlp)
        return self.down(hidden)  # (B, T, C)


# --------------------------------------------------------------------------- block


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attention_norm = make_norm(config)
        self.attention = Attention(config, layer_index)
        if config.cross_attention:  # encoder-decoder: the decoder's second sub-layer reads the source
            self.cross_attention_norm = make_norm(config)
            self.cross_attention = CrossAttention(config, layer_index)
        self.mlp_norm = make_norm(config)
        # a mixture of experts (scribelm.moe) replaces the one MLP when the config has experts
        self.mlp = MoE(config, lambda width: MLP(config, width)) if config.n_experts else MLP(config)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, is_causal, cache, memory: EncoderMemory | None = None):
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.attention_norm(x), rope, mask, is_causal, cache))
            if memory is not None:
                x = x + self.dropout(self.cross_attention(self.cross_attention_norm(x), memory))
            x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        else:
            x = self.attention_norm(x + self.dropout(self.attention(x, rope, mask, is_causal, cache)))
            x = self.mlp_norm(x + self.dropout(self.mlp(x)))
        return x

    def dropout(self, h: torch.Tensor) -> torch.Tensor:
        return self.residual_dropout(h) if self.training else h  # eval: not even a call


class MaskedLMTransform(nn.Module):
    """BERT's masked-LM head before the unembedding: dense -> activation -> norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = _ACTIVATIONS[config.activation]
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = make_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.activation(self.dense(x)))  # (B, T, C)


# --------------------------------------------------------------------------- transformer


class Transformer(nn.Module):
    """A transformer configured by a `ModelConfig`: decoder-only (causal) or encoder (bidirectional)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = (
            nn.Embedding(config.context_length, config.d_model) if config.position == "learned" else None
        )
        self.relative_position = RelativePositionBias(config) if config.position == "relative" else None
        # Encoders (BERT): segment embeddings and a norm on the summed embeddings.
        self.token_type_embedding = (
            nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        )
        self.embedding_norm = make_norm(config) if config.embedding_norm else None
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config) if config.norm_position == "pre" else None
        self.mlm_transform = MaskedLMTransform(config) if config.mlm_head else None
        self.unembedding = nn.Linear(config.d_model, config.vocab_size, bias=config.unembedding_bias)
        self.pooler = nn.Linear(config.d_model, config.d_model) if config.pooler else None  # see `pooled`
        if config.tie_embeddings:
            self.unembedding.weight = self.token_embedding.weight
        self._inv_freq: torch.Tensor | None = None  # RoPE frequencies, made on first use on the right device
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # -- init -----------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, unit norms; the projections that
        write into the residual stream scaled by 1/sqrt(2·n_layers) so its variance
        does not grow with depth."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1.0
                if name.endswith("attention.o") or name.endswith("mlp.down") or (".mlp." in name and name.endswith(".down")):
                    scale = 1.0 / math.sqrt(2 * self.config.n_layers)
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.config.tie_embeddings:  # the shared matrix got the unembedding's init last; use the embedding's
            nn.init.normal_(self.token_embedding.weight, mean=0.0, std=std)

    # -- helpers --------------------------------------------------------------
    def _positions(self, ids: torch.Tensor, start: int, padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, T = ids.shape
        if padding_mask is not None:
            # Left-padded rows count positions from their first real token, as if generated alone.
            positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
            return positions[:, -T:]
        return torch.arange(start, start + T, device=ids.device).expand(B, T)

    @staticmethod
    def _attention_mask(T: int, S: int, start: int, mask: torch.Tensor, device, causal_attention: bool = True) -> torch.Tensor:
        """Boolean (B, 1, T, S): True where query t may attend key s."""
        query_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        causal = key_pos <= query_pos if causal_attention else torch.ones(T, S, dtype=torch.bool, device=device)  # (T, S)
        if mask.dim() == 2:  # (B, S) padding mask: 1 real, 0 pad
            allowed = causal[None] & mask[:, None, :].bool()  # (B, T, S)
        else:  # (B, T, S) explicit mask, e.g. block-diagonal for packed examples
            allowed = causal[None] & mask.bool()
        # A query always sees itself, so fully padded rows stay finite (their output is ignored).
        allowed = allowed | (key_pos == query_pos)[None]
        return allowed[:, None]  # (B, 1, T, S)

    # -- forward --------------------------------------------------------------
    def hidden_states(
        self,
        ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        token_types: torch.Tensor | None = None,
        memory: EncoderMemory | None = None,
    ) -> torch.Tensor:
        """Final normalized hidden states (B, T, C), before the unembedding; (B, 1, C) with
        `last_only` (see `forward`).

        attention_mask: (B, S) with 1 for real tokens and 0 for padding (S counts
        cached positions plus the T new ones), or (B, T, S) booleans saying which
        keys each query may see (combined with the causal mask),
        or (B, 1, T, S) booleans used as they are (the caller owns causality).
        token_types: (B, T) segment ids for models with token-type embeddings (default all 0).
        memory: the encoder's output, for the cross-attention of an encoder-decoder's decoder.
        """
        B, T = ids.shape
        start, row_positions, row_mask = (0, None, None) if cache is None else cache.prepare(B, T)
        if start is None:
            # The cache says where each row's new tokens go and which keys they see (its rows
            # differ in length, or it is an export graph's past); it has checked the room.
            positions = row_positions if positions is None else positions
            if attention_mask is not None and attention_mask.dim() != 4:
                raise ScribeError("a cache whose rows differ in length takes no padding mask; give a (B, 1, T, S) mask")
            attention_mask = row_mask if attention_mask is None else attention_mask
        else:
            S = start + T
            if S > self.config.context_length:
                raise ContextOverflowError(
                    f"{S} tokens exceed the model's context of {self.config.context_length}; "
                    "shorten the input or ask for sliding-window truncation"
                )
            if positions is None:
                padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
                positions = self._positions(ids, start, padding)
        if positions.dim() == 1:
            positions = positions.expand(B, T)

        x = self.token_embedding(ids)  # (B, T, C)
        if self.config.position == "learned":
            x = x + self.position_embedding(positions)  # (B, T, C)
        elif self.config.position == "sinusoidal":
            x = x + sinusoidal_encoding(positions, self.config.d_model).to(x.dtype)
        if self.token_type_embedding is not None:
            token_types = torch.zeros_like(ids) if token_types is None else token_types
            x = x + self.token_type_embedding(token_types)  # (B, T, C)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        if self.training:
            x = self.embedding_dropout(x)

        rope = None
        if self.config.position == "rope":
            scaling = self.config.rope_scaling or {}
            if scaling.get("type") in ("dynamic", "longrope"):  # frequencies follow this pass's longest position
                inv_freq = rope_inverse_frequencies(self.config, ids.device, seq_len=int(positions.max()) + 1)
            else:
                if self._inv_freq is None or self._inv_freq.device != ids.device:
                    self._inv_freq = rope_inverse_frequencies(self.config, ids.device)
                inv_freq = self._inv_freq
            factor = yarn_attention_factor(scaling) if scaling.get("type") in ("yarn", "longrope") else 1.0
            rope = rope_cos_sin(inv_freq, positions, x.dtype, factor)

        # Cheapest correct mask: SDPA's built-in causal mask for a fresh full sequence,
        # no mask for one new token attending everything cached, explicit otherwise.
        mask, is_causal = None, False
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.bool()  # (B, 1, T, S) final: rows whose caches differ in length (serving slots)
        elif attention_mask is not None:
            mask = self._attention_mask(T, S, start, attention_mask, ids.device, self.config.causal)
        elif not self.config.causal:
            pass  # an encoder: every position sees every position, no mask at all
        elif start == 0 and T > 1:
            is_causal = True
        elif T > 1:
            mask = self._attention_mask(T, S, start, torch.ones(B, S, device=ids.device), ids.device)
        if self.relative_position is not None:  # T5: a learned bias per head and distance, added to the scores
            if start is None:
                raise ScribeError("relative position bias needs every cache row at the same length")
            if is_causal:
                mask = self._attention_mask(T, S, start, torch.ones(B, S, device=ids.device), ids.device)
            bias = self.relative_position(start, T, S, ids.device).to(x.dtype)  # (1, H, T, S)
            mask = bias if mask is None else torch.where(mask, bias, torch.finfo(x.dtype).min)  # (B, H, T, S)
            is_causal = False

        if self.config.sliding_window is not None:
            if isinstance(cache, RollingKVCache) and attention_mask is not None and attention_mask is not row_mask:
                raise ScribeError("a rolling cache takes no attention mask; its rows are all one length")
            mask, is_causal = self._sliding_window(mask, is_causal, T, start, row_positions, cache, ids.device)

        x = self.run_blocks(x, rope, mask, is_causal, cache, memory)  # (B, T, C)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = self._last_positions(x, attention_mask)  # (B, 1, C)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x  # (B, T, C)

    def run_blocks(self, x, rope, mask, is_causal, cache, memory=None) -> torch.Tensor:
        """x (B, T, C) through every block in turn."""
        for block in self.blocks:
            x = block(x, rope, mask, is_causal, cache, memory)
        return x

    def _sliding_window(self, mask, is_causal, T, start, row_positions, cache, device):
        """Narrow the mask to a sliding window: the query in slot q sees the keys in slots
        q-W+1..q only (slots, not position ids, as transformers counts them under left padding)."""
        W = self.config.sliding_window
        rolling = isinstance(cache, RollingKVCache)
        if start is None and rolling:
            return mask, False  # the rolling cache's mask already holds only the window's slots
        if start is None:  # rows differ: row b's queries sit in its slots row_positions[b]
            near = torch.arange(mask.shape[-1], device=device)[None, None, :] > row_positions[:, :, None] - W  # (B, T, S)
            return mask & near[:, None], False
        if rolling and not is_causal:
            mask = None  # the keys come in the cache's own order; the window below is the whole mask
        if mask is None and ((is_causal and T <= W) or (T == 1 and (rolling or start < W))):
            return mask, is_causal  # every key it would see is inside the window already
        query_slots = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        key_slots = (cache.key_positions(T, device) if rolling else torch.arange(start + T, device=device))[None, :]
        window = (key_slots <= query_slots) & (key_slots > query_slots - W)  # (T, S)
        return (window[None, None] if mask is None else mask & window), False  # (B or 1, 1, T, S)

    @staticmethod
    def _last_positions(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Each row's last position (B, 1, C); with a (B, S) padding mask, its last real one."""
        if attention_mask is None or attention_mask.dim() != 2:
            return x[:, -1:]
        T = x.shape[1]
        last = T - 1 - attention_mask[:, -T:].flip(-1).long().argmax(-1)  # (B,): a right-padded row ends early
        return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)][:, None]

    def forward(
        self,
        ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V); the one forward pass of training and inference.

        cache: keys and values of earlier positions (read) and of these (written); its rows
        may hold different lengths, each row then continues from its own.
        positions: (B, T) or (T,) position of each token, when not the natural ones.
        attention_mask: see `hidden_states`.
        last_only: logits of each row's last position only, (B, 1, V) (the last real one
        under a (B, S) padding mask): what generation needs, without unembedding the rest.
        token_types: (B, T) segment ids (encoders with token-type embeddings)."""
        x = self.hidden_states(ids, attention_mask=attention_mask, positions=positions, cache=cache, last_only=last_only,
                               token_types=token_types)
        if self.mlm_transform is not None:
            x = self.mlm_transform(x)  # (B, T, C)
        return self.unembedding(x)  # (B, T, V)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler output: tanh(dense(h at position 0)). hidden (B, T, C) -> (B, C)."""
        if self.pooler is None:
            raise ScribeError("this model has no pooler (config pooler=false)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def loss(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Next-token cross-entropy. targets (B, T) holds the id that should follow each
        position; positions whose target is `ignore_index` (prompt, padding) do not count."""
        logits = self(ids, attention_mask=attention_mask, positions=positions)  # (B, T, V)
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)),  # (B·T, V)
            targets.reshape(-1),  # (B·T,)
            ignore_index=ignore_index,
            reduction=reduction,
        )

    # -- facts ----------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for name, param in self.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if exclude_embeddings and name.startswith(("token_embedding", "position_embedding", "token_type_embedding")):
                continue
            total += param.numel()
        return total
