"""Reading a Hugging Face model directory into a scribelm `Transformer`.

Weights are opened with `safetensors.safe_open`, which maps the file into memory: the
tensors are views of the page cache until written to, the model is built on the meta
device and the tensors are assigned to it, so loading needs about one copy of the
weights, not two. Every name and shape is checked against the config before a byte of
weights is read. `scribelm.load` puts the parts together as an `LM`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from scribelm.checkpoint import CONFIG_FILE
from scribelm.config import ModelConfig
from scribelm.errors import CheckpointError
from scribelm.interop.hf.families import Family, config_from_hf, family_of
from scribelm.interop.hf.files import INDEX_FILE, read_hf_config, weight_files
from scribelm.interop.hf.generation import generation_from_hf, read_generation_config
from scribelm.interop.hf.tokenizer import load_tokenizer
from scribelm.interop.hf.weights import expand_rules, hf_shape, to_ours
from scribelm.model import Transformer
from scribelm.seq2seq import build_model
from scribelm.tokenizer import Tokenizer

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


_HF_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|block)\.(\d+)\.")  # T5's block.{i}.layer.{j}: the first


def _check_layer_count(path: Path, family: Family, config: ModelConfig, names: Iterable[str]) -> None:
    """Refuse a layer count the weight names contradict before a model is built from it
    (building follows the config, so a wrong count would cost in proportion to the mistake)."""
    layers = {int(m.group(1)) for name in names if (m := _HF_LAYER.search(name))}
    if layers != set(range(max(config.n_layers, config.encoder_layers))):
        key = "n_layer" if family.model_type == "gpt2" else "num_hidden_layers"
        held = f"layers {min(layers)}..{max(layers)}" if layers else "no layers"
        raise CheckpointError(
            f"{path / CONFIG_FILE} says {key}={config.n_layers} but the weights hold {held}; "
            "the config and the weights disagree"
        )


def load_hf_parts(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
) -> tuple[Transformer, Tokenizer | None, dict[str, Any]]:
    """The model (weights memory-mapped, dtype kept unless `dtype`), tokenizer and
    generation settings of a Hugging Face model directory; `scribelm.load` makes them an `LM`."""
    path = Path(path)
    hf = read_hf_config(path)
    family = family_of(hf)
    config = config_from_hf(hf)
    files = weight_files(path)
    _check_layer_count(path, family, config, files)
    # the small side files before the weights: a mistake in them is reported first
    tokenizer = load_tokenizer(path)
    generation = generation_from_hf(read_generation_config(path, hf), tokenizer)

    with torch.device("meta"):  # no memory: the tensors are assigned below
        model = build_model(config)  # a Transformer, or an EncoderDecoder (T5)
    expected: dict[str, tuple[int, ...]] = {}
    seen: list[torch.Tensor] = []
    for name, t in model.state_dict(keep_vars=True).items():  # a tensor shared under several names: its first name
        if not any(t is other for other in seen):
            seen.append(t)
            expected[name] = tuple(t.shape)
    rules = expand_rules(family.weights, config, set(expected))
    by_name = {family.normalize(name): name for name in files}  # our spelling -> the file's spelling

    missing = [r.hf for r in rules if r.hf not in by_name]
    if missing:
        raise CheckpointError(
            f"{path} lacks weight(s) its config.json needs: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    used = {r.hf for r in rules}
    ignored = re.compile(family.ignored)
    unexpected = sorted(
        n for n in by_name
        if n not in used and not ignored.match(n) and not (config.tie_embeddings and n == "lm_head.weight")
    )
    if unexpected:
        raise CheckpointError(
            f"{path} holds weight(s) a plain {family.architecture} with this config.json does not have: "
            f"{', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
        )

    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles: dict[Path, tuple[Any, set[str]]] = {}  # one open mapping per file, with its tensor names

        def handle(file: Path):
            if file not in handles:
                opened = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                handles[file] = (opened, set(opened.keys()))
            return handles[file]

        try:
            for rule in rules:
                file_name = by_name[rule.hf]
                f, names = handle(files[file_name])
                if file_name not in names:
                    raise CheckpointError(f"{files[file_name]} does not hold {file_name}, though {INDEX_FILE} says so")
                got = tuple(f.get_slice(file_name).get_shape())
                want = hf_shape(rule, [expected[o] for o in rule.ours])
                if got != want:
                    raise CheckpointError(
                        f"weight {file_name} in {files[file_name].name} has shape {got} but config.json implies {want}; "
                        "the weights and config.json disagree"
                    )
                stored = _SAFETENSORS_DTYPES.get(f.get_slice(file_name).get_dtype())
                if rule.kind == "same" and (dtype is None or dtype == stored):
                    state[rule.ours[0]] = f.get_tensor(file_name)  # a view of the memory-mapped file
                    continue
                # A tensor that is copied (transposed, split, cast) is read through its own short-lived
                # mapping: pages touched by the copy leave memory with it, so the peak stays near one
                # copy of the weights instead of the copies plus the whole mapped file.
                with safe_open(str(files[file_name]), framework="pt", device="cpu") as once:
                    tensor = once.get_tensor(file_name)
                    if dtype is not None:
                        tensor = tensor.to(dtype)
                    parts = to_ours(rule, tensor, config)
                    del tensor
                for ours, part in zip(rule.ours, parts):
                    state[ours] = part
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"a weight file in {path} is corrupt or truncated ({err}); download it again") from None

    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.unembedding.weight = model.token_embedding.weight
    model = model.to(device)
    model.eval()
    return model, tokenizer, generation
