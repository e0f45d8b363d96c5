"""Fine-tuning runs on the shared Trainer: SFT (full, LoRA, QLoRA) and DPO.

    import scribelm
    from scribelm.finetune.run import FinetuneOptions, finetune_sft, finetune_dpo

    lm = scribelm.load("my-model")                       # scribelm or Hugging Face directory
    result = finetune_sft(lm, "chat.jsonl", "runs/sft", FinetuneOptions(method="lora", epochs=3))
    result.output                                        # runs/sft/adapter (LoRA) or runs/sft/model (full)

A run directory holds what the Trainer writes (checkpoints/step-N/ to resume
from, best/, metrics.jsonl, loss.png) plus the result: `model/` after full
fine-tuning (a complete checkpoint directory) or `adapter/` after LoRA and
QLoRA (adapter_model.safetensors + adapter_config.json, which names the
base; with export_peft also `adapter-peft/` for Hugging Face's peft). Checkpoints of an adapter run hold only the adapters and the training
state, so they stay small.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from scribelm.adapters.lora import LoRAConfig, apply_lora, lora_modules, save_adapters
from scribelm.adapters.quant4 import quantize_base, storage_bytes
from scribelm.data.chat import ChatDataset, SFTLoader
from scribelm.data.preference import PreferenceDataset, PreferenceLoader
from scribelm.errors import ConfigError, ScribeError
from scribelm.finetune.dpo import DPOObjective, evaluate_preferences, precompute_reference_logps
from scribelm.lm import CHAT_TUNED_KEY
from scribelm.train import NextTokenObjective, TrainConfig, Trainer, token_byte_lengths

METHODS = ("full", "lora", "qlora")
REFERENCES = ("precomputed", "model")
RESULT_FILE = "finetune_result.json"
FEW_STEPS = 20  # fewer optimizer steps than this barely move a model: the run says so before it starts


@dataclass
class FinetuneOptions:
    """What a fine-tuning run does; TrainConfig details not listed here take the Trainer's defaults."""

    method: str = "full"  # full | lora | qlora
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quant: str = "nf4"  # qlora's base format: nf4 | sym4 (scribelm.accel.fourbit)
    quant_group_size: int = 64
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float | None = None  # None: the usual published choices: SFT 2e-5 full, 2e-4 LoRA; DPO 1e-6 full, 5e-6 LoRA
    warmup_steps: int | None = None  # None: 5% of the steps
    weight_decay: float = 0.0
    max_length: int | None = None  # None: the model's context
    pack: bool = True
    overflow: str = "truncate"  # truncate | skip | error
    val_data: str | None = None
    val_fraction: float = 0.05  # held out of the training file when no val_data is given (0: none)
    eval_every: int = 0
    checkpoint_every: int = 0
    precision: str = "fp32"
    device: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    resume: bool = False
    export_peft: bool = False  # also write the adapters in peft's format (out_dir/adapter-peft)
    # DPO
    beta: float = 0.1
    reference: str = "precomputed"  # precomputed | model (a frozen copy, or the base without adapters)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"fine-tuning method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"DPO reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class FinetuneResult:
    output: Path  # model/ or adapter/
    steps: int
    data: dict[str, Any]  # dataset counts (examples, truncated, skipped, ...)
    final_eval: dict[str, Any]
    trainable_parameters: int
    total_parameters: int
    base_bytes: int  # memory held by the frozen base (4-bit for QLoRA)
    extra: dict[str, Any] = field(default_factory=dict)  # DPO: preference metrics before and after


# --------------------------------------------------------------------------- model preparation


def prepare_model(model: torch.nn.Module, options: FinetuneOptions) -> list[str]:
    """Make `model` ready for its method, in place: all trainable (full), LoRA-wrapped, or
    4-bit base + LoRA (qlora). Returns the wrapped layer names (empty for full)."""
    torch.manual_seed(options.seed)  # adapter initialisation: the same run gives the same adapters
    if options.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    if options.method == "qlora":
        quantize_base(model, options.quant, options.quant_group_size)
    return apply_lora(model, options.lora)


