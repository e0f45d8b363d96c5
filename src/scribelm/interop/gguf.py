"""GGUF export: hand a scribelm model to llama.cpp (and Ollama, LM Studio, ...).

A GGUF file is one self-describing blob: key/value metadata (architecture,
sizes, tokenizer) followed by named tensors. llama.cpp has hand-written
compute graphs per architecture, so a model exports only if it *is* one of
them; we map onto four:

    llama     RoPE + RMSNorm + SwiGLU, pre-norm, no biases (native presets such as
              `tiny`, imported Llama / Mistral; with experts: Mixtral)
    qwen2     the same with biases on q, k, v (imported Qwen2)
    qwen2moe  Qwen2 with a mixture of experts (top-k weights not renormalised) plus a
              shared expert gated by sigmoid(x · w_s) (imported Qwen2-MoE)
    gpt2      learned positions + LayerNorm + tanh-GELU MLP, biases (GPT-2)

Three details decide whether llama.cpp computes what we compute:

* RoPE layout. We (like Hugging Face) rotate feature i with feature i + hd/2
  ("rotate half"). llama.cpp's `llama` graph rotates adjacent pairs (2i, 2i+1),
  so the rows of W_q and W_k are permuted within each head to interleave the
  two halves; q·k products are unchanged. `qwen2` uses the rotate-half
  ("NEOX") layout itself, so its weights go in unpermuted.
* The tokenizer travels inside the file: every token string, token types
  (special tokens are "control"), bos/eos/pad ids, the chat template, and
  either the BPE merges with the name llama.cpp knows for the pre-tokenizer
  regex (byte-level BPE: scribelm, GPT-2, Llama 3, Qwen2) or token scores for
  llama.cpp's SentencePiece tokenizer (Llama 2 / Mistral style BPE with byte
  fallback).
* Tensor types: f32, f16, or q8_0 (blocks of 32 int8 with one f16 scale) for
  the matrices; norms and biases always stay f32, as llama.cpp expects.

A weight-only quantized scribelm model is dequantized and re-encoded in the
requested GGUF type.

    from scribelm.interop.gguf import export_gguf
    export_gguf(lm, "model.gguf", type="q8_0")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scribelm.errors import ScribeError
from scribelm.io import published_file_mode, temporary_sibling

TYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32

# Pre-tokenizer regexes of known tokenizers -> llama.cpp's name for them.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_NAMES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


class GGUFExportError(ScribeError):
    """A model or tokenizer that GGUF / llama.cpp cannot express."""


# --------------------------------------------------------------------------- architecture


def gguf_architecture(config) -> str:
    """The llama.cpp architecture that computes exactly what `config` describes, or a clear error."""
    c = config
    problems: list[str] = []
    if (c.rope_scaling or {}).get("type") in ("yarn", "dynamic", "longrope"):
        problems.append(f"{c.rope_scaling['type']} RoPE scaling")
    if c.sliding_window is not None and c.sliding_window < c.context_length:
        problems.append("sliding-window attention")
    mixtral = not c.d_shared_expert and c.normalize_top_k and not c.qkv_bias
    qwen2moe = bool(c.d_shared_expert) and not c.normalize_top_k  # llama.cpp's qwen2moe never renormalises
    if c.n_experts and not (mixtral or qwen2moe):
        problems.append("a mixture of experts other than Mixtral's (renormalised top-k, no shared expert, no biases) "
                        "or Qwen2-MoE's (a gated shared expert, top-k weights not renormalised)")
    if c.n_experts and qwen2moe and c.rope_scaling is not None:
        problems.append("RoPE scaling in a Qwen2-MoE-style model")
    if c.norm_position != "pre":
        problems.append("post-norm blocks")
    if c.position == "rope":
        if c.norm != "rmsnorm":
            problems.append(f"RoPE with {c.norm} (llama.cpp's RoPE architectures use RMSNorm)")
        if c.activation != "swiglu":
            problems.append(f"RoPE with a {c.activation} MLP (llama.cpp's RoPE architectures use SwiGLU)")
        if c.attn_out_bias or c.mlp_bias:
            problems.append("biases on the attention output or MLP")
        if c.qkv_bias and c.rope_scaling is not None:
            problems.append("RoPE scaling together with q/k/v biases")
        if not problems and c.n_experts and qwen2moe:
            return "qwen2moe"
        if not problems:
            return "qwen2" if c.qkv_bias else "llama"
    elif c.position == "learned":
        if c.norm != "layernorm":
            problems.append(f"learned positions with {c.norm} (GPT-2 uses LayerNorm)")
        if c.activation != "gelu_tanh":
            problems.append(
                f"a {c.activation} MLP (llama.cpp's GPT-2 graph uses the tanh approximation of GELU: gelu_tanh)"
            )
        if c.n_kv_heads != c.n_heads:
            problems.append("grouped-query attention with learned positions")
        if c.head_dim * c.n_heads != c.d_model:
            problems.append("head_dim × n_heads different from d_model")
        if not problems:
            return "gpt2"
    else:
        problems.append(f"{c.position} positions (llama.cpp supports RoPE or GPT-2's learned positions)")
    raise GGUFExportError(
        "GGUF export supports Llama-style (rope, rmsnorm, swiglu, pre-norm, no output/MLP biases), "
        f"Qwen2-style (the same with q/k/v biases, or Qwen2-MoE's experts) and GPT-2-style models; "
        f"this model has {'; '.join(problems)}"
    )


def permute_for_interleaved_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (n_heads·hd, ...) or bias (n_heads·hd,) from the
    rotate-half layout (i pairs with i + hd/2) to adjacent pairs (2i pairs with 2i+1)."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- tensors


def _float_weight(module) -> torch.Tensor:
    """The floating-point weight of a linear layer (dequantized if it is quantized)."""
    from scribelm.accel.quantized import QuantizedLinear

    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight(torch.float32)
    return module.weight.detach().float()


def _named_tensors(model, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(gguf name, float32 tensor) for every tensor llama.cpp reads, in its layout."""
    c = model.config
    out: list[tuple[str, torch.Tensor]] = [("token_embd.weight", model.token_embedding.weight.detach().float())]
    if arch == "gpt2":
        out.append(("position_embd.weight", model.position_embedding.weight.detach().float()))

    def norm(prefix: str, module) -> None:
        out.append((f"{prefix}.weight", module.weight.detach().float()))
        if arch == "gpt2":
            bias = module.bias if getattr(module, "bias", None) is not None else torch.zeros_like(module.weight)
            out.append((f"{prefix}.bias", bias.detach().float()))

    def bias_of(module, size: int) -> torch.Tensor:
        return module.bias.detach().float() if module.bias is not None else torch.zeros(size)

    for i, block in enumerate(model.blocks):
        p = f"blk.{i}"
        a, m = block.attention, block.mlp
        norm(f"{p}.attn_norm", block.attention_norm)
        wq, wk, wv = _float_weight(a.q), _float_weight(a.k), _float_weight(a.v)
        if arch == "gpt2":
            out.append((f"{p}.attn_qkv.weight", torch.cat((wq, wk, wv), dim=0)))
            out.append((f"{p}.attn_qkv.bias", torch.cat((bias_of(a.q, c.q_dim), bias_of(a.k, c.kv_dim), bias_of(a.v, c.kv_dim)))))
            out.append((f"{p}.attn_output.weight", _float_weight(a.o)))
            out.append((f"{p}.attn_output.bias", bias_of(a.o, c.d_model)))
        else:
            if arch == "llama":
                wq, wk = permute_for_interleaved_rope(wq, c.n_heads), permute_for_interleaved_rope(wk, c.n_kv_heads)
            out += [(f"{p}.attn_q.weight", wq), (f"{p}.attn_k.weight", wk), (f"{p}.attn_v.weight", wv)]
            if arch in ("qwen2", "qwen2moe"):  # qwen2moe requires them: zeros where the model has none
                out += [(f"{p}.attn_q.bias", bias_of(a.q, c.q_dim)), (f"{p}.attn_k.bias", bias_of(a.k, c.kv_dim)),
                        (f"{p}.attn_v.bias", bias_of(a.v, c.kv_dim))]
            out.append((f"{p}.attn_output.weight", _float_weight(a.o)))
        norm(f"{p}.ffn_norm", block.mlp_norm)
        if c.n_experts:  # the router, then each projection of all experts stacked (E, out, in)
            out.append((f"{p}.ffn_gate_inp.weight", _float_weight(m.router)))
            for kind in ("gate", "up", "down"):
                stacked = torch.stack([_float_weight(getattr(expert, kind)) for expert in m.experts])
                out.append((f"{p}.ffn_{kind}_exps.weight", stacked))
            if m.shared_expert is not None:  # qwen2moe: the shared expert and its gate's one row (C,)
                out.append((f"{p}.ffn_gate_inp_shexp.weight", _float_weight(m.shared_expert_gate)[0]))
                for kind in ("gate", "up", "down"):
                    out.append((f"{p}.ffn_{kind}_shexp.weight", _float_weight(getattr(m.shared_expert, kind))))
            continue
        if m.gate is not None:
            out.append((f"{p}.ffn_gate.weight", _float_weight(m.gate)))
        out.append((f"{p}.ffn_up.weight", _float_weight(m.up)))
        out.append((f"{p}.ffn_down.weight", _float_weight(m.down)))
        if arch == "gpt2":
            out.append((f"{p}.ffn_up.bias", bias_of(m.up, c.d_mlp)))
            out.append((f"{p}.ffn_down.bias", bias_of(m.down, c.d_model)))
    norm("output_norm", model.final_norm)
    if not c.tie_embeddings or arch == "qwen2moe":  # tied: llama.cpp reuses token_embd (qwen2moe needs its own)
        out.append(("output.weight", _float_weight(model.unembedding)))
    if arch == "llama" and c.rope_scaling is not None:
        # Llama 3.1 scaling as llama.cpp applies it: each frequency divided by its factor.
        from scribelm.model import rope_inverse_frequencies

        base = rope_inverse_frequencies(c.replace(rope_scaling=None))
        out.append(("rope_freqs.weight", (base / rope_inverse_frequencies(c)).float()))
    return out


