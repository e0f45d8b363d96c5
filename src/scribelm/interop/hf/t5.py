"""T5 in and out: `T5ForConditionalGeneration`, v1.0 (ReLU feed-forward, tied head) and
v1.1 / Flan (gated-GELU feed-forward, untied head).

T5 is scribelm's `EncoderDecoder` (scribelm.seq2seq) with RMSNorm pre-norm blocks, no
biases, unscaled attention scores (T5 folds the 1/sqrt(d) into its initialization) and
the relative position bias of `scribelm.relative_position`:

    T5                                                        scribelm
    shared.weight                                             shared.weight
    {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                              {stack}.relative_position.bias.weight
    {stack}.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight  {stack}.blocks.{i}.attention.{q,k,v,o}.weight
    {stack}.block.{i}.layer.0.layer_norm.weight               {stack}.blocks.{i}.attention_norm.weight
    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight decoder.blocks.{i}.cross_attention.*.weight
    decoder.block.{i}.layer.1.layer_norm.weight               decoder.blocks.{i}.cross_attention_norm.weight
    {stack}.block.{i}.layer.{-1}.DenseReluDense.wi.weight     {stack}.blocks.{i}.mlp.up.weight     (v1.0)
    {stack}.block.{i}.layer.{-1}.DenseReluDense.wi_0.weight   {stack}.blocks.{i}.mlp.gate.weight   (v1.1)
    {stack}.block.{i}.layer.{-1}.DenseReluDense.wi_1.weight   {stack}.blocks.{i}.mlp.up.weight     (v1.1)
    {stack}.block.{i}.layer.{-1}.DenseReluDense.wo.weight     {stack}.blocks.{i}.mlp.down.weight
    {stack}.block.{i}.layer.{-1}.layer_norm.weight            {stack}.blocks.{i}.mlp_norm.weight
    {stack}.final_layer_norm.weight                           {stack}.final_norm.weight
    lm_head.weight                                            decoder.unembedding.weight (absent when tied)

where {stack} is encoder or decoder and layer {-1} is 1 in the encoder, 2 in the decoder.
Variants with another attention scheme (UMT5's per-layer bias, LongT5) are other
architectures and are refused by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scribelm.config import ModelConfig
from scribelm.interop.hf.configs import _count, refuse
from scribelm.interop.hf.weights import WeightRule

if TYPE_CHECKING:
    from scribelm.interop.hf.families import Family


def _stack(stack: str, ff_layer: int) -> list[tuple[str, str] | tuple[str, str, str]]:
    hf, ours = f"{stack}.block.{{i}}.layer", f"{stack}.blocks.{{i}}"
    pairs = [
        (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.relative_position.bias.weight"),
        (f"{stack}.final_layer_norm.weight", f"{stack}.final_norm.weight"),
        (f"{hf}.0.layer_norm.weight", f"{ours}.attention_norm.weight"),
        (f"{hf}.{ff_layer}.layer_norm.weight", f"{ours}.mlp_norm.weight"),
        (f"{hf}.{ff_layer}.DenseReluDense.wi.weight", f"{ours}.mlp.up.weight", "!gated_mlp"),
        (f"{hf}.{ff_layer}.DenseReluDense.wi_0.weight", f"{ours}.mlp.gate.weight"),
        (f"{hf}.{ff_layer}.DenseReluDense.wi_1.weight", f"{ours}.mlp.up.weight", "gated_mlp"),
        (f"{hf}.{ff_layer}.DenseReluDense.wo.weight", f"{ours}.mlp.down.weight"),
    ]
    pairs += [(f"{hf}.0.SelfAttention.{p}.weight", f"{ours}.attention.{p}.weight") for p in "qkvo"]
    if stack == "decoder":
        pairs.append((f"{hf}.1.layer_norm.weight", f"{ours}.cross_attention_norm.weight"))
        pairs += [(f"{hf}.1.EncDecAttention.{p}.weight", f"{ours}.cross_attention.{p}.weight") for p in "qkvo"]
    return pairs


_GATED = {"gated-gelu": "geglu", "gated-silu": "swiglu"}

T5_WEIGHTS = tuple(
    WeightRule(pair[0], (pair[1],), when=pair[2] if len(pair) > 2 else "")
    for pair in [("shared.weight", "shared.weight"), ("lm_head.weight", "decoder.unembedding.weight")]
    + _stack("encoder", 1) + _stack("decoder", 2)
)
#: The stacks' own embed_tokens are the shared embedding under other names.
T5_IGNORED = r"(encoder|decoder)\.embed_tokens\.weight$"


def _feed_forward(hf: dict[str, Any]) -> str:
    kind = hf.get("feed_forward_proj", "relu")
    if kind == "relu":
        return "relu"
    if kind in _GATED:
        return _GATED[kind]
    refuse(f"feed_forward_proj={kind!r}", "supported for T5: relu (v1.0), gated-gelu (v1.1, Flan), gated-silu")
    raise AssertionError  # unreachable


def t5_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("is_encoder_decoder") is False:
        refuse("is_encoder_decoder=false", "scribelm reads T5 as an encoder-decoder")
    encoder_layers = _count(hf, "num_layers", "T5")
    return ModelConfig(
        vocab_size=_count(hf, "vocab_size", "T5"),
        context_length=_count(hf, "n_positions", "T5", 512),
        d_model=_count(hf, "d_model", "T5"),
        n_layers=_count(hf, "num_decoder_layers", "T5", encoder_layers),
        n_heads=_count(hf, "num_heads", "T5"),
        head_dim=_count(hf, "d_kv", "T5"),
        d_mlp=_count(hf, "d_ff", "T5"),
        activation=_feed_forward(hf),
        norm="rmsnorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        norm_bias=False,
        position="relative",
        qkv_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        # transformers >= 5 ties every T5 and says whether to scale; older configs untied v1.1 and did not scale
        scale_decoder_output=bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)),
        encoder_layers=encoder_layers,
        cross_attention=True,
        attention_scale=1.0,
        relative_buckets=_count(hf, "relative_attention_num_buckets", "T5", 32),
        relative_max_distance=_count(hf, "relative_attention_max_distance", "T5", 128),
        name="t5",
    )


def t5_misfit(config: ModelConfig) -> list[str]:
    reasons = []
    if not config.encoder_layers or not config.cross_attention:
        reasons.append("an encoder and a cross-attending decoder")
    if config.position != "relative" or config.norm != "rmsnorm" or config.norm_position != "pre":
        reasons.append("relative position bias and RMSNorm pre-norm blocks")
    if config.qkv_bias or config.attn_out_bias or config.mlp_bias or config.attention_scale != 1.0:
        reasons.append("no biases and unscaled attention scores")
    if config.activation not in ("relu", "geglu", "swiglu"):
        reasons.append(f"a relu or gated feed-forward (has {config.activation!r})")
    if config.n_kv_heads != config.n_heads:
        reasons.append("as many key/value heads as query heads")
    if config.n_experts or config.sliding_window is not None:
        reasons.append("dense MLPs and full attention (no experts, no sliding window)")
    return reasons


def t5_to_hf(config: ModelConfig, family: "Family") -> dict[str, Any]:
    feed_forward = {"relu": "relu", "geglu": "gated-gelu", "swiglu": "gated-silu"}[config.activation]
    return {
        "architectures": [family.architecture],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.head_dim,
        "d_ff": config.d_mlp,
        "num_layers": config.encoder_layers,
        "num_decoder_layers": config.n_layers,
        "num_heads": config.n_heads,
        "relative_attention_num_buckets": config.relative_buckets,
        "relative_attention_max_distance": config.relative_max_distance,
        "dropout_rate": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": feed_forward,
        "is_encoder_decoder": True,
        "tie_word_embeddings": config.tie_embeddings,
        "scale_decoder_outputs": config.scale_decoder_output,
        "n_positions": config.context_length,
        "decoder_start_token_id": 0,
        "use_cache": True,
    }