def _counts(model: torch.nn.Module) -> tuple[int, int, int]:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(b.numel() * 2 for n, b in model.named_buffers() if n.endswith("codes"))  # two 4-bit weights per byte
    return trainable, total, storage_bytes(model, frozen_only=True)


def _adapter_savers(base_name: str | None):
    def save(path: Path, model: torch.nn.Module, extra_files: dict[str, bytes | str]) -> None:
        # adapters only, with the trainer's training state and run config beside them
        save_adapters(model, path, base_model=base_name, extra={CHAT_TUNED_KEY: True}, extra_files=extra_files)

    def load(path: Path, model: torch.nn.Module) -> None:
        from safetensors.torch import load_file

        from scribelm.adapters.lora import ADAPTER_WEIGHTS_FILE

        state = load_file(str(Path(path) / ADAPTER_WEIGHTS_FILE))
        modules = lora_modules(model)
        with torch.no_grad():
            for name, module in modules.items():
                module.lora_A.copy_(state[f"{name}.lora_A"])
                module.lora_B.copy_(state[f"{name}.lora_B"])

    return save, load


# --------------------------------------------------------------------------- shared plumbing


def _train_config(options: FinetuneOptions, steps_per_epoch: int, default_lr: float) -> TrainConfig:
    max_steps = options.max_steps or _steps_at(options.epochs, steps_per_epoch, options)
    warmup = options.warmup_steps if options.warmup_steps is not None else max(1, max_steps // 20)
    return TrainConfig(
        max_steps=max_steps, grad_accum_steps=options.grad_accum_steps, lr=options.lr or default_lr,
        warmup_steps=min(warmup, max_steps), weight_decay=options.weight_decay, precision=options.precision,
        eval_every=options.eval_every, checkpoint_every=options.checkpoint_every, seed=options.seed,
        device=options.device, gradient_checkpointing=options.gradient_checkpointing, log_every=1,
    )


def _steps_at(epochs: float, steps_per_epoch: int, options: FinetuneOptions) -> int:
    return max(1, math.ceil(epochs * steps_per_epoch / options.grad_accum_steps))


def _plan(options: FinetuneOptions, config: TrainConfig, steps_per_epoch: int, stats: dict[str, Any],
          progress: Callable[[str, dict[str, Any]], None] | None) -> None:
    """Before training: report the data and the plan (progress event "plan"), and warn when the
    run is too short to change the model visibly."""
    plan = {**stats, "max_steps": config.max_steps, "batches_per_epoch": steps_per_epoch, "epochs": options.epochs,
            "batch_size": options.batch_size, "grad_accum_steps": options.grad_accum_steps}
    if progress is not None:
        progress("plan", plan)
    if options.max_steps is None and config.max_steps < FEW_STEPS:
        epochs = next(e for e in range(max(2, math.ceil(options.epochs)), 10_000)
                      if _steps_at(e, steps_per_epoch, options) >= FEW_STEPS)
        warnings.warn(
            f"only {config.max_steps} optimizer step{'s' if config.max_steps != 1 else ''} "
            f"({steps_per_epoch} batch{'es' if steps_per_epoch != 1 else ''} of {options.batch_size} rows per epoch): "
            f"too few to change the model much; train for {epochs} epochs (--epochs {epochs}, "
            f"{_steps_at(epochs, steps_per_epoch, options)} steps) or lower --batch-size",
            stacklevel=3,
        )


def _write_result(out_dir: Path, result: FinetuneResult) -> None:
    data = asdict(result)
    data["output"] = str(result.output)
    tmp = out_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, out_dir / RESULT_FILE)


def _save_output(lm, model, options: FinetuneOptions, out_dir: Path, base_name: str | None) -> Path:
    if options.method == "full":
        from scribelm.checkpoint import save_checkpoint

        return save_checkpoint(out_dir / "model", model, model.config, lm.tokenizer, lm.generation_config)
    out = save_adapters(model, out_dir / "adapter", base_model=base_name,
                        extra={"method": options.method, "quant": options.quant if options.method == "qlora" else None,
                               CHAT_TUNED_KEY: True})
    if options.export_peft:
        from scribelm.adapters.peft_format import save_peft_adapters

        save_peft_adapters(model, out_dir / "adapter-peft", base_model=base_name)
    return out


