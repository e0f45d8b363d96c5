"""Writing a model as a Hugging Face directory that transformers loads: config.json in the
chosen family's spelling, safetensors shards (5GB each by default) with their index, the
tokenizer and generation_config.json, all under one atomic rename."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from scribelm.checkpoint import CONFIG_FILE
from scribelm.errors import ConfigError, ScribeError
from scribelm.interop.hf.families import Family, family_for
from scribelm.interop.hf.files import INDEX_FILE, SINGLE_WEIGHTS
from scribelm.interop.hf.generation import GENERATION_CONFIG, generation_to_hf
from scribelm.interop.hf.weights import expand_rules, to_hf
from scribelm.io import atomic_directory

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; Hugging Face's customary 5GB


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
    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict(keep_vars=True).items():  # a tensor shared under several names: its first name
        if not any(v is seen for seen in state.values()):
            state[k] = v
    state = {k: v.detach() for k, v in state.items()}
    present = {k for k in state if not (config.tie_embeddings and k == "unembedding.weight")}
    rules = expand_rules(family.weights, config, present)
    uncovered = sorted(present - {o for r in rules for o in r.ours})
    if uncovered:  # adapters, quantized layers, anything a plain Transformer does not have
        raise ScribeError(
            f"the model holds tensors a {family.architecture} has no place for: {', '.join(uncovered[:4])}"
            f"{' ...' if len(uncovered) > 4 else ''}; merge adapters and undo quantization before exporting"
        )
    on_cpu = {k: v if v.is_meta else v.cpu() for k, v in state.items()}  # meta: names and shapes only
    return {r.hf: to_hf(r, [on_cpu[o] for o in r.ours]) for r in rules}


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
        if getattr(lm, "sentence_config", None):  # a sentence-transformers model stays one
            from scribelm.embed import write_sentence_config

            write_sentence_config(tmp, lm.sentence_config, config.d_model)
    return path
