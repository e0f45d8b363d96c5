"""BERT in and out: `BertModel` (the bare encoder, as sentence-transformers ships it) and
`BertForMaskedLM` (the encoder with its masked-LM head).

BERT is scribelm's one `Transformer` with `causal=False`, post-norm blocks, token-type
embeddings and a LayerNorm on the summed embeddings:

    BERT                                                   scribelm
    embeddings.word_embeddings.weight                      token_embedding.weight
    embeddings.position_embeddings.weight                  position_embedding.weight
    embeddings.token_type_embeddings.weight                token_type_embedding.weight
    embeddings.LayerNorm.{weight,bias}                     embedding_norm.*
    encoder.layer.{i}.attention.self.{query,key,value}.*   blocks.{i}.attention.{q,k,v}.*
    encoder.layer.{i}.attention.output.dense.*             blocks.{i}.attention.o.*
    encoder.layer.{i}.attention.output.LayerNorm.*         blocks.{i}.attention_norm.*
    encoder.layer.{i}.intermediate.dense.*                 blocks.{i}.mlp.up.*
    encoder.layer.{i}.output.dense.*                       blocks.{i}.mlp.down.*
    encoder.layer.{i}.output.LayerNorm.*                   blocks.{i}.mlp_norm.*
    pooler.dense.*                                         pooler.*             (BertModel)
    cls.predictions.transform.dense.*                      mlm_transform.dense.* (BertForMaskedLM)
    cls.predictions.transform.LayerNorm.*                  mlm_transform.norm.*
    cls.predictions.decoder.weight                         unembedding.weight (absent when tied)
    cls.predictions.bias                                   unembedding.bias

A BertModel has no head: its unembedding is the tied token embedding, so the logits of an
imported BertModel are the hidden states scored against the vocabulary; what it is for is
`LM.embed`. In BertForMaskedLM the encoder's names carry the prefix "bert.".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scribelm.config import ModelConfig
from scribelm.errors import ConfigError
from scribelm.interop.hf.configs import _count, refuse
from scribelm.interop.hf.weights import WeightRule

if TYPE_CHECKING:
    from scribelm.interop.hf.families import Family

_ENCODER = (
    ("embeddings.word_embeddings.weight", "token_embedding.weight"),
    ("embeddings.position_embeddings.weight", "position_embedding.weight"),
    ("embeddings.token_type_embeddings.weight", "token_type_embedding.weight"),
    ("embeddings.LayerNorm.weight", "embedding_norm.weight"),
    ("embeddings.LayerNorm.bias", "embedding_norm.bias"),
    ("encoder.layer.{i}.attention.self.query.weight", "blocks.{i}.attention.q.weight"),
    ("encoder.layer.{i}.attention.self.query.bias", "blocks.{i}.attention.q.bias"),
    ("encoder.layer.{i}.attention.self.key.weight", "blocks.{i}.attention.k.weight"),
    ("encoder.layer.{i}.attention.self.key.bias", "blocks.{i}.attention.k.bias"),
    ("encoder.layer.{i}.attention.self.value.weight", "blocks.{i}.attention.v.weight"),
    ("encoder.layer.{i}.attention.self.value.bias", "blocks.{i}.attention.v.bias"),
    ("encoder.layer.{i}.attention.output.dense.weight", "blocks.{i}.attention.o.weight"),
    ("encoder.layer.{i}.attention.output.dense.bias", "blocks.{i}.attention.o.bias"),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "blocks.{i}.attention_norm.weight"),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "blocks.{i}.attention_norm.bias"),
    ("encoder.layer.{i}.intermediate.dense.weight", "blocks.{i}.mlp.up.weight"),
    ("encoder.layer.{i}.intermediate.dense.bias", "blocks.{i}.mlp.up.bias"),
    ("encoder.layer.{i}.output.dense.weight", "blocks.{i}.mlp.down.weight"),
    ("encoder.layer.{i}.output.dense.bias", "blocks.{i}.mlp.down.bias"),
    ("encoder.layer.{i}.output.LayerNorm.weight", "blocks.{i}.mlp_norm.weight"),
    ("encoder.layer.{i}.output.LayerNorm.bias", "blocks.{i}.mlp_norm.bias"),
    ("pooler.dense.weight", "pooler.weight"),
    ("pooler.dense.bias", "pooler.bias"),
)
_MLM_HEAD = (
    ("cls.predictions.transform.dense.weight", "mlm_transform.dense.weight"),
    ("cls.predictions.transform.dense.bias", "mlm_transform.dense.bias"),
    ("cls.predictions.transform.LayerNorm.weight", "mlm_transform.norm.weight"),
    ("cls.predictions.transform.LayerNorm.bias", "mlm_transform.norm.bias"),
    ("cls.predictions.decoder.weight", "unembedding.weight"),
    ("cls.predictions.bias", "unembedding.bias"),
)

BERT_MODEL_WEIGHTS = tuple(WeightRule(hf, (ours,)) for hf, ours in _ENCODER)
BERT_MLM_WEIGHTS = tuple(WeightRule("bert." + hf, (ours,)) for hf, ours in _ENCODER) + tuple(
    WeightRule(hf, (ours,)) for hf, ours in _MLM_HEAD
)
#: Tensors that carry no weights of their own: the position-id buffer, the decoder bias
#: (the same tensor as cls.predictions.bias) and the decoder weight when it is the tied embedding.
BERT_IGNORED = r"(bert\.)?embeddings\.(position_ids|token_type_ids)$|cls\.predictions\.decoder\.(bias|weight)$"

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}


def bert_from_hf(hf: dict[str, Any], masked_lm: bool) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        refuse(f"hidden_act={act!r}", f"supported for BERT: {', '.join(_ACTIVATIONS)}")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        refuse(f"position_embedding_type={kind!r}", "scribelm's BERT has absolute learned positions")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        refuse("is_decoder / add_cross_attention", "scribelm reads BERT as an encoder")
    return ModelConfig(
        vocab_size=_count(hf, "vocab_size", "BERT"),
        context_length=_count(hf, "max_position_embeddings", "BERT", 512),
        d_model=_count(hf, "hidden_size", "BERT"),
        n_layers=_count(hf, "num_hidden_layers", "BERT"),
        n_heads=_count(hf, "num_attention_heads", "BERT"),
        d_mlp=_count(hf, "intermediate_size", "BERT"),
        activation=_ACTIVATIONS[act],
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_position="post",
        position="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)) if masked_lm else True,
        init_std=float(hf.get("initializer_range", 0.02)),
        causal=False,
        type_vocab_size=_count(hf, "type_vocab_size", "BERT", 2),
        embedding_norm=True,
        mlm_head=masked_lm,
        unembedding_bias=masked_lm,
        pooler=not masked_lm,
        name="bert" if masked_lm else "bert-encoder",
    )


def _encoder_misfit(config: ModelConfig) -> list[str]:
    reasons = []
    if config.causal:
        reasons.append("bidirectional attention (has causal)")
    if config.norm_position != "post" or config.norm != "layernorm" or not config.norm_bias or not config.embedding_norm:
        reasons.append("post-norm LayerNorm blocks with a LayerNorm on the embeddings")
    if config.position != "learned":
        reasons.append(f"learned positions (has {config.position!r})")
    if config.activation not in ("gelu", "gelu_tanh", "relu", "silu"):
        reasons.append(f"an ungated MLP (has {config.activation!r})")
    if not (config.qkv_bias and config.attn_out_bias and config.mlp_bias):
        reasons.append("biases on every projection")
    if config.n_kv_heads != config.n_heads or config.head_dim * config.n_heads != config.d_model:
        reasons.append("plain multi-head attention with head_dim = d_model / n_heads")
    if config.type_vocab_size == 0:
        reasons.append("token-type embeddings")
    if config.n_experts or config.sliding_window is not None:
        reasons.append("dense MLPs and full attention (no experts, no sliding window)")
    return reasons


def bert_model_misfit(config: ModelConfig) -> list[str]:
    reasons = _encoder_misfit(config)
    if config.mlm_head or config.unembedding_bias or not config.tie_embeddings:
        reasons.append("no head of its own (BertModel is the bare encoder)")
    if not config.pooler:
        reasons.append("a pooler")
    return reasons


def bert_mlm_misfit(config: ModelConfig) -> list[str]:
    reasons = _encoder_misfit(config)
    if not (config.mlm_head and config.unembedding_bias):
        reasons.append("the masked-LM head (transform and decoder bias)")
    if config.pooler:
        reasons.append("no pooler")
    return reasons


def bert_to_hf(config: ModelConfig, family: "Family") -> dict[str, Any]:
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}.get(config.activation)
    if act is None:
        raise ConfigError(f"BERT has no activation {config.activation!r}")
    return {
        "architectures": [family.architecture],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_mlp,
        "hidden_act": act,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.context_length,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": config.tie_embeddings,
    }