def _encode(name: str, tensor: torch.Tensor, type: str, gguf) -> tuple[np.ndarray, Any]:
    data = tensor.contiguous().numpy().astype(np.float32)
    if tensor.dim() == 1 or name == "rope_freqs.weight":
        return data, gguf.GGMLQuantizationType.F32  # norms and biases stay f32
    if type == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    if type == "q8_0":
        if data.shape[-1] % Q8_BLOCK != 0:
            raise GGUFExportError(
                f"tensor {name} has rows of {data.shape[-1]} values, which q8_0 blocks of {Q8_BLOCK} do not divide; "
                "export with --type f16 or f32"
            )
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data, gguf.GGMLQuantizationType.F32


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (the regex that splits text before BPE)."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # GPT-2's regex, as ours
    if pre.get("type") == "Sequence":
        for step in pre.get("pretokenizers", []):
            pattern = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
            if pattern in PRE_TOKENIZER_NAMES:
                return PRE_TOKENIZER_NAMES[pattern]
    raise GGUFExportError(
        "the tokenizer's pre-tokenizer is not one llama.cpp knows (supported: GPT-2's byte-level split, "
        "Llama 3's and Qwen2's regex); its splits would differ, so the file would tokenize differently"
    )


def _sentencepiece_style(spec: dict[str, Any]) -> bool:
    """True for a Llama 2 / Mistral tokenizer: BPE over "▁"-joined text with byte fallback,
    which llama.cpp runs as its SentencePiece ("llama") tokenizer."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    prepends = any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in steps)
    replaces = any(n.get("type") == "Replace" and n.get("content") == "▁" for n in steps)
    metaspace = pre.get("type") == "Metaspace" and pre.get("prepend_scheme") in ("first", "always") and not pre.get("split", False)
    return (prepends and replaces and not pre) or (metaspace and not normalizer)


def _write_tokenizer(writer, tokenizer, vocab_size: int, gguf) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model_spec = spec.get("model") or {}
    sentencepiece = _sentencepiece_style(spec)
    if model_spec.get("type") != "BPE" or (model_spec.get("byte_fallback") and not sentencepiece):
        raise GGUFExportError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama 3 / Qwen2 / scribelm) and "
            "SentencePiece-style BPE (Llama 2 / Mistral); this tokenizer is neither"
        )
    pre = None if sentencepiece else _pre_tokenizer_name(spec)
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise GGUFExportError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    added = tokenizer.backend.get_added_tokens_decoder()  # id -> AddedToken
    unk = model_spec.get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        piece = tokenizer.backend.id_to_token(i) if i < n else None
        if piece is None:  # embedding rows the tokenizer never produces
            tokens.append(f"<|unused_{i}|>")
            types.append(gguf.TokenType.UNUSED)
        elif sentencepiece and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            tokens.append(piece)
            types.append(gguf.TokenType.BYTE)
        elif sentencepiece and piece == unk:
            tokens.append(piece)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            tokens.append(piece)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest;
        # BPE vocabularies list merge results in merge order, so -id ranks them the same way.
        scores.append(-float(i))
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(True)
        if unk is not None and tokenizer.backend.token_to_id(unk) is not None:
            writer.add_unk_token_id(tokenizer.backend.token_to_id(unk))
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_id, writer.add_bos_token_id), (tokenizer.eos_id, writer.add_eos_token_id),
                          (tokenizer.pad_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # scribelm models see no BOS unless the prompt has one
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# --------------------------------------------------------------------------- export


def export_gguf(lm, out_path: str | os.PathLike, type: str = "f32") -> Path:
    """Write `lm` (model + tokenizer) as a GGUF file for llama.cpp; returns the path.

    type: "f32", "f16" or "q8_0" for the weight matrices (norms and biases stay f32).
    The file is written to a temporary name and renamed into place when complete."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install 'scribelm[gguf]'") from None
    if type not in TYPES:
        raise GGUFExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    if lm.tokenizer is None:
        raise GGUFExportError("GGUF files carry the tokenizer, and this model has none; save one with the model first")
    model, c = lm.model, lm.config
    arch = gguf_architecture(c)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = str(temporary_sibling(out_path))  # a name the next export removes if this one is killed
    try:
        writer = gguf.GGUFWriter(tmp_name, arch)
        writer.add_name(c.name)
        writer.add_context_length(c.context_length)
        writer.add_embedding_length(c.d_model)
        writer.add_block_count(c.n_layers)
        writer.add_feed_forward_length(c.d_expert if c.n_experts else c.d_mlp)
        if c.n_experts:
            writer.add_expert_count(c.n_experts)
            writer.add_expert_used_count(c.experts_per_token)
        if arch == "qwen2moe":
            writer.add_expert_feed_forward_length(c.d_expert)
            writer.add_expert_shared_feed_forward_length(c.d_shared_expert)
        writer.add_head_count(c.n_heads)
        writer.add_vocab_size(c.vocab_size)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]
        writer.add_file_type(file_type)
        if type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if arch == "gpt2":
            writer.add_layer_norm_eps(c.norm_eps)
        else:
            writer.add_head_count_kv(c.n_kv_heads)
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_rope_dimension_count(c.head_dim)
            if c.head_dim * c.n_heads != c.d_model:
                writer.add_key_length(c.head_dim)
                writer.add_value_length(c.head_dim)
        _write_tokenizer(writer, lm.tokenizer, c.vocab_size, gguf)
        with torch.no_grad():
            for name, tensor in _named_tensors(model, arch):
                data, dtype = _encode(name, tensor, type, gguf)
                writer.add_tensor(name, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp_name, published_file_mode())  # as the user's umask asks, whatever the writer chose
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path
