"""Running a GGUF file: llama.cpp's format read back into a scribelm model.

The inverse of `scribelm.interop.gguf` (the exporter), for the architectures it
writes — and for the same architectures written by llama.cpp's converters and
its quantizer:

    llama   RoPE + RMSNorm + SwiGLU, no biases (Llama, Mistral; with
            `ffn_*_exps` tensors: Mixtral's mixture of experts)
    qwen2   the same with q/k/v biases
    qwen2moe  Qwen2 with experts (top-k weights kept as routed) and a shared expert
              behind a sigmoid gate
    gpt2    learned positions, LayerNorm, tanh-GELU, biases; q/k/v in one tensor

Reading a file takes four steps:

1. The header (gguf_reader.py): metadata and tensor table, every length checked
   against the file, so a truncated or lying file is refused before a weight is read.
2. The config: ModelConfig from `{arch}.*` metadata (Llama 3.1's RoPE scaling from
   the `rope_freqs` divisors); every tensor a model of that config needs must be in
   the file with exactly its shape.
3. The weights: each tensor decoded to float32 by the `gguf` package's reference
   dequantizers (`gguf.quants.dequantize`). llama.cpp's `llama` graph rotates
   adjacent feature pairs, so the exporter interleaved the rows of W_q and W_k
   within each head; here they go back to scribelm's rotate-half order.
   Block matrices keep their size where scribelm has a layout for them:
       Q4_0, Q4_1  -> int4 in groups of 32, exactly: a Q4_1 block is w = d·q + m
                      with 4-bit q, which is scribelm's int4 group (scale d, min m);
                      a Q4_0 block is w = d·(q - 8), the same with min -8d
       Q8_0        -> int8 with one scale per row (the file has one per block of
                      32, so each weight is rounded once more)
   The other formats (Q5_0 ... Q6_K) load as float32 with exactly the file's values.
4. The tokenizer and chat template from `tokenizer.*` metadata (gguf_tokenizer.py).

    lm = scribelm.load("model.gguf")        # or a store name added with `scribe models add`
    describe_gguf("model.gguf")["weights"]  # "Q8_0 -> int8 per channel", "Q4_K/Q6_K -> float32 (dequantized)", ...
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scribelm.config import ModelConfig
from scribelm.errors import ConfigError
from scribelm.accel.formats import pack_int4, quantize_int8
from scribelm.interop.gguf_reader import GGUFError, GGUFFile, read_gguf
from scribelm.model import Transformer
from scribelm.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen2moe", "gpt2")
#: Weight types scribelm decodes; the rest (IQ*, Q2_K, Q3_K, TQ*, MXFP4, ...) are refused by name.
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
#: Block formats kept at their size in scribelm's own layouts: the set of types -> (bits, how it is shown)
KEPT_QUANTIZED = {"Q8_0": (8, "int8 per channel"), "Q4_0": (4, "int4, groups of 32"), "Q4_1": (4, "int4, groups of 32")}
INT4_GROUP = 32  # a Q4_0 / Q4_1 block


# --------------------------------------------------------------------------- config


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata and tensor table describe, or a GGUFError."""
    arch = f.string("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture {arch!r} is not supported (scribelm runs {', '.join(ARCHITECTURES)})")

    def need(key: str) -> int:
        value = f.integer(f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{f.path} lacks the metadata {arch}.{key}, which a {arch} model needs")
        return value

    if "token_embd.weight" not in f.tensors:
        raise GGUFError(f"{f.path} has no token_embd.weight tensor")
    vocab_size, d_model = f.tensors["token_embd.weight"].shape[0], need("embedding_length")
    n_heads = need("attention.head_count")
    common = dict(
        vocab_size=vocab_size, context_length=need("context_length"), d_model=d_model, n_layers=need("block_count"),
        n_heads=n_heads, tie_embeddings="output.weight" not in f.tensors, name=f.string("general.name") or arch,
    )
    experts = f.integer(f"{arch}.expert_count", 0)
    try:
        if arch == "gpt2":
            return ModelConfig(**common, d_mlp=need("feed_forward_length"), activation="gelu_tanh", norm="layernorm",
                               norm_eps=f.number("gpt2.attention.layer_norm_epsilon", 1e-5), position="learned")
        head_dim = f.integer(f"{arch}.attention.key_length", d_model // max(n_heads, 1))
        rotary = f.integer(f"{arch}.rope.dimension_count", head_dim)
        if rotary != head_dim:
            raise GGUFError(f"{f.path}: RoPE on {rotary} of {head_dim} features per head (partial rotary) is not supported")
        scaling = f.string(f"{arch}.rope.scaling.type", "none")
        rope_scaling = None
        if scaling == "linear":
            rope_scaling = {"type": "linear", "factor": f.number(f"{arch}.rope.scaling.factor", 1.0)}
        elif scaling != "none":
            raise GGUFError(f"{f.path}: RoPE scaling {scaling!r} is not supported")
        if "rope_freqs.weight" in f.tensors:
            if rope_scaling is not None or f.tensors["rope_freqs.weight"].shape != (head_dim // 2,):
                raise GGUFError(f"{f.path}: rope_freqs.weight does not fit a RoPE of {head_dim} features per head")
            rope_scaling = llama3_rope_scaling(f.float_tensor("rope_freqs.weight"), head_dim,
                                               f.number(f"{arch}.rope.freq_base", 10000.0))
            if rope_scaling is None:
                raise GGUFError(f"{f.path}: its per-frequency RoPE factors (rope_freqs.weight) are not Llama 3.1's "
                                "scaling, the only kind scribelm reads from them")
        if experts and arch == "qwen2":
            raise GGUFError(f"{f.path}: a mixture of experts in a qwen2 file is not supported (qwen2moe is)")
        d_mlp = need("feed_forward_length")
        moe = dict(n_experts=experts, experts_per_token=need("expert_used_count"), d_expert=d_mlp) if experts else {}
        if arch == "qwen2moe":  # llama.cpp's qwen2moe graph: top-k weights not renormalised, a gated shared expert
            if not experts:
                raise GGUFError(f"{f.path} lacks the metadata qwen2moe.expert_count, which a qwen2moe model needs")
            moe.update(d_expert=f.integer("qwen2moe.expert_feed_forward_length", d_mlp), normalize_top_k=False,
                       d_shared_expert=f.integer("qwen2moe.expert_shared_feed_forward_length", 0))
        return ModelConfig(
            **common, n_kv_heads=f.integer(f"{arch}.attention.head_count_kv", n_heads), head_dim=head_dim, d_mlp=d_mlp,
            activation="swiglu", norm="rmsnorm", norm_eps=f.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            position="rope", rope_theta=f.number(f"{arch}.rope.freq_base", 10000.0), rope_scaling=rope_scaling,
            qkv_bias=arch in ("qwen2", "qwen2moe"), attn_out_bias=False, mlp_bias=False, **moe,
        )
    except ConfigError as err:
        raise GGUFError(f"{f.path}: its metadata describes no valid model ({err})") from None


def llama3_rope_scaling(divisors: torch.Tensor, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Llama 3.1's RoPE scaling from the per-frequency divisors llama.cpp stores (rope_freqs.weight),
    or None when no such scaling gives them.

    The scaling keeps high frequencies, divides low ones by `factor`, and in between
    divides by 1 / ((1 - s)/factor + s) with s = (L/λ - low)/(high - low) for wavelength λ:
    s is linear in 1/λ, so two in-between frequencies fix L/(high - low) and low/(high - low).
    Any (low, high, L) with those two ratios gives the same frequencies; low = 1 (Llama 3's) is
    taken. The result is accepted only if it reproduces every divisor."""
    from scribelm.model import rope_inverse_frequencies

    d = divisors.double()
    factor = float(d.max())
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    between = (d > 1 + 1e-4) & (d < factor * (1 - 1e-4))
    if factor <= 1 + 1e-4 or int(between.sum()) < 2:
        return None
    s = (1 / d[between] - 1 / factor) / (1 - 1 / factor)
    u = inv_freq[between] / (2 * math.pi)  # 1/λ
    slope, intercept = np.polyfit(u.numpy(), s.numpy(), 1)  # s = (L/(high-low))·(1/λ) - low/(high-low)
    if not (slope > 0 and intercept < 0):
        return None
    high, context = 1 - 1 / intercept, -slope / intercept
    scaling = {"type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": 1.0,
               "high_freq_factor": float(f"{high:.6g}"), "original_context_length": round(context)}
    try:
        config = ModelConfig(d_model=head_dim, n_heads=1, rope_theta=theta, position="rope", rope_scaling=scaling)
    except ConfigError:
        return None
    base = rope_inverse_frequencies(config.replace(rope_scaling=None)).double()
    reproduced = base / rope_inverse_frequencies(config).double()
    return scaling if torch.allclose(reproduced, d, rtol=1e-4, atol=0) else None


# --------------------------------------------------------------------------- tensor names


def unpermute_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `gguf.permute_for_interleaved_rope`: rows of each head from adjacent
    pairs (2i, 2i+1) back to the rotate-half order (i, i + hd/2)."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _weight_map(config: ModelConfig, arch: str) -> dict[str, list[str]]:
    """GGUF tensor name -> the model's parameter name(s) it fills (gpt2's attn_qkv fills three)."""
    names = {"token_embd.weight": ["token_embedding.weight"], "output_norm.weight": ["final_norm.weight"]}
    if not config.tie_embeddings:
        names["output.weight"] = ["unembedding.weight"]
    if arch == "gpt2":
        names["position_embd.weight"] = ["position_embedding.weight"]
        names["output_norm.bias"] = ["final_norm.bias"]
    for i in range(config.n_layers):
        p, b = f"blk.{i}", f"blocks.{i}"
        names[f"{p}.attn_norm.weight"] = [f"{b}.attention_norm.weight"]
        names[f"{p}.ffn_norm.weight"] = [f"{b}.mlp_norm.weight"]
        names[f"{p}.attn_output.weight"] = [f"{b}.attention.o.weight"]
        if arch == "gpt2":
            names[f"{p}.attn_norm.bias"] = [f"{b}.attention_norm.bias"]
            names[f"{p}.ffn_norm.bias"] = [f"{b}.mlp_norm.bias"]
            names[f"{p}.attn_output.bias"] = [f"{b}.attention.o.bias"]
            for kind in ("weight", "bias"):
                names[f"{p}.attn_qkv.{kind}"] = [f"{b}.attention.{x}.{kind}" for x in "qkv"]
                names[f"{p}.ffn_up.{kind}"] = [f"{b}.mlp.up.{kind}"]
                names[f"{p}.ffn_down.{kind}"] = [f"{b}.mlp.down.{kind}"]
            continue
        for x in "qkv":
            names[f"{p}.attn_{x}.weight"] = [f"{b}.attention.{x}.weight"]
            if arch in ("qwen2", "qwen2moe"):
                names[f"{p}.attn_{x}.bias"] = [f"{b}.attention.{x}.bias"]
        if config.n_experts:
            names[f"{p}.ffn_gate_inp.weight"] = [f"{b}.mlp.router.weight"]
            for kind in ("gate", "up", "down"):
                names[f"{p}.ffn_{kind}_exps.weight"] = [f"{b}.mlp.experts.{e}.{kind}.weight" for e in range(config.n_experts)]
                if config.d_shared_expert:
                    names[f"{p}.ffn_{kind}_shexp.weight"] = [f"{b}.mlp.shared_expert.{kind}.weight"]
            if config.d_shared_expert:  # the shared expert's gate: one row, stored as a vector (C,)
                names[f"{p}.ffn_gate_inp_shexp.weight"] = [f"{b}.mlp.shared_expert_gate.weight"]
        else:
            for kind in ("gate", "up", "down"):
                names[f"{p}.ffn_{kind}.weight"] = [f"{b}.mlp.{kind}.weight"]
    return names


def _file_shape(gguf_name: str, ours: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the GGUF tensor must have to fill `ours`."""
    first = shapes[ours[0]]
    if gguf_name.endswith("ffn_gate_inp_shexp.weight"):  # (1, C) stored as (C,)
        return first[1:]
    if "_exps." in gguf_name:  # experts stacked: (E, out, in)
        return (len(ours), *first)
    if len(ours) > 1:  # gpt2's q, k, v rows one after another
        return (sum(shapes[o][0] for o in ours), *first[1:])
    return first


# --------------------------------------------------------------------------- loading


def check_types(f: GGUFFile) -> None:
    """Refuse a file holding a weight type scribelm does not decode, naming the type."""
    for info in f.tensors.values():
        if info.type.name not in TYPES:
            raise GGUFError(f"{f.path}: tensor {info.name} is {info.type.name}, a type scribelm does not load "
                            f"(supported: {', '.join(TYPES)})")


def matrix_types(f: GGUFFile) -> Counter:
    """How many of the block matrices (attention and MLP weights, not an experts' router)
    are stored in each type."""
    return Counter(info.type.name for name, info in f.tensors.items()
                   if name.startswith("blk.") and name.endswith(".weight") and len(info.shape) >= 2
                   and "ffn_gate_inp" not in name)


def kept_quantization(f: GGUFFile) -> str | None:
    """How the block matrices keep their bits in scribelm's layout ("Q8_0", "Q4_0", "Q4_0/Q4_1"),
    or None when they load as float: all of them must fit one of its layouts."""
    types = set(matrix_types(f))
    for layout in ({"Q8_0"}, {"Q4_0", "Q4_1"}):
        if types and types <= layout:
            return "/".join(sorted(types))
    return None


def int4_groups(f: GGUFFile, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 or Q4_1 tensor (..., K) as scribelm's int4 parts, value for value:
    codes uint8 (..., K) in 0..15, scales and mins float16 (..., K/32)."""
    info = f.tensors[name]
    blocks = f.tensor_bytes(name).reshape(-1, 20 if info.type.name == "Q4_1" else 18)  # (n_blocks, bytes)
    scales = blocks[:, 0:2].copy().view(np.float16)[:, 0]  # d
    if info.type.name == "Q4_1":  # d, m, 16 bytes of nibbles: w = d·q + m
        mins, nibbles = blocks[:, 2:4].copy().view(np.float16)[:, 0], blocks[:, 4:]
    else:  # d, 16 bytes of nibbles: w = d·(q - 8) = d·q + (-8d), exact in float16
        mins, nibbles = scales * np.float16(-8), blocks[:, 2:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # values 0..15 of a block, then 16..31
    groups = (*info.shape[:-1], info.shape[-1] // INT4_GROUP)
    return (torch.from_numpy(codes.reshape(info.shape)), torch.from_numpy(scales.reshape(groups).copy()),
            torch.from_numpy(mins.reshape(groups).copy()))


def load_gguf_parts(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None, dict[str, Any]]:
    """The model, tokenizer and generation settings of a GGUF file; `scribelm.load` makes them an `LM`."""
    from scribelm.interop.gguf_tokenizer import tokenizer_from_gguf

    f = read_gguf(path)
    config = config_from_gguf(f)
    check_types(f)
    arch = f.string("general.architecture")
    names = _weight_map(config, arch)
    with torch.device("meta"):  # no memory: the tensors are assigned below
        model = Transformer(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [n for n in names if n not in f.tensors]
    if missing:
        raise GGUFError(f"{f.path} lacks tensor(s) a {arch} model of its metadata needs: {', '.join(missing[:4])}")
    unexpected = sorted(set(f.tensors) - set(names) - {"rope_freqs.weight"})  # rope_freqs: read into the config
    if unexpected:
        raise GGUFError(f"{f.path} holds tensor(s) a plain {arch} model does not have: {', '.join(unexpected[:4])}")
    for gguf_name, ours in names.items():
        want, got = _file_shape(gguf_name, ours, shapes), f.tensors[gguf_name].shape
        if got != want:
            raise GGUFError(f"{f.path}: tensor {gguf_name} has shape {list(got)} but the metadata implies {list(want)}")
    tokenizer = tokenizer_from_gguf(f)  # before the weights: a mistake in it is reported first
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise GGUFError(f"{f.path}: the tokenizer has {tokenizer.vocab_size} tokens but token_embd.weight only "
                        f"{config.vocab_size} rows")

    def rows(gguf_name: str, ours: list[str], tensor: torch.Tensor) -> list[torch.Tensor]:
        """The file's tensor (or its int4 codes, scales, mins: all row-aligned) as our parameters' rows."""
        if arch == "llama" and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = config.n_heads if ".attn_q." in gguf_name else config.n_kv_heads
            tensor = unpermute_interleaved_rope(tensor, heads)
        if gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            return [tensor.reshape(shapes[ours[0]])]
        if "_exps." in gguf_name:
            return list(tensor.unbind(0))
        if len(ours) > 1:
            return list(tensor.split([shapes[o][0] for o in ours], dim=0))
        return [tensor]

    kept = kept_quantization(f)
    bits = KEPT_QUANTIZED[kept.split("/")[0]][0] if kept else None
    state: dict[str, torch.Tensor] = {}
    for gguf_name, ours in names.items():
        info = f.tensors[gguf_name]
        # Block matrices (and a router) of the kept format go straight to scribelm's layout, one
        # tensor at a time: loading never holds more than one float copy of a matrix.
        if bits and gguf_name.startswith("blk.") and len(info.shape) >= 2 and \
                KEPT_QUANTIZED.get(info.type.name, (None,))[0] == bits:
            prefixes = [name.removesuffix(".weight") for name in ours]
            if bits == 4:
                codes, scales, mins = (rows(gguf_name, ours, part) for part in int4_groups(f, gguf_name))
                for prefix, q, scale, low in zip(prefixes, codes, scales, mins):
                    state[f"{prefix}.qweight"] = pack_int4(q)
                    state[f"{prefix}.scales"], state[f"{prefix}.mins"] = scale.contiguous(), low.contiguous()
            else:
                for prefix, part in zip(prefixes, rows(gguf_name, ours, f.float_tensor(gguf_name))):
                    state[f"{prefix}.qweight"], state[f"{prefix}.scales"] = quantize_int8(part.contiguous())
            continue
        for name, part in zip(ours, rows(gguf_name, ours, f.float_tensor(gguf_name))):
            state[name] = part.contiguous() if dtype is None else part.to(dtype).contiguous()
    if bits:
        from scribelm.quant import prepare_quantized_skeleton, scheme_record

        prepare_quantized_skeleton(model, scheme_record(bits, INT4_GROUP if bits == 4 else None), set(state))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.unembedding.weight = model.token_embedding.weight
    unfilled = [n for n, t in model.state_dict().items() if t.is_meta]
    if unfilled:  # the checks above make this unreachable; never hand out a model with holes
        raise GGUFError(f"{f.path}: no weights for {', '.join(unfilled[:4])}")
    model = model.to(device)
    model.eval()
    generation: dict[str, Any] = {}
    stops = [i for i in (f.integer("tokenizer.ggml.eos_token_id"), f.integer("tokenizer.ggml.eot_token_id"))
             if i is not None and 0 <= i < config.vocab_size]
    if stops:
        generation["stop_token_ids"] = sorted(set(stops))
    if tokenizer is not None and tokenizer.bos_id is not None:
        # llama.cpp puts BOS in front of prompts as the file says; unsaid, for SentencePiece-style vocabularies
        add_bos = f.metadata.get("tokenizer.ggml.add_bos_token")
        generation["add_bos_token"] = add_bos if isinstance(add_bos, bool) else f.string("tokenizer.ggml.model") == "llama"
    return model, tokenizer, generation


# --------------------------------------------------------------------------- description


def describe_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """What `scribe models show` tells about a GGUF file, from its header alone (no weights read):
    architecture, config, parameter count, the weight types and what they load as."""
    f = read_gguf(path)
    config = config_from_gguf(f)
    check_types(f)
    parameters = sum(int(torch.Size(info.shape).numel()) for info in f.tensors.values())
    types = matrix_types(f)
    stored = ", ".join(f"{name} ×{count}" for name, count in types.most_common())
    kept = kept_quantization(f)
    if kept:
        loads_as = f"{kept} -> {KEPT_QUANTIZED[kept.split('/')[0]][1]}"
    elif set(types) <= {"F32", "F16", "BF16"}:
        loads_as = f"{'/'.join(sorted(types))} -> float32"
    else:
        loads_as = f"{'/'.join(sorted(types))} -> float32 (dequantized)"
    return {
        "architecture": f.string("general.architecture"),
        "config": config.to_dict(),
        "parameters": parameters,
        "weights_stored": stored,
        "weights": loads_as,
        "chat_template": f.string("tokenizer.chat_template"),
        "tokenizer": f.string("tokenizer.ggml.model"),
        "path": Path(path),
    }
