"""Training a reward model on the shared Trainer.

    import scribelm
    from scribelm.finetune.reward_run import finetune_reward
    from scribelm.finetune.run import FinetuneOptions

    lm = scribelm.load("my-model")
    result = finetune_reward(lm, "prefs.jsonl", "runs/rm", FinetuneOptions(epochs=3))
    result.output                                   # runs/rm/model: loads with load_reward_model
    result.extra["held_out_after"]["accuracy"]      # pairwise accuracy on held-out pairs

The run directory is a fine-tuning run's (checkpoints/ to resume from,
metrics.jsonl with accuracy and margins per step, loss.png); every
checkpoint and `model/` carry the score head beside the language model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from scribelm.errors import ConfigError
from scribelm.finetune.reward import (
    RewardModel, RewardObjective, RewardPairLoader, RewardPairs, evaluate_reward_model, load_reward_head,
    save_reward_model,
)
from scribelm.finetune.run import (
    FinetuneOptions, FinetuneResult, _check_context, _counts, _plan, _train_config, _write_result,
)
from scribelm.train import Trainer


def finetune_reward(lm, data: str | os.PathLike, out_dir: str | os.PathLike, options: FinetuneOptions | None = None,
                    *, center_coefficient: float | None = None, base_name: str | None = None,
                    progress: Callable[[str, dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Train a scalar head (and the whole model under it) on {"prompt", "chosen", "rejected"[, "margin"]} pairs."""
    options = options or FinetuneOptions()
    if options.method != "full":
        raise ConfigError("a reward model trains all its weights (method 'full'); LoRA reward models are not supported")
    if center_coefficient is not None and center_coefficient < 0:
        raise ConfigError(f"the reward-centring coefficient must be >= 0, got {center_coefficient}")
    out_dir = Path(out_dir)
    max_length = _check_context(lm, options)
    tokenizer = lm.tokenizer
    train = RewardPairs.from_jsonl(data, tokenizer, max_length=max_length, overflow=options.overflow)
    stats = dict(train.pairs.stats)
    val = None
    if options.val_data:
        val = RewardPairs.from_jsonl(options.val_data, tokenizer, max_length=max_length, overflow=options.overflow)
        stats["validation"] = f"{len(val)} pairs from {options.val_data}"
    elif options.val_fraction > 0 and len(train) >= 10:
        fraction = max(options.val_fraction, 0.1)
        train, val = train.split(fraction, options.seed)
        stats["validation"] = f"{len(val)} of the {len(train) + len(val)} pairs held out ({100 * fraction:g}%)"
    else:
        stats["validation"] = "none" if options.val_fraction <= 0 else \
            f"none: {len(train)} pairs are too few to hold some out (at least 10); give --val-data"
    stats.update(train_pairs=len(train), val_pairs=len(val) if val else 0)

    torch.manual_seed(options.seed)  # the head's initialisation
    model = RewardModel(lm.model)
    for p in model.parameters():
        p.requires_grad_(True)
    pad_id = tokenizer.pad_id or 0
    before = evaluate_reward_model(model, val, options.batch_size, pad_id, center_coefficient) if val else {}
    trainable, total, base_bytes = _counts(model)
    loader = RewardPairLoader(train, options.batch_size, seed=options.seed, pad_id=pad_id)
    val_batches = list(val.batches(options.batch_size, shuffle=False, pad_id=pad_id)) if val else None
    config = _train_config(options, len(loader), 1e-5)
    _plan(options, config, len(loader), stats, progress)

    def save(path: Path, module: torch.nn.Module, extra_files: dict[str, bytes | str]) -> None:
        save_reward_model(path, module, tokenizer, lm.generation_config, extra_files)

    trainer = Trainer(
        model, RewardObjective(center_coefficient), loader, val_batches, config, out_dir, tokenizer=tokenizer,
        generation=lm.generation_config, progress=progress, save_model=save, load_model_state=load_reward_head,
        run_config={"finetune": "reward", "data": str(data), "base_model": base_name,
                    "center_coefficient": center_coefficient},
    )
    if options.resume:
        trainer.resume()
    fit = trainer.fit()
    model.eval()
    after = evaluate_reward_model(model, val, options.batch_size, pad_id, center_coefficient) if val else {}
    output = save_reward_model(out_dir / "model", model, tokenizer, lm.generation_config)
    result = FinetuneResult(output=output, steps=fit.steps, data=stats, final_eval=fit.final_eval,
                            trainable_parameters=trainable, total_parameters=total, base_bytes=base_bytes,
                            extra={"held_out_before": before, "held_out_after": after})
    _write_result(out_dir, result)
    return result
