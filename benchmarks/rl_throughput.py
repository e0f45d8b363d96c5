"""GRPO throughput: scribelm against TRL's GRPOTrainer, same model, prompts, G and lengths.

    python benchmarks/rl_throughput.py                        # CPU, tiny model, one thread
    python benchmarks/rl_throughput.py --steps 12 --generations 8 --prompts-per-step 4 --new-tokens 64

One tiny Llama (random weights, a BPE tokenizer trained on a few sentences)
is built by scribelm and exported to Hugging Face, so both trainers start
from identical weights. Both run GRPO with the same settings: P prompts per
step, G completions each, up to `--new-tokens` new tokens (random weights
rarely sample EOS, so both run to about that length; the table shows the
completion tokens per step of each), β = 0, one optimizer step per
rollout batch, the same reward function. (With β = 0 TRL skips the
reference model; scribelm still runs it once per batch to log the KL, so
its steps carry one extra forward pass.)

Reported for each side: rollout tokens/s (completion tokens over the time
spent generating them) and optimizer steps/s (whole steps: generation,
scoring, the loss, backward, AdamW), each the median over the steps after
the first, and the ratio scribelm / TRL. Rollouts are where the difference
comes from: scribelm samples all P·G rows in one batch through a
preallocated KV cache (`scribelm.generate.BatchGeneration`); TRL calls
transformers' `generate`.
"""

from __future__ import annotations

import argparse
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


def run_scribelm(lm, tmp: Path, args) -> dict[str, float]:
    import json

    from scribelm.finetune.grpo import GRPOOptions
    from scribelm.finetune.rl_run import finetune_grpo
    from scribelm.finetune.run import FinetuneOptions

    step_times, last = [], [0.0]

    def progress(event, info):
        now = time.perf_counter()
        if event == "step":
            step_times.append(now - last[0])
        if event in ("start", "step"):
            last[0] = now

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune_grpo(lm, PROMPTS, [reward_length], tmp / "scribelm",
                      FinetuneOptions(max_steps=args.steps, lr=1e-5, warmup_steps=1, val_fraction=0, device="cpu"),
                      GRPOOptions(num_generations=args.generations, prompts_per_step=args.prompts_per_step,
                                  max_new_tokens=args.new_tokens, max_kl=None, sample_every=0, loss_type="dapo"),
                      progress=progress)
    steps = [json.loads(line) for line in (tmp / "scribelm" / "metrics.jsonl").read_text().splitlines()]
    tokens = [s["completion_length"] * args.prompts_per_step * args.generations for s in steps]
    generation_s = [n / s["rollout_tokens_per_s"] for n, s in zip(tokens, steps)]
    return summarise(generation_s, tokens, step_times)


def run_trl(hf_dir: Path, tmp: Path, args) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    generation_s, tokens, step_times = [], [], []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            generation_s.append(time.perf_counter() - t0)
            tokens.append(sum(len(c) for c in completion_ids))
            return completion_ids, logprobs

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

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
        trainer = TimedGRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                                   processing_class=tokenizer, callbacks=[StepClock()])
        trainer.train()
    return summarise(generation_s, tokens, step_times)


def summarise(generation_s, tokens, step_times) -> dict[str, float]:
    rates = [n / s for n, s in zip(tokens[1:], generation_s[1:])]  # the first step warms up
    return {"rollout_tokens_per_s": statistics.median(rates), "steps_per_s": 1 / statistics.median(step_times[1:]),
            "tokens_per_step": statistics.median(tokens)}


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lm, hf_dir = build(tmp, args)
        trl = run_trl(hf_dir, tmp, args)
        ours = run_scribelm(lm, tmp, args)
    print(f"GRPO, d_model {args.d_model}, {args.layers} layers, {args.prompts_per_step} prompts x G={args.generations}, "
          f"up to {args.new_tokens} new tokens, {args.steps} steps, {args.threads} thread(s)")
    print(f"{'':24s}{'scribelm':>12s}{'TRL':>12s}{'ratio':>8s}")
    for key, label in (("rollout_tokens_per_s", "rollout tokens/s"), ("steps_per_s", "optimizer steps/s"),
                       ("tokens_per_step", "completion tokens/step")):
        print(f"{label:24s}{ours[key]:12.2f}{trl[key]:12.2f}{ours[key] / trl[key]:8.2f}x")


if __name__ == "__main__":
    main()
