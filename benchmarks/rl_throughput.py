"""GRPO throughput: scribelm against TRL's GRPOTrainer, same model, prompts, G and lengths.

    python benchmarks/rl_throughput.py                        # CPU, tiny model, one thread
    python benchmarks/rl_throughput.py --repeats 3                # alternate the sides 3 times: medians, ranges
    python benchmarks/rl_throughput.py --steps 12 --generations 8 --prompts-per-step 4 --new-tokens 64

One tiny Llama (random weights, a BPE tokenizer trained on a few sentences)
is built by scribelm and exported to Hugging Face, so both trainers start
from identical weights. Both run GRPO with the same settings: P prompts per
step, G completions each, up to `--new-tokens` new tokens (random weights
rarely sample EOS, so both run to about that length; the table shows the
completion tokens per step of each), β = 0, one optimizer step per
rollout batch, the same reward function. With β = 0 TRL keeps no
reference model and measures no KL; scribelm is run the same way
(`kl_every=0`; its default measures the KL on every batch, one more forward
pass of a reference per step, and `--kl-every 1` here shows that cost).

Reported for each side: rollout tokens/s (completion tokens over the time
spent generating them) and optimizer steps/s (whole steps: generation,
scoring, the loss, backward, AdamW), each the median over the steps after
the first, and the ratio scribelm / TRL. Rollouts are where the difference
comes from: scribelm samples all P·G rows in one batch through a
preallocated KV cache (`scribelm.generate.BatchGeneration`), drawing every
row's token in one batched inverse-CDF lookup and decoding each row's text
once at the end; TRL calls transformers' `generate`.

Every interval is timed twice: wall clock, and the process's CPU time. With
one thread per side the CPU time is the work itself, which on a shared,
loaded machine moves far less than the wall clock; both tables are printed.
`--repeats N` alternates the two sides N times and reports the median of
each ratio (and the range), so a change of load hits both sides alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

SENTENCES = [
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "In the beginning God created the heaven and the earth.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money.",
    "The quick brown fox jumps over the lazy dog.",
] * 25
PROMPTS = ["It was the", "In the beginning", "Call me", "The quick brown", "Some years ago", "the age of",
           "never mind how", "having little"]


def reward_length(prompt: str, completion: str) -> float:
    return float(len(completion))


def build(tmp: Path, args) -> tuple:
    import scribelm
    from scribelm.config import ModelConfig
    from scribelm.interop.hf.save import save_hf

    torch.manual_seed(0)
    tokenizer = scribelm.Tokenizer.train(SENTENCES, vocab_size=args.vocab, min_frequency=2)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=128, d_model=args.d_model, n_layers=args.layers,
                         n_heads=4, n_kv_heads=2, d_mlp=2 * args.d_model, activation="swiglu", norm="rmsnorm",
                         position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False, tie_embeddings=True,
                         name="bench-llama")
    lm = scribelm.LM(scribelm.Transformer(config).eval(), tokenizer)
    save_hf(lm, tmp / "hf")
    return lm, tmp / "hf"


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time), in seconds."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = now()
    return wall - t0[0], cpu - t0[1]


def run_scribelm(lm, tmp: Path, args) -> dict[str, dict[str, float]]:
    import scribelm.finetune.grpo as grpo
    from scribelm.finetune.grpo import GRPOOptions
    from scribelm.finetune.rl_run import finetune_grpo
    from scribelm.finetune.run import FinetuneOptions

    generation_s, tokens, step_times, last = [], [], [], [now()]
    sample_rollouts = grpo.sample_rollouts

    def timed_sample_rollouts(*a, **kw):
        t0 = now()
        rollouts = sample_rollouts(*a, **kw)
        generation_s.append(since(t0))
        tokens.append(int(rollouts.completion_lengths.sum()))
        return rollouts

    def progress(event, info):
        if event == "step":
            step_times.append(since(last[0]))
        if event in ("start", "step"):
            last[0] = now()

    grpo.sample_rollouts = timed_sample_rollouts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            finetune_grpo(lm, PROMPTS, [reward_length], tmp / "scribelm",
                          FinetuneOptions(max_steps=args.steps, lr=1e-5, warmup_steps=1, val_fraction=0, device="cpu"),
                          GRPOOptions(num_generations=args.generations, prompts_per_step=args.prompts_per_step,
                                      max_new_tokens=args.new_tokens, max_kl=None, sample_every=0, loss_type="dapo",
                                      kl_every=args.kl_every),
                          progress=progress)
    finally:
        grpo.sample_rollouts = sample_rollouts
    return summarise(generation_s, tokens, step_times)


def run_trl(hf_dir: Path, tmp: Path, args) -> dict[str, dict[str, float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    generation_s, tokens, step_times = [], [], []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            t0 = now()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            generation_s.append(since(t0))
            tokens.append(sum(len(c) for c in completion_ids))
            return completion_ids, logprobs

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = now()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(since(self.t0))

    def reward(completions, prompts, **kw):
        return [reward_length(p, c) for p, c in zip(prompts, completions)]

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS] * 50)
    config = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.prompts_per_step * args.generations,
                        num_generations=args.generations, max_completion_length=args.new_tokens, max_steps=args.steps,
                        learning_rate=1e-5, beta=0.0, loss_type="dapo", report_to=[], use_cpu=True, bf16=False,
                        logging_steps=10_000, save_strategy="no", dataloader_num_workers=0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        trainer = TimedGRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                                   processing_class=tokenizer, callbacks=[StepClock()])
        trainer.train()
    return summarise(generation_s, tokens, step_times)


def summarise(generation_s, tokens, step_times) -> dict[str, dict[str, float]]:
    """Per clock ("wall", "cpu"): medians over the steps after the first (which warms up)."""
    out = {}
    for k, clock in enumerate(("wall", "cpu")):
        rates = [n / s[k] for n, s in zip(tokens[1:], generation_s[1:])]
        out[clock] = {"rollout_tokens_per_s": statistics.median(rates),
                      "steps_per_s": 1 / statistics.median(s[k] for s in step_times[1:]),
                      "tokens_per_step": statistics.median(tokens)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kl-every", type=int, default=0,
                        help="scribelm's KL measurement at beta 0 (0: none, as TRL; 1: every batch, its default)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two sides this many times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []  # (scribelm, TRL) per repeat
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lm, hf_dir = build(tmp, args)
        initial = {k: v.clone() for k, v in lm.model.state_dict().items()}
        for r in range(args.repeats):
            lm.model.load_state_dict(initial)  # each repeat trains from the same weights
            trl = run_trl(hf_dir, tmp / f"r{r}", args)
            ours = run_scribelm(lm, tmp / f"r{r}", args)
            runs.append((ours, trl))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"GRPO, d_model {args.d_model}, {args.layers} layers, {args.prompts_per_step} prompts x G={args.generations}, "
          f"up to {args.new_tokens} new tokens, {args.steps} steps, {args.threads} thread(s), {args.repeats} repeat(s), "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    for clock, title in (("wall", "wall clock"), ("cpu", "process CPU time")):
        print(f"\n{title} (medians over repeats)")
        print(f"{'':24s}{'scribelm':>12s}{'TRL':>12s}{'ratio':>8s}   ratio range")
        for key, label in (("rollout_tokens_per_s", "rollout tokens/s"), ("steps_per_s", "optimizer steps/s"),
                           ("tokens_per_step", "completion tokens/step")):
            ours = statistics.median(o[clock][key] for o, _ in runs)
            theirs = statistics.median(t[clock][key] for _, t in runs)
            ratios = [o[clock][key] / t[clock][key] for o, t in runs]
            print(f"{label:24s}{ours:12.2f}{theirs:12.2f}{statistics.median(ratios):8.2f}x"
                  f"   {min(ratios):.2f}-{max(ratios):.2f}x")


if __name__ == "__main__":
    main()
