"""Online RL runs on the shared Trainer: GRPO and PPO.

    import scribelm
    from scribelm.finetune.grpo import GRPOOptions
    from scribelm.finetune.rl_run import finetune_grpo
    from scribelm.finetune.run import FinetuneOptions

    def short_and_done(prompt, completion):            # any (prompt, completion) -> float
        return float(completion.strip().endswith("."))

    lm = scribelm.load("my-model")
    result = finetune_grpo(lm, "prompts.jsonl", [short_and_done], "runs/grpo",
                           FinetuneOptions(max_steps=100, lr=1e-5), GRPOOptions(num_generations=8))
    result.extra["held_out_before"]["reward_mean"], result.extra["held_out_after"]["reward_mean"]

The run directory is a fine-tuning run's (checkpoints/ to resume from,
metrics.jsonl with the RL figures each step, loss.png) plus rewards.png
(reward mean ± std and KL per step), samples.jsonl and the result, `model/` (full) or `adapter/` (LoRA). Held-out prompts
(--val-data, else a share of the prompts when there are at least 10) are
scored before and after training with the same sampling seed.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from scribelm.errors import ScribeError
from scribelm.finetune.grpo import SAMPLES_FILE, GRPOObjective, GRPOOptions, RolloutLoader, evaluate_rewards
from scribelm.finetune.reward_functions import load_reward_sources
from scribelm.finetune.rollouts import completion_logps, prompt_ids, read_prompts
from scribelm.finetune.run import (
    FinetuneOptions, FinetuneResult, _adapter_savers, _counts, _plan, _save_output, _train_config, _write_result,
    prepare_model,
)
from scribelm.lm import CHAT_TUNED_KEY
from scribelm.train import Trainer


def _device(options: FinetuneOptions) -> torch.device:
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(options.device)


def _prompts(lm, prompts: str | os.PathLike | Sequence[str], options: FinetuneOptions):
    """(training prompts, held-out prompts or [], a line about validation)."""
    train = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    if not train:
        raise ScribeError("no prompts to train on")
    if options.val_data:
        return train, read_prompts(options.val_data), f"held-out prompts from {options.val_data}"
    if options.val_fraction > 0 and len(train) >= 10:
        order = list(range(len(train)))
        random.Random(options.seed).shuffle(order)
        n_val = max(1, round(len(train) * options.val_fraction))
        val = [train[i] for i in sorted(order[:n_val])]
        return [train[i] for i in sorted(order[n_val:])], val, f"{n_val} of the {len(train)} prompts held out"
    return train, [], "none (give --val-data to measure held-out reward)"


def _encode(lm, texts: Sequence[str], chat: bool, max_new_tokens: int) -> list[list[int]]:
    context = lm.config.context_length
    encoded = []
    for text in texts:
        ids = prompt_ids(lm, text, chat)
        if len(ids) + max_new_tokens > context:
            raise ScribeError(f"a prompt of {len(ids)} tokens leaves no room for {max_new_tokens} new tokens in the "
                              f"model's context of {context}; shorten it or lower --max-new-tokens")
        encoded.append(ids)
    return encoded


REWARD_PLOT_FILE = "rewards.png"


def plot_rewards(metrics_file: str | os.PathLike, png: str | os.PathLike) -> Path:
    """Mean reward (± its spread) and KL to the reference against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scribelm.io import atomic_file
    from scribelm.train.metrics import read_metrics

    records = [r for r in read_metrics(metrics_file) if "reward_mean" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if records:
        steps = [r["step"] for r in records]
        mean = [r["reward_mean"] for r in records]
        std = [r.get("reward_std", 0.0) for r in records]
        ax.plot(steps, mean, label="reward (mean)", linewidth=1)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                        label="± std")
        if any("kl" in r for r in records):
            kl_axis = ax.twinx()
            kl_axis.plot([r["step"] for r in records if "kl" in r], [r["kl"] for r in records if "kl" in r],
                         color="tab:red", linewidth=1, label="KL to reference")
            kl_axis.set_ylabel("KL per token", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    png = Path(png)
    try:
        with atomic_file(png, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
    return png


def _writes_samples(out_dir: Path) -> Path | None:
    from scribelm.train.distributed import world_info

    return out_dir / SAMPLES_FILE if world_info().is_main else None  # one writer per run


def _rank_seed(seed: int) -> int:
    """Each process of a torchrun job samples its own prompts and completions."""
    from scribelm.train.distributed import world_info

    return seed + 1_000_003 * world_info().rank


def make_reference(model: torch.nn.Module, options: FinetuneOptions, temperature: float):
    """`reference(ids, targets) -> per-token log-probs` of the frozen starting model: the base
    without adapters under LoRA (free), else a frozen copy made now."""
    if options.method != "full":
        from scribelm.finetune.dpo import adapters_disabled

        def with_adapters_off(ids, targets):
            was_training = model.training
            model.eval()
            try:
                with adapters_disabled(model):
                    return completion_logps(model, ids, targets, temperature)
            finally:
                model.train(was_training)

        return with_adapters_off
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return lambda ids, targets: completion_logps(frozen, ids, targets, temperature)


def finetune_grpo(lm, prompts: str | os.PathLike | Sequence[str], rewards: Sequence[str | Callable[[str, str], float]],
                  out_dir: str | os.PathLike, options: FinetuneOptions | None = None, rl: GRPOOptions | None = None,
                  *, base_name: str | None = None,
                  progress: Callable[[str, dict[str, Any]], None] | None = None) -> FinetuneResult:
    """GRPO on a prompts file with reward functions / reward models (see `reward_functions`)."""
    options = options or FinetuneOptions()
    rl = rl or GRPOOptions()
    out_dir = Path(out_dir)
    if lm.tokenizer is None:
        raise ScribeError("this model directory has no tokenizer; RL on text prompts needs tokenizer.json")
    device = _device(options)
    lm.model.to(device)
    sources = load_reward_sources(rewards, rl.reward_weights, device=device)
    chat = rl.chat if rl.chat is not None else bool((lm.generation_config or {}).get(CHAT_TUNED_KEY))
    train_prompts, val_prompts, validation = _prompts(lm, prompts, options)
    train_ids = _encode(lm, train_prompts, chat, rl.max_new_tokens)
    val_ids = _encode(lm, val_prompts, chat, rl.max_new_tokens)
    from scribelm.generate import chat_stop_ids

    stops = chat_stop_ids(lm.tokenizer) if chat else []

    model = lm.model
    wrapped = prepare_model(model, options)
    reference = make_reference(model, options, rl.temperature) if rl.needs_reference else None  # TRL keeps none at beta 0
    trainable, total, base_bytes = _counts(model)
    before = evaluate_rewards(lm, val_prompts, val_ids, sources, rl, samples=rl.num_generations,
                              extra_stop_ids=stops) if val_prompts else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = RolloutLoader(lm, train_prompts, train_ids, sources, rl, reference=reference, seed=_rank_seed(options.seed),
                           samples_path=_writes_samples(out_dir), extra_stop_ids=stops)
    stats = {"records": len(train_prompts) + len(val_prompts), "examples": len(train_prompts), "truncated": 0,
             "skipped": 0, "validation": validation, "train_prompts": len(train_prompts),
             "val_prompts": len(val_prompts), "rollouts_per_step": rl.prompts_per_step * rl.num_generations}
    is_adapter = options.method != "full"
    config = _train_config(options, len(loader), 1e-5 if is_adapter else 1e-6)
    _plan(options, config, len(loader), stats, progress)
    save_fn = load_fn = None
    if is_adapter:
        save_fn, load_fn = _adapter_savers(base_name)
    objective = GRPOObjective(rl)
    trainer = Trainer(
        model, objective, loader, None, config, out_dir, tokenizer=lm.tokenizer, generation=lm.generation_config,
        progress=progress, save_model=save_fn, load_model_state=load_fn,
        run_config={"finetune": "grpo", "method": options.method, "prompts": str(prompts) if isinstance(
            prompts, (str, os.PathLike)) else f"{len(train_prompts)} prompts", "base_model": base_name,
            "rewards": [r if isinstance(r, str) else getattr(r, "__name__", "reward") for r in rewards],
            "rl": {k: v for k, v in vars(rl).items() if k != "reward_weights"} | {"reward_weights": list(
                rl.reward_weights) if rl.reward_weights else None}, "wrapped": wrapped},
    )
    objective.last_checkpoint = lambda: trainer.last_checkpoint
    if options.resume:
        trainer.resume()
    fit = trainer.fit()
    if trainer.world.is_main:
        plot_rewards(out_dir / "metrics.jsonl", out_dir / REWARD_PLOT_FILE)
    model.eval()
    after = evaluate_rewards(lm, val_prompts, val_ids, sources, rl, samples=rl.num_generations,
                             extra_stop_ids=stops) if val_prompts else {}
    output = _save_output(lm, model, options, out_dir, base_name)
    result = FinetuneResult(output=output, steps=fit.steps, data=stats, final_eval=fit.final_eval,
                            trainable_parameters=trainable, total_parameters=total, base_bytes=base_bytes,
                            extra={"held_out_before": before, "held_out_after": after,
                                   "reward_failures": {s.name: s.failures for s in sources}})
    _write_result(out_dir, result)
    return result


def finetune_ppo(lm, prompts: str | os.PathLike | Sequence[str], rewards: Sequence[str | Callable[[str, str], float]],
                 out_dir: str | os.PathLike, options: FinetuneOptions | None = None, rl: "PPOOptions | None" = None,
                 *, base_name: str | None = None,
                 progress: Callable[[str, dict[str, Any]], None] | None = None) -> FinetuneResult:
    """PPO with a value head on the policy, KL-penalised rewards and GAE (see `scribelm.finetune.ppo`)."""
    from scribelm.finetune.ppo import (
        VALUE_HEAD_FILE, PolicyWithValue, PPOObjective, PPOOptions, PPORolloutLoader, load_value_head,
        value_head_bytes,
    )

    options = options or FinetuneOptions()
    rl = rl or PPOOptions()
    out_dir = Path(out_dir)
    if lm.tokenizer is None:
        raise ScribeError("this model directory has no tokenizer; RL on text prompts needs tokenizer.json")
    device = _device(options)
    lm.model.to(device)
    sources = load_reward_sources(rewards, rl.reward_weights, device=device)
    chat = rl.chat if rl.chat is not None else bool((lm.generation_config or {}).get(CHAT_TUNED_KEY))
    train_prompts, val_prompts, validation = _prompts(lm, prompts, options)
    train_ids = _encode(lm, train_prompts, chat, rl.max_new_tokens)
    val_ids = _encode(lm, val_prompts, chat, rl.max_new_tokens)
    from scribelm.generate import chat_stop_ids

    stops = chat_stop_ids(lm.tokenizer) if chat else []
    policy = lm.model
    wrapped = prepare_model(policy, options)
    reference = make_reference(policy, options, rl.temperature)
    torch.manual_seed(options.seed)
    actor = PolicyWithValue(policy)
    trainable, total, base_bytes = _counts(actor)
    samples = 4
    before = evaluate_rewards(lm, val_prompts, val_ids, sources, rl, samples=samples,
                              extra_stop_ids=stops) if val_prompts else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = PPORolloutLoader(lm, actor, train_prompts, train_ids, sources, rl, reference=reference,
                              seed=_rank_seed(options.seed), samples_path=_writes_samples(out_dir),
                              extra_stop_ids=stops)
    stats = {"records": len(train_prompts) + len(val_prompts), "examples": len(train_prompts), "truncated": 0,
             "skipped": 0, "validation": validation, "train_prompts": len(train_prompts),
             "val_prompts": len(val_prompts), "rollouts_per_batch": rl.rollouts_per_batch}
    is_adapter = options.method != "full"
    config = _train_config(options, len(loader), 1e-5 if is_adapter else 1e-6)
    _plan(options, config, len(loader), stats, progress)
    save_adapter, load_adapter = _adapter_savers(base_name) if is_adapter else (None, None)

    def save(path: Path, module: torch.nn.Module, extra_files: dict[str, bytes | str]) -> None:
        files = {**extra_files, VALUE_HEAD_FILE: value_head_bytes(module)}
        if save_adapter is not None:
            save_adapter(path, module.policy, files)
        else:
            from scribelm.checkpoint import save_checkpoint

            save_checkpoint(path, module.policy, module.config, lm.tokenizer, lm.generation_config, files)

    def load(path: Path, module: torch.nn.Module) -> None:
        if load_adapter is not None:
            load_adapter(path, module.policy)
        else:
            from scribelm.train.checkpoints import copy_weights_into

            copy_weights_into(module.policy, Path(path))
        load_value_head(path, module)

    objective = PPOObjective(rl)
    trainer = Trainer(
        actor, objective, loader, None, config, out_dir, tokenizer=lm.tokenizer, generation=lm.generation_config,
        progress=progress, save_model=save, load_model_state=load,
        run_config={"finetune": "ppo", "method": options.method, "prompts": str(prompts) if isinstance(
            prompts, (str, os.PathLike)) else f"{len(train_prompts)} prompts", "base_model": base_name,
            "rewards": [r if isinstance(r, str) else getattr(r, "__name__", "reward") for r in rewards],
            "rl": {k: v for k, v in vars(rl).items() if k != "reward_weights"} | {"reward_weights": list(
                rl.reward_weights) if rl.reward_weights else None}, "wrapped": wrapped},
    )
    objective.last_checkpoint = lambda: trainer.last_checkpoint
    if options.resume:
        trainer.resume()
    fit = trainer.fit()
    if trainer.world.is_main:
        plot_rewards(out_dir / "metrics.jsonl", out_dir / REWARD_PLOT_FILE)
    actor.eval()
    after = evaluate_rewards(lm, val_prompts, val_ids, sources, rl, samples=samples,
                             extra_stop_ids=stops) if val_prompts else {}
    output = _save_output(lm, policy, options, out_dir, base_name)
    result = FinetuneResult(output=output, steps=fit.steps, data=stats, final_eval=fit.final_eval,
                            trainable_parameters=trainable, total_parameters=total, base_bytes=base_bytes,
                            extra={"held_out_before": before, "held_out_after": after, "kl_coef": loader.kl_coef,
                                   "reward_failures": {s.name: s.failures for s in sources}})
    _write_result(out_dir, result)
    return result
