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
quantized checkpoint, an activation we do not have. Sliding-window attention
(Mistral v0.1, Mixtral, Qwen2 with every layer sliding) is computed as the window
says. The one adaptation is a Qwen2 whose layers partly slide: within the window
it is plain causal attention, so the model's context is set to the window —
exact for every sequence it accepts — and a warning says so.

Weights are safetensors only, memory-mapped while loading; pickle checkpoints
(`pytorch_model.bin`) are refused: unpickling runs arbitrary code.

    weights.py     the tensor-name tables and the per-tensor conversions
    configs.py     config.json <-> ModelConfig for each family (exact or refused)
    families.py    the supported families, and which one a config.json or a ModelConfig is
    files.py       config.json and the weight files of a directory
    generation.py  generation_config.json <-> scribelm's generation settings
    tokenizer.py   tokenizer.json, or GPT-2's vocab.json + merges.txt
    load.py        a directory -> (Transformer, Tokenizer, settings); `scribelm.load` makes the LM
    save.py        an LM -> a directory transformers loads
"""

from scribelm.interop.hf.families import FAMILIES, Family, config_from_hf, family_for, family_of
from scribelm.interop.hf.files import INDEX_FILE, SINGLE_WEIGHTS, is_hf_directory, read_hf_config
from scribelm.interop.hf.generation import GENERATION_CONFIG, generation_from_hf, generation_to_hf
from scribelm.interop.hf.load import load_hf_parts
from scribelm.interop.hf.save import DEFAULT_MAX_SHARD_SIZE, hf_state_dict, parse_size, save_hf
from scribelm.interop.hf.weights import WeightRule

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE", "FAMILIES", "Family", "GENERATION_CONFIG", "INDEX_FILE", "SINGLE_WEIGHTS", "WeightRule",
    "config_from_hf", "family_for", "family_of", "generation_from_hf", "generation_to_hf", "hf_state_dict",
    "is_hf_directory", "load_hf_parts", "parse_size", "read_hf_config", "save_hf",
]