def _check_context(lm, options: FinetuneOptions) -> int:
    context = lm.config.context_length
    max_length = options.max_length or context
    if max_length > context:
        raise ConfigError(f"max_length {max_length} exceeds the model's context of {context}")
    if lm.tokenizer is None:
        raise ScribeError("this model directory has no tokenizer; fine-tuning on chat data needs tokenizer.json")
    return max_length


def _train_and_val(dataset_type, data, tokenizer, max_length: int, options: FinetuneOptions, *,
                   min_to_split: int, fraction: float):
    """The training set, and a held-out set: the user's file, or a split of the training
    data when it is large enough. Returns (train, val or None, the training file's stats)."""
    def read(path):
        return dataset_type.from_jsonl(path, tokenizer, max_length=max_length, overflow=options.overflow)

    train = read(data)
    stats = dict(train.stats)
    val = None
    if options.val_data:
        val = read(options.val_data)
        stats["validation"] = f"{len(val)} examples from {options.val_data}"
    elif options.val_fraction <= 0:
        stats["validation"] = "none (val_fraction 0)"
    elif len(train) >= min_to_split:
        train, val = train.split(fraction, options.seed)
        stats["validation"] = f"{len(val)} of the {len(train) + len(val)} examples held out ({100 * fraction:g}%)"
    else:
        stats["validation"] = (f"none: {len(train)} examples are too few to hold some out (at least {min_to_split}); "
                               "give a separate file with --val-data")
    return train, val, stats


# --------------------------------------------------------------------------- SFT


