"""Pretraining from a recipe: one YAML file says everything about a run.

    model:                 # a preset and/or ModelConfig fields
      preset: tiny
      n_layers: 4
    data:
      dir: data/kjv        # made by `scribe prepare`
      batch_size: 16       # per process, per micro-batch
      sequence_length: 256
    train:                 # TrainConfig fields
      max_steps: 2000
      lr: 1.0e-3
    out_dir: runs/tiny
    resume: true           # the same recipe again continues from the newest usable checkpoint
                           # in out_dir; false: an out_dir holding a run is refused (unless --new)

`scribe pretrain --config recipes/tiny.yaml --train.lr 3e-4 --data.batch_size 8`
overrides any key with a dotted path. The effective recipe (after overrides)
is saved as `run_config.json` in every checkpoint, so a checkpoint says how
it was made. The model's vocabulary defaults to the data's.

out_dir belongs to one run (`scribelm.train.run_dir`): its `run.json` records
the model, the data (by content: tokenizer hash and token counts, not path)
and the training settings. Running again with the same recipe resumes; how
long to train, how often to evaluate or save and where may change on
resume (RESUMABLE_CHANGES). Any other change is refused with the
differences unless `new=True` (`--new`) starts the run over there.

Before anything is allocated the run's memory is estimated and a run that
cannot fit is refused with the estimate.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from scribelm.config import ModelConfig
from scribelm.errors import ConfigError
from scribelm.train.config import TrainConfig, TrainResult
from scribelm.train.trainer import Trainer, resolve_device

RECIPE_KEYS = ("model", "data", "train", "out_dir", "resume", "tokenizer", "generation", "objective")
#: What the model learns: the next token (decoders), or masked tokens from both sides (encoders, BERT).
#: span: T5's span corruption, for encoder-decoders.
OBJECTIVES = ("causal", "mlm", "span")
# Recipe keys that may change when a run resumes: they say how long, how often, where and how fast,
# not what the run computes. (The tokenizer is pinned by the data's hash; data.dir may move.)
RESUMABLE_CHANGES = (
    "out_dir", "resume", "tokenizer", "generation", "data.dir", "train.max_steps", "train.time_budget_s",
    "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_last", "train.keep_best",
    "train.log_every", "train.device", "train.distributed", "train.peak_flops", "train.tensorboard", "train.plot",
    "train.compile", "train.gradient_checkpointing",
)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; numbers written that way are meant as numbers."""
    if isinstance(value, dict):
        return {k: _coerce(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce(v) for v in value]
    if isinstance(value, str) and _NUMBER.match(value):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with the sections {', '.join(RECIPE_KEYS)}")
    return _coerce(data)


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`["--train.lr", "3e-4", "--model.n_layers=2"]` -> recipe with those keys set."""
    recipe = copy.deepcopy(recipe)
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"override {item!r} must look like --section.key VALUE")
        key = item[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} needs a value")
            raw = items[i + 1]
            i += 2
        value = _coerce(yaml.safe_load(raw)) if raw != "" else ""
        parts = key.replace("-", "_").split(".")
        if parts[0] not in RECIPE_KEYS:
            raise ConfigError(f"unknown recipe section in --{key}; sections: {', '.join(RECIPE_KEYS)}")
        node = recipe
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part} is not a section")
        node[parts[-1]] = value
    return recipe


def model_config_from_recipe(section: dict[str, Any], data_vocab_size: int) -> ModelConfig:
    section = dict(section or {})
    preset = section.pop("preset", None)
    if "vocab_size" not in section:
        section["vocab_size"] = data_vocab_size
    if preset is not None:
        return ModelConfig.from_preset(preset, **section)
    return ModelConfig.from_dict(section)


def build_run(recipe: dict[str, Any], progress: Callable[[str, dict[str, Any]], None] | None = None,
              model_factory: Callable[[ModelConfig], torch.nn.Module] | None = None, *, new: bool = False) -> Trainer:
    """A ready Trainer (model, data, tokenizer, resume state) for `recipe`.

    out_dir is claimed for this run first (see the module docstring); `trainer.run_directory`
    says whether it resumes (and which allowed settings changed), None on ranks other than 0.
    `new=True` starts over in an out_dir that holds an earlier run.
    """
    from scribelm.train.run_dir import claim_run_directory
    from scribelm.data.loader import TokenBatchLoader
    from scribelm.data.prepare import check_tokenizer_matches, read_manifest
    from scribelm.tokenizer import Tokenizer
    from scribelm.train import distributed as dist_utils
    from scribelm.train.memory import check_fits, estimate_training_memory
    from scribelm.train.objectives import NextTokenObjective, token_byte_lengths

    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"unknown recipe key(s): {', '.join(unknown)}; known: {', '.join(RECIPE_KEYS)}")
    data = dict(recipe.get("data") or {})
    if "dir" not in data:
        raise ConfigError("the recipe needs data.dir: a directory made by `scribe prepare`")
    data_dir = Path(data.pop("dir"))
    batch_size = int(data.pop("batch_size", 8))
    sequence_length = int(data.pop("sequence_length", 256))
    if data:
        raise ConfigError(f"unknown data setting(s): {', '.join(sorted(data))}; known: dir, batch_size, sequence_length")
    train_config = TrainConfig.from_dict(dict(recipe.get("train") or {}))
    out_dir = Path(recipe.get("out_dir") or "runs/run")

    manifest = read_manifest(data_dir)
    tokenizer_path = Path(recipe.get("tokenizer") or data_dir)
    tokenizer = Tokenizer.load(tokenizer_path)
    check_tokenizer_matches(manifest, tokenizer, data_dir=data_dir)
    objective_name = recipe.get("objective") or "causal"
    if objective_name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective_name!r}; choose one of {', '.join(OBJECTIVES)}")
    data_vocab_size = manifest["vocab_size"]
    mask_id = None
    if objective_name == "mlm":
        mask_id = _mask_token_id(tokenizer)
        data_vocab_size = max(data_vocab_size, mask_id + 1)
    sentinel_ids: list[int] = []
    if objective_name == "span":
        sentinel_ids = _sentinel_ids(tokenizer)
        data_vocab_size = max(data_vocab_size, max(sentinel_ids) + 1)
    model_config = model_config_from_recipe(recipe.get("model") or {}, data_vocab_size)
    if objective_name == "span" and not model_config.encoder_layers:
        raise ConfigError("objective span needs an encoder-decoder model (model.encoder_layers > 0), e.g. preset t5-small")
    if objective_name != "span" and model_config.encoder_layers:
        raise ConfigError(f"an encoder-decoder model trains with objective: span, not {objective_name}")
    if objective_name != "span" and model_config.causal != (objective_name == "causal"):
        raise ConfigError(
            f"objective {objective_name} needs a {'causal' if objective_name == 'causal' else 'bidirectional'} model "
            f"but model.causal is {str(model_config.causal).lower()}; "
            + ("use a bidirectional preset such as tiny-bert, or set model.causal: false" if objective_name == "mlm"
               else "set objective: mlm for an encoder (a bidirectional model sees the token it should predict)")
        )
    check_tokenizer_matches(manifest, model_vocab_size=model_config.vocab_size, data_dir=data_dir)
    if sequence_length > model_config.context_length:
        raise ConfigError(
            f"data.sequence_length {sequence_length} exceeds the model's context_length {model_config.context_length}"
        )

    device = resolve_device(train_config.device)
    world = dist_utils.init_distributed(device.type)
    estimate = estimate_training_memory(
        model_config, batch_size, sequence_length, precision=train_config.precision,
        gradient_checkpointing=train_config.gradient_checkpointing, world_size=world.world_size,
        fsdp=train_config.distributed == "fsdp",
    )
    # CPU processes share the machine's memory; GPU processes have a device each.
    check_fits(estimate, device, processes_per_device=world.world_size if device.type == "cpu" else 1)

    torch.manual_seed(train_config.seed)
    model = model_factory(model_config) if model_factory else _build_model(model_config)
    train_loader = TokenBatchLoader(data_dir, "train", batch_size, sequence_length, seed=train_config.seed,
                                    rank=world.rank, world_size=world.world_size)
    val_loader = None
    if manifest["splits"]["validation"]["tokens"] > 1:
        val_loader = TokenBatchLoader(data_dir, "validation", batch_size, sequence_length, shuffle=False, loop=False,
                                      rank=world.rank, world_size=world.world_size)
    effective = copy.deepcopy(recipe)
    effective["model"] = model_config.to_dict()
    effective["data"] = {"dir": str(data_dir), "batch_size": batch_size, "sequence_length": sequence_length}
    effective["train"] = train_config.to_dict()
    effective["out_dir"] = str(out_dir)
    defining = {k: v for k, v in copy.deepcopy(effective).items() if k not in ("out_dir", "resume")}  # the place, not the run
    defining["data"].update(tokenizer_sha256=manifest.get("tokenizer_sha256"),
                            tokens={split: info.get("tokens") for split, info in manifest["splits"].items()})
    defining["data"]["dir"] = str(data_dir.resolve())
    claim = None
    if world.is_main:
        claim = claim_run_directory(out_dir, "training run", defining, new=new, resume=bool(recipe.get("resume", True)),
                                    may_change=RESUMABLE_CHANGES)
    dist_utils.barrier()  # the other ranks read checkpoints only once rank 0 has claimed (and maybe cleaned) out_dir
    if objective_name == "mlm":
        from scribelm.train.masking import MaskedLMObjective

        objective = MaskedLMObjective(mask_id, manifest["vocab_size"], tokenizer.special_ids, seed=train_config.seed)
    elif objective_name == "span":
        from scribelm.train.seq2seq_objectives import SpanCorruptionObjective

        objective = SpanCorruptionObjective(sentinel_ids, seed=train_config.seed)
    else:
        objective = NextTokenObjective(token_byte_lengths(tokenizer))
    trainer = Trainer(
        model, objective, train_loader, val_loader, train_config, out_dir,
        tokenizer=tokenizer, run_config=effective, generation=recipe.get("generation"), progress=progress,
    )
    trainer.memory_estimate = estimate
    trainer.run_directory = claim
    if recipe.get("resume", True) and not new:
        trainer.resume()
    return trainer


def _mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, added as a new special token (the next id) when it has none;
    the checkpoints then carry a tokenizer that knows it."""
    from tokenizers import AddedToken

    from scribelm.train.masking import NEW_MASK_TOKEN, find_mask_id

    mask_id = find_mask_id(tokenizer)
    if mask_id is None:
        tokenizer.backend.add_special_tokens([AddedToken(NEW_MASK_TOKEN, special=True, normalized=False)])
        mask_id = tokenizer.token_to_id(NEW_MASK_TOKEN)
    return mask_id


def _sentinel_ids(tokenizer, count: int = 100) -> list[int]:
    """The tokenizer's span sentinels (<extra_id_N>), or `count` new special tokens <|sentinel_N|>."""
    from tokenizers import AddedToken

    from scribelm.train.seq2seq_objectives import SENTINEL_FORMATS, find_sentinel_ids

    found = find_sentinel_ids(tokenizer)
    if found:
        return found
    names = [SENTINEL_FORMATS[1].format(i) for i in range(count)]
    tokenizer.backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    return [tokenizer.token_to_id(n) for n in names]


def _build_model(config: ModelConfig) -> torch.nn.Module:
    from scribelm.seq2seq import build_model

    return build_model(config)  # a Transformer, or an EncoderDecoder


def run_pretraining(recipe: dict[str, Any], progress: Callable[[str, dict[str, Any]], None] | None = None, *,
                    new: bool = False) -> TrainResult:
    return build_run(recipe, progress, new=new).fit()
