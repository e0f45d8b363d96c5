"""`scribe finetune grpo|ppo POLICY --prompts prompts.jsonl --reward REWARD -o OUT`: RL from rewards.

    scribe finetune grpo my-model --prompts prompts.jsonl --reward my_rewards:ends_with_full_stop -o runs/grpo
    scribe finetune grpo my-model --prompts p.jsonl --reward runs/rm/model --reward mod:fn --reward-weights 1,0.2 -o OUT
    scribe finetune ppo  my-model --prompts p.jsonl --reward mod:fn -o runs/ppo [--lora]

REWARD is `module:function` or `file.py:function` taking (prompt, completion)
text and returning a number, or a reward model saved by `scribe finetune
reward`; repeat --reward to sum several (weights with --reward-weights).
OUT gets the Trainer's checkpoints (resume with --resume), metrics.jsonl
(reward mean/std, KL, entropy, clip fraction, lengths per step), loss.png,
samples.jsonl and the result: OUT/model (full) or OUT/adapter (--lora).
"""

from __future__ import annotations

import argparse


def _rl_arguments(p, common, lora) -> None:
    common(p, "--prompts", 'JSONL prompts file: {"prompt": "..."} per line')
    lora(p, optional=True)
    p.add_argument("--reward", action="append", required=True, metavar="REWARD",
                   help="module:function, file.py:function or a reward-model directory (repeat to sum several)")
    p.add_argument("--reward-weights", type=lambda s: [float(x) for x in s.split(",")],
                   help="comma-separated weights, one per --reward (default: 1 each)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts sampled per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-kl", type=float, default=10.0,
                   help="stop (keeping the last good checkpoint) when the mean per-token KL to the reference exceeds this")
    p.add_argument("--sample-every", type=int, default=10, help="steps between completions written to samples.jsonl")
    p.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                   help="render prompts with the chat template (auto: if the model is chat-tuned)")


def register_rl(verbs, common, lora, run_and_report) -> None:
    """Add grpo and ppo; `common`, `lora` and `run_and_report` are the shared pieces of `cli/finetune.py`."""
    grpo = verbs.add_parser("grpo", help="GRPO: G sampled completions per prompt, rewarded against their group",
                            formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    _rl_arguments(grpo, common, lora)
    grpo.add_argument("--num-generations", "-G", type=int, default=4, help="completions per prompt (G)")
    grpo.add_argument("--beta", type=float, default=0.0, help="KL coefficient in the loss (0: KL only measured)")
    grpo.add_argument("--kl-every", type=int, default=1,
                      help="with --beta 0: measure the KL to the reference on every N-th batch (0: never, and no "
                           "reference is kept; each measurement is a forward pass of the reference)")
    grpo.add_argument("--epsilon", type=float, default=0.2, help="clip range of the probability ratio")
    grpo.add_argument("--epsilon-high", type=float, help="upper clip (DAPO's clip-higher); default: --epsilon")
    grpo.add_argument("--loss-type", choices=("grpo", "bnpo", "dr_grpo", "dapo"), default="dapo",
                      help="how per-token losses are averaged (as in TRL)")
    grpo.add_argument("--scale-rewards", choices=("group", "batch", "none"), default="group",
                      help="divide advantages by the group's std, the batch's, or not at all (Dr. GRPO)")
    grpo.add_argument("--iterations", type=int, default=1, help="optimizer steps on each batch of rollouts (μ)")
    grpo.set_defaults(handler=run_grpo, method="full", run_and_report=run_and_report)
    register_ppo(verbs, common, lora, run_and_report)


def register_ppo(verbs, common, lora, run_and_report) -> None:
    ppo = verbs.add_parser("ppo", help="PPO: value head, KL-penalised reward, GAE, clipped losses over minibatch epochs",
                           formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    _rl_arguments(ppo, common, lora)
    ppo.add_argument("--rollouts", type=int, default=16, help="completions per rollout batch")
    ppo.add_argument("--minibatches", type=int, default=2, help="minibatches per epoch (each one optimizer step)")
    ppo.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout batch")
    ppo.add_argument("--kl-coef", type=float, default=0.05, help="β: per-token KL penalty in the reward")
    ppo.add_argument("--kl-target", type=float, help="adaptive β tracking this KL per sequence (default: fixed β)")
    ppo.add_argument("--gamma", type=float, default=1.0, help="discount γ")
    ppo.add_argument("--lam", type=float, default=0.95, help="GAE λ")
    ppo.add_argument("--clip", type=float, default=0.2, help="policy ratio clip ε")
    ppo.add_argument("--clip-value", type=float, default=0.2, help="value clip ε_v")
    ppo.add_argument("--value-coef", type=float, default=0.1, help="weight of the value loss")
    ppo.set_defaults(handler=run_ppo, method="full", run_and_report=run_and_report)


def run_ppo(args) -> int:
    import functools

    from scribelm.cli.common import console
    from scribelm.finetune.ppo import PPOOptions
    from scribelm.finetune.rl_run import finetune_ppo

    rl = PPOOptions(rollouts_per_batch=args.rollouts, minibatches=args.minibatches, ppo_epochs=args.ppo_epochs,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, kl_coef=args.kl_coef, kl_target=args.kl_target, gamma=args.gamma,
                    lam=args.lam, clip=args.clip, clip_value=args.clip_value, value_coef=args.value_coef,
                    max_kl=args.max_kl, sample_every=args.sample_every, chat=_chat(args),
                    reward_weights=args.reward_weights)

    def ppo(lm, prompts, out_dir, options, **kwargs):
        return finetune_ppo(lm, prompts, args.reward, out_dir, options, rl, **kwargs)

    result, _ = args.run_and_report(functools.update_wrapper(ppo, finetune_ppo), args)
    _report_rewards(console, result)
    return 0


def _chat(args) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.chat]


def run_grpo(args) -> int:
    import functools

    from scribelm.cli.common import console
    from scribelm.finetune.grpo import GRPOOptions
    from scribelm.finetune.rl_run import finetune_grpo

    rl = GRPOOptions(num_generations=args.num_generations, prompts_per_step=args.prompts_per_step,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k, beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
                     loss_type=args.loss_type, scale_rewards=args.scale_rewards, iterations=args.iterations,
                     max_kl=args.max_kl, kl_every=args.kl_every, sample_every=args.sample_every, chat=_chat(args),
                     reward_weights=args.reward_weights)

    def grpo(lm, prompts, out_dir, options, **kwargs):
        return finetune_grpo(lm, prompts, args.reward, out_dir, options, rl, **kwargs)

    result, _ = args.run_and_report(functools.update_wrapper(grpo, finetune_grpo), args)
    _report_rewards(console, result)
    return 0


def _report_rewards(console, result) -> None:
    before, after = result.extra.get("held_out_before"), result.extra.get("held_out_after")
    if after:
        console.print(f"held-out reward ({int(after['completions'])} completions): {before['reward_mean']:.4f} "
                      f"± {before['reward_std']:.4f} -> {after['reward_mean']:.4f} ± {after['reward_std']:.4f}; "
                      f"mean length {before['completion_length']:.1f} -> {after['completion_length']:.1f} tokens")
    failures = {k: v for k, v in result.extra.get("reward_failures", {}).items() if v}
    if failures:
        console.print("completions a reward could not score (skipped): "
                      + ", ".join(f"{k} {v}" for k, v in failures.items()))
    console.print(f"wrote {result.output}")