def finetune_sft(lm, data: str | os.PathLike, out_dir: str | os.PathLike, options: FinetuneOptions | None = None, *,
                 base_name: str | None = None,
                 progress: Callable[[str, dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Supervised fine-tuning on a chat / instruction JSONL file (full, LoRA or QLoRA)."""
    options = options or FinetuneOptions()
    out_dir = Path(out_dir)
    max_length = _check_context(lm, options)
    tokenizer = lm.tokenizer
    train, val, stats = _train_and_val(ChatDataset, data, tokenizer, max_length, options,
                                       min_to_split=20, fraction=options.val_fraction)
    stats.update(train_examples=len(train), val_examples=len(val) if val else 0)
    pad_id = tokenizer.pad_id or 0
    loader = SFTLoader(train, options.batch_size, max_length=max_length, pack=options.pack, seed=options.seed,
                       pad_id=pad_id, epochs=None)
    val_batches = list(SFTLoader(val, options.batch_size, max_length=max_length, pack=False, shuffle=False,
                                 pad_id=pad_id)) if val else None
    stats["packing_fill"] = round(loader.fill, 4)

    model = lm.model
    wrapped = prepare_model(model, options)
    trainable, total, base_bytes = _counts(model)
    is_adapter = options.method != "full"
    config = _train_config(options, len(loader), 2e-4 if is_adapter else 2e-5)
    _plan(options, config, len(loader), stats, progress)
    lm.generation_config = {**(lm.generation_config or {}), CHAT_TUNED_KEY: True}
    save_fn = load_fn = None
    if is_adapter:
        save_fn, load_fn = _adapter_savers(base_name)
    trainer = Trainer(
        model, NextTokenObjective(token_byte_lengths(tokenizer)), loader, val_batches, config, out_dir,
        tokenizer=tokenizer, generation=lm.generation_config, progress=progress, save_model=save_fn,
        load_model_state=load_fn,
        run_config={"finetune": "sft", "method": options.method, "data": str(data), "base_model": base_name,
                    "lora": asdict(options.lora) if is_adapter else None, "wrapped": wrapped},
    )
    if options.resume:
        trainer.resume()
    fit = trainer.fit()
    model.eval()
    output = _save_output(lm, model, options, out_dir, base_name)
    result = FinetuneResult(output=output, steps=fit.steps, data=stats, final_eval=fit.final_eval,
                            trainable_parameters=trainable, total_parameters=total, base_bytes=base_bytes)
    _write_result(out_dir, result)
    return result


# --------------------------------------------------------------------------- DPO


def finetune_dpo(lm, data: str | os.PathLike, out_dir: str | os.PathLike, options: FinetuneOptions | None = None, *,
                 base_name: str | None = None,
                 progress: Callable[[str, dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Preference tuning with DPO on a {"prompt", "chosen", "rejected"} JSONL file."""
    options = options or FinetuneOptions()
    out_dir = Path(out_dir)
    max_length = _check_context(lm, options)
    tokenizer = lm.tokenizer
    train, val, stats = _train_and_val(PreferenceDataset, data, tokenizer, max_length, options,
                                       min_to_split=10, fraction=max(options.val_fraction, 0.1))
    stats.update(train_pairs=len(train), val_pairs=len(val) if val else 0)

    model = lm.model
    device = torch.device("cuda" if options.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if options.device == "auto" else options.device))
    model.to(device)
    reference_model = None
    if options.reference == "model" and options.method == "full":
        reference_model = copy.deepcopy(model).eval()
        for p in reference_model.parameters():
            p.requires_grad_(False)
    wrapped = prepare_model(model, options)
    if options.reference == "precomputed":
        # adapters start as a no-op, so the model as it is now is the reference
        for dataset in (train, val):
            if dataset is not None:
                precompute_reference_logps(model, dataset, batch_size=options.batch_size, device=device)
    trainable, total, base_bytes = _counts(model)
    before = evaluate_preferences(model, val, options.beta, options.batch_size, reference_model, device) if val else {}

    pad_id = tokenizer.pad_id or 0
    loader = PreferenceLoader(train, options.batch_size, seed=options.seed, pad_id=pad_id, epochs=None)
    val_batches = list(PreferenceLoader(val, options.batch_size, shuffle=False, pad_id=pad_id)) if val else None
    is_adapter = options.method != "full"
    config = _train_config(options, len(loader), 5e-6 if is_adapter else 1e-6)
    _plan(options, config, len(loader), stats, progress)
    lm.generation_config = {**(lm.generation_config or {}), CHAT_TUNED_KEY: True}
    save_fn = load_fn = None
    if is_adapter:
        save_fn, load_fn = _adapter_savers(base_name)
    objective = DPOObjective(options.beta, reference_model, options.label_smoothing)
    trainer = Trainer(
        model, objective, loader, val_batches, config, out_dir, tokenizer=tokenizer,
        generation=lm.generation_config, progress=progress, save_model=save_fn, load_model_state=load_fn,
        run_config={"finetune": "dpo", "method": options.method, "data": str(data), "base_model": base_name,
                    "beta": options.beta, "reference": options.reference, "wrapped": wrapped},
    )
    if options.resume:
        trainer.resume()
    fit = trainer.fit()
    after = evaluate_preferences(model, val, options.beta, options.batch_size, reference_model, device) if val else {}
    model.eval()
    output = _save_output(lm, model, options, out_dir, base_name)
    result = FinetuneResult(output=output, steps=fit.steps, data=stats, final_eval=fit.final_eval,
                            trainable_parameters=trainable, total_parameters=total, base_bytes=base_bytes,
                            extra={"held_out_before": before, "held_out_after": after})
    _write_result(out_dir, result)
    return result


def load_with_adapters(base: str | os.PathLike, adapter_dir: str | os.PathLike, *, merge: bool = True, **load_options):
    """scribelm.load(base) with LoRA adapters on top; merged into plain weights unless merge=False."""
    import scribelm
    from scribelm.adapters.lora import merge_lora

    lm = scribelm.load(base, **load_options)
    lm.apply_adapter(adapter_dir)
    if merge:
        merge_lora(lm.model)
    lm.model.eval()
    return lm
