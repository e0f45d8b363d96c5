"""generation_config.json <-> scribelm's generation settings, so that decoding an imported
model behaves as `transformers.generate` does by default (and an export reads back the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scribelm.checkpoint import check_generation
from scribelm.errors import CheckpointError
from scribelm.io import read_json_object

GENERATION_CONFIG = "generation_config.json"


def read_generation_config(path: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json as it is (Hugging Face names), with config.json's token ids filled in."""
    generation: dict[str, Any] = {}
    file = path / GENERATION_CONFIG
    if file.is_file():
        generation = read_json_object(file, CheckpointError, missing="")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # transformers falls back to config.json
        if generation.get(key) is None and hf.get(key) is not None:
            generation[key] = hf[key]
    return generation


def _ids(value: Any, key: str = "eos_token_id") -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise CheckpointError(f"{GENERATION_CONFIG}: '{key}' must be a token id or a list of them, got {value!r}")
    return list(values)


def _setting(generation: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """generation[key] as `kind` (`default` when absent or null), or a refusal naming the key."""
    value = generation.get(key)
    if value is None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole):
        raise CheckpointError(f"{GENERATION_CONFIG}: '{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def generation_from_hf(generation: dict[str, Any], tokenizer=None) -> dict[str, Any]:
    """Hugging Face generation settings -> scribelm's (`LM.generation_config`, read by
    `LM.generate`), so that decoding behaves as `transformers.generate` does by default:
    every eos id stops, do_sample=false means greedy, sampling keeps transformers' top_k=50
    unless the file sets it, and BOS is prepended when the tokenizer would add it."""
    out: dict[str, Any] = {}
    stops = _ids(generation.get("eos_token_id"))
    if stops:
        out["stop_token_ids"] = stops
    if generation.get("do_sample"):
        out["temperature"] = _setting(generation, "temperature", float, 1.0)
        out["top_k"] = _setting(generation, "top_k", int, 50)
        out["top_p"] = _setting(generation, "top_p", float, 1.0)
        if _setting(generation, "min_p", float):
            out["min_p"] = _setting(generation, "min_p", float)
    else:
        out["temperature"] = 0.0  # greedy (or beam search when num_beams > 1)
    for key, kind in (("repetition_penalty", float), ("max_new_tokens", int), ("num_beams", int), ("length_penalty", float)):
        if generation.get(key) is not None:
            out[key] = _setting(generation, key, kind)
    if isinstance(generation.get("early_stopping"), bool):
        out["early_stopping"] = generation["early_stopping"]
    if tokenizer is not None:
        out["add_bos_token"] = _tokenizer_adds_bos(tokenizer)
    return check_generation(out, GENERATION_CONFIG)


def generation_to_hf(generation: dict[str, Any], tokenizer=None) -> dict[str, Any]:
    """scribelm's generation settings -> generation_config.json, the inverse of `generation_from_hf`
    (an unset temperature is scribelm's default 1.0: sampling, no top-k)."""
    out: dict[str, Any] = {}
    stops = _ids(generation.get("stop_token_ids"))
    if tokenizer is not None:
        if tokenizer.bos_id is not None:
            out["bos_token_id"] = tokenizer.bos_id
        if tokenizer.eos_id is not None and tokenizer.eos_id not in stops:
            stops.insert(0, tokenizer.eos_id)  # scribelm always stops at the tokenizer's EOS
        if tokenizer.pad_id is not None:
            out["pad_token_id"] = tokenizer.pad_id
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    temperature = float(generation.get("temperature", 1.0))
    if temperature == 0:
        out["do_sample"] = False
    else:
        out.update(do_sample=True, temperature=temperature, top_k=int(generation.get("top_k", 0)),
                   top_p=float(generation.get("top_p", 1.0)))
        if generation.get("min_p"):
            out["min_p"] = float(generation["min_p"])
    for key in ("repetition_penalty", "max_new_tokens", "num_beams", "length_penalty", "early_stopping"):
        if generation.get(key) is not None:
            out[key] = generation[key]
    return out


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether transformers' tokenizer puts BOS in front of encoded text: the
    tokenizer_config.json flag when present, else what tokenizer.json's post-processor does."""
    flag = tokenizer.extra_config.get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    bos = tokenizer.bos_id
    if bos is None:
        return False
    ids = tokenizer.backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos
