"""`scribe finetune sft|lora|dpo|reward|grpo MODEL ...`: adapt a model to chat data, preferences or rewards.

    scribe finetune sft  my-model --data chat.jsonl -o runs/sft           # all weights train
    scribe finetune lora my-model --data chat.jsonl -o runs/lora --rank 16 --targets all-linear
    scribe finetune lora my-model --data chat.jsonl -o runs/qlora --quantize nf4
    scribe finetune dpo  my-model --data prefs.jsonl -o runs/dpo --beta 0.1 [--lora]
    scribe finetune reward my-model --data prefs.jsonl -o runs/rm            # a reward model
    scribe finetune grpo my-model --prompts prompts.jsonl --reward mod:fn -o runs/grpo   (cli/finetune_rl.py)

MODEL is a scribelm checkpoint or a Hugging Face model directory. OUT gets
the Trainer's checkpoints (resume with --resume), metrics.jsonl, loss.png,
and the result: OUT/model (full) or OUT/adapter (LoRA; merge it with
`scribe convert BASE DST --merge-lora OUT/adapter`).
"""

from __future__ import annotations

import warnings

from scribelm.cli.common import console, err_console, human_bytes, human_count


def _common(p, data_flag: str = "--data", data_help: str = "JSONL training file") -> None:
    p.add_argument("model", help="scribelm checkpoint or Hugging Face model directory")
    p.add_argument(data_flag, dest="data", required=True, help=data_help)
    p.add_argument("-o", "--output", required=True, help="run directory (checkpoints, metrics, result)")
    p.add_argument("--val-data", help="JSONL validation file (default: hold out --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out when no --val-data (0: none)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default: SFT 2e-5, LoRA 2e-4, DPO 1e-6, DPO+LoRA 5e-6; tiny models want more)")
    p.add_argument("--warmup-steps", type=int, help="default: 5%% of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-length", type=int, help="tokens per example (default: the model's context)")
    p.add_argument("--overflow", choices=("truncate", "skip", "error"), default="truncate",
                   help="what to do with examples longer than --max-length (counted in the report)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--force", action="store_true",
                   help="start over in OUT if it holds an earlier fine-tune run (a directory with other files is never cleared)")


def _lora(p, optional: bool = False) -> None:
    if optional:
        p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/r)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default="attention-qv",
                   help="attention-qv | attention | mlp | all-linear | comma-separated layer names or globs")
    p.add_argument("--quantize", choices=("none", "nf4", "sym4", "int4"), default="none",
                   help="QLoRA: hold the frozen base in 4 bits (nf4 or sym4; int4 is sym4's earlier name)")
    p.add_argument("--group-size", type=int, default=64, help="4-bit quantization group size")
    p.add_argument("--peft", action="store_true",
                   help="also write the adapters in peft's format to OUT/adapter-peft (Llama, Mistral, Qwen2 bases)")


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tuning: SFT (full, LoRA, QLoRA), DPO, reward models, PPO and GRPO")
    verbs = p.add_subparsers(dest="finetune_verb", metavar="METHOD", required=True)

    sft = verbs.add_parser("sft", help="supervised fine-tuning of all weights on chat / instruction data")
    _common(sft)
    p_no_pack(sft)
    sft.set_defaults(handler=run_sft, method="full")

    lora = verbs.add_parser("lora", help="LoRA (or QLoRA with --quantize nf4) on chat / instruction data")
    _common(lora)
    p_no_pack(lora)
    _lora(lora)
    lora.set_defaults(handler=run_sft, method="lora")

    dpo = verbs.add_parser("dpo", help="preference tuning (DPO) on {prompt, chosen, rejected} data")
    _common(dpo)
    _lora(dpo, optional=True)
    dpo.add_argument("--beta", type=float, default=0.1, help="strength of the tether to the reference")
    dpo.add_argument("--reference", choices=("precomputed", "model"), default="precomputed",
                     help="precomputed: run the reference once before training (saves memory); "
                          "model: keep a frozen copy (with --lora: the base without adapters)")
    dpo.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO: assumed share of flipped labels")
    dpo.set_defaults(handler=run_dpo, method="full")

    reward = verbs.add_parser("reward", help="a reward model (scalar head, Bradley–Terry loss) on {prompt, chosen, "
                                             "rejected[, margin]} data")
    _common(reward)
    reward.add_argument("--center-rewards", type=float, default=None, metavar="C",
                        help="add C·mean((r_chosen + r_rejected)²) to keep scores near zero (e.g. 0.01)")
    reward.add_argument("--export-hf", metavar="DIR",
                        help="also write a Hugging Face …ForSequenceClassification (num_labels 1) directory")
    reward.set_defaults(handler=run_reward, method="full")
    from scribelm.cli.finetune_rl import register_rl

    register_rl(verbs, _common, _lora, _run_and_report)


def p_no_pack(p) -> None:
    p.add_argument("--no-pack", action="store_true", help="one example per row instead of packing several")


def _options(args):
    from scribelm.adapters.lora import LoRAConfig
    from scribelm.finetune.run import FinetuneOptions

    method = args.method
    if getattr(args, "lora", False):
        method = "lora"
    if method == "lora" and getattr(args, "quantize", "none") != "none":
        method = "qlora"
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, targets=args.targets) \
        if method != "full" else LoRAConfig()
    return FinetuneOptions(
        method=method, lora=lora, quant=getattr(args, "quantize", "nf4") if method == "qlora" else "nf4",
        quant_group_size=getattr(args, "group_size", 64), epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum_steps=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_length=args.max_length, pack=not getattr(args, "no_pack", False),
        overflow=args.overflow, val_data=args.val_data, val_fraction=args.val_fraction, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, precision=args.precision, device=args.device,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, resume=args.resume,
        beta=getattr(args, "beta", 0.1), reference=getattr(args, "reference", "precomputed"),
        label_smoothing=getattr(args, "label_smoothing", 0.0), export_peft=getattr(args, "peft", False),
    )


class _Progress:
    """Trainer events as a progress bar, with the loss printed as it goes (every step of a short
    run; about ten lines of a long one, each the mean over its steps, so the curve is not lost
    in one batch's noise), the validations, and the curve's two ends at the close."""

    LINES = 10

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]finetune"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            transient=True)
        self.task = None
        self.every = 1
        self.max_steps = 0
        self.window: list[tuple[int, float]] = []  # (step, loss) since the last printed line
        self.points: list[tuple[int, int, float]] = []  # printed: (first step, last step, mean loss)
        self.shown_eval_step: int | None = None
        self.started = False

    def __call__(self, event: str, info: dict) -> None:
        if event == "plan":
            _report_data(info)
            console.print(f"validation: {info['validation']}", markup=False)
        elif event == "start":
            self.max_steps = info.get("max_steps") or 0
            self.every = max(1, round(self.max_steps / self.LINES))
            if console.is_terminal:  # a bar drawn into a pipe or file is only noise (and a blank line)
                self.bar.start()
                self.started = True
            self.task = self.bar.add_task("train", total=info.get("max_steps"), completed=info.get("step", 0), info="")
        elif event == "step" and self.task is not None:
            step = info["step"]
            self.window.append((step, info["loss"]))
            self.bar.update(self.task, completed=step, info=f"loss {info['loss']:.4f}  {info['tokens_per_s']:.0f} tok/s")
            if step % self.every == 0 or step == self.max_steps:
                first = self.window[0][0]
                mean = sum(loss for _, loss in self.window) / len(self.window)
                self.points.append((first, step, mean))
                self.window = []
                over = f" (mean of steps {first}-{step})" if first != step else ""
                self.bar.console.print(f"step {step}/{self.max_steps}: loss {mean:.4f}{over}, lr {info['lr']:.2e}, "
                                       f"{info['tokens_per_s']:.0f} tokens/s", markup=False)
        elif event == "eval":
            self.shown_eval_step = info["step"]
            self.bar.console.print(f"step {info['step']}: validation loss {info.get('val_loss', float('nan')):.4f}")
        elif event == "end" and self.started:
            self.bar.stop()

    def summary(self) -> str | None:
        if not self.points:
            return None

        def label(point: tuple[int, int, float]) -> str:
            first, last, mean = point
            return f"{mean:.4f} (step{'s' if first != last else ''} {first}{'-' + str(last) if first != last else ''})"

        return f"training loss {label(self.points[0])} -> {label(self.points[-1])}"


def _load(args):
    import scribelm

    return scribelm.load(args.model)


def _report_data(stats: dict) -> None:
    console.print(
        f"data: {stats.get('examples', 0)} examples used of {stats.get('records', 0)} records"
        f" ({stats.get('truncated', 0)} truncated, {stats.get('skipped', 0)} skipped as too long)"
        + (f"; packing fills {100 * stats['packing_fill']:.1f}% of each row" if "packing_fill" in stats else "")
    )


def _report_model(result) -> None:
    frozen = f"; frozen weights take {human_bytes(result.base_bytes)}" if result.base_bytes else ""
    console.print(
        f"trained {human_count(result.trainable_parameters)} of {human_count(result.total_parameters)} parameters"
        f" ({100 * result.trainable_parameters / max(result.total_parameters, 1):.2f}%){frozen}"
    )


def _run_and_report(finetune, args):
    """Run a fine-tuning function with warnings shown as one-line messages when they arise,
    then report the model and the loss."""
    from scribelm.finetune.run import RESULT_FILE
    from scribelm.io import claim_growing_directory
    from scribelm.train.checkpoints import BEST_DIR, CHECKPOINTS_DIR
    from scribelm.train.metrics import METRICS_FILE, PLOT_FILE

    options = _options(args)
    # Before loading the model: a refused OUT should cost nothing. Lists what a run writes there.
    claim_growing_directory(args.output, kind="fine-tune run", force=args.force, resume=args.resume,
                            force_flag="--force (or --resume to continue it)",
                            entries=[CHECKPOINTS_DIR, BEST_DIR, METRICS_FILE, PLOT_FILE, "tensorboard", RESULT_FILE,
                                     "model", "adapter", "adapter-peft", "samples.jsonl", "rewards.png"])
    lm = _load(args)
    progress = _Progress()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        err_console.print(f"warning: {message}", markup=False, soft_wrap=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        result = finetune(lm, args.data, args.output, options, base_name=args.model, progress=progress)
    _report_model(result)
    summary = progress.summary()
    if summary:
        console.print(f"{summary}; the curve: {args.output}/loss.png", markup=False)
    return result, progress


def run_sft(args) -> int:
    from scribelm.finetune.run import finetune_sft

    result, progress = _run_and_report(finetune_sft, args)
    if result.final_eval.get("val_loss") is not None and progress.shown_eval_step != result.steps:
        console.print(f"validation loss {result.final_eval['val_loss']:.4f} after {result.steps} steps")
    console.print(f"wrote {result.output}")
    return 0


def run_dpo(args) -> int:
    from scribelm.finetune.run import finetune_dpo

    result, _ = _run_and_report(finetune_dpo, args)
    before, after = result.extra.get("held_out_before"), result.extra.get("held_out_after")
    if after:
        console.print(
            f"held-out pairs ({int(after['pairs'])}): reward margin {before['reward_margin']:+.4f} -> "
            f"{after['reward_margin']:+.4f}, accuracy {100 * before['reward_accuracy']:.1f}% -> "
            f"{100 * after['reward_accuracy']:.1f}%, loss {before['loss']:.4f} -> {after['loss']:.4f}"
        )
    console.print(f"wrote {result.output}")
    return 0


def run_reward(args) -> int:
    import functools

    from scribelm.finetune.reward_run import finetune_reward

    result, _ = _run_and_report(functools.partial(finetune_reward, center_coefficient=args.center_rewards), args)
    before, after = result.extra.get("held_out_before"), result.extra.get("held_out_after")
    if after:
        console.print(
            f"held-out pairs ({int(after['pairs'])}): pairwise accuracy {100 * before['accuracy']:.1f}% -> "
            f"{100 * after['accuracy']:.1f}%, mean margin {before['reward_margin']:+.4f} -> "
            f"{after['reward_margin']:+.4f}, loss {before['loss']:.4f} -> {after['loss']:.4f}"
        )
    console.print(f"wrote {result.output} (a reward model: a checkpoint with reward_head.safetensors beside it)")
    if args.export_hf:
        from scribelm.finetune.reward import export_reward_hf, load_reward_model

        model, tokenizer = load_reward_model(result.output)
        console.print(f"wrote {export_reward_hf(model, tokenizer, args.export_hf)} (transformers "
                      "AutoModelForSequenceClassification)")
    return 0
