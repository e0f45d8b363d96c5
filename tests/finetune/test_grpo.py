"""GRPO end to end on the shared Trainer: a tiny model trained on the King James Bible learns to end
a sentence within 16 tokens (a reward anyone can check), and bad input fails as it should."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import scribelm
from scribelm.errors import ConfigError, ScribeError
from scribelm.finetune.grpo import GRPOOptions
from scribelm.finetune.rl_run import finetune_grpo
from scribelm.finetune.run import FinetuneOptions
from scribelm.train.config import TrainingDiverged
from tests.trained_tiny import corpus, trained_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def ends_a_sentence(prompt: str, completion: str) -> float:
    return 1.0 if "." in completion else 0.0


def verse_openings(n=60):
    _, held_out = corpus()
    return [" ".join(verse.split()[:4]) for verse in held_out.splitlines()[:n]]


def fresh_policy():
    lm = trained_lm("llama")
    return scribelm.LM(_copy(lm.model), lm.tokenizer)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def run(tmp_path, rewards, steps, prompts=None, rl=None, **options):
    settings = dict(max_steps=steps, lr=3e-4, warmup_steps=2, val_fraction=0.3, seed=0) | options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return finetune_grpo(fresh_policy(), prompts or verse_openings(), rewards, tmp_path / "run",
                             FinetuneOptions(**settings),
                             rl or GRPOOptions(num_generations=8, prompts_per_step=4, max_new_tokens=16, sample_every=5))


def test_grpo_raises_held_out_reward_with_bounded_kl(tmp_path):
    result = run(tmp_path, [ends_a_sentence], steps=30)
    before, after = result.extra["held_out_before"], result.extra["held_out_after"]
    assert before["completions"] == 18 * 8
    assert after["reward_mean"] > before["reward_mean"] + 0.3, (before, after)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_fraction", "completion_length", "reward_failed"):
        assert key in steps[-1], key
    assert max(s["kl"] for s in steps) < 1.0
    assert steps[-1]["reward_mean"] > steps[0]["reward_mean"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "group_rewards"} <= set(samples[0])
    assert (tmp_path / "run" / "rewards.png").stat().st_size > 0
    tuned = scribelm.load(result.output)
    assert tuned.generate("And God said", max_new_tokens=4, temperature=0)


def test_kl_is_measured_every_n_batches_or_never(tmp_path, monkeypatch):
    import scribelm.finetune.rl_run as rl_run

    made = []
    real = rl_run.make_reference
    monkeypatch.setattr(rl_run, "make_reference", lambda *a, **k: made.append(1) or real(*a, **k))
    options = dict(num_generations=4, prompts_per_step=2, max_new_tokens=8, sample_every=0)
    run(tmp_path / "third", [ends_a_sentence], steps=6, rl=GRPOOptions(kl_every=3, **options), val_fraction=0)
    steps = [json.loads(line) for line in (tmp_path / "third" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["kl" in s for s in steps] == [True, False, False, True, False, False]
    run(tmp_path / "never", [ends_a_sentence], steps=3, rl=GRPOOptions(kl_every=0, **options), val_fraction=0)
    steps = [json.loads(line) for line in (tmp_path / "never" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and not any("kl" in s for s in steps)
    assert made == [1]  # the run that never measures keeps no reference
    with pytest.raises(ConfigError):
        GRPOOptions(kl_every=-1)


def test_lora_policy_with_kl_in_the_loss_and_several_iterations(tmp_path):
    from scribelm.adapters.lora import LoRAConfig

    rl = GRPOOptions(num_generations=4, prompts_per_step=2, max_new_tokens=8, beta=0.04, iterations=2,
                     epsilon_high=0.28, loss_type="grpo")
    result = run(tmp_path, [ends_a_sentence], steps=4, rl=rl, method="lora", lr=5e-3,
                 lora=LoRAConfig(rank=4, targets="all-linear"))
    assert result.output.name == "adapter"
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start as a no-op: the policy is the reference
    assert steps[1]["kl"] > 0 and any(s["clip_fraction"] > 0 for s in steps[1::2])  # 2nd pass over the same rollouts


def test_a_reward_that_fails_is_skipped_and_counted_and_stops_the_run_when_most_fail(tmp_path):
    def sometimes(prompt, completion):
        if len(completion) % 4 == 0:  # about a quarter of the completions
            return float("nan") if len(completion) % 8 else 1 / 0
        return 1.0 if "." in completion else 0.0

    result = run(tmp_path / "a", [sometimes], steps=2, val_fraction=0)
    assert result.extra["reward_failures"]["sometimes"] > 0
    steps = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(s["reward_failed"] for s in steps) > 0

    def always(prompt, completion):
        raise RuntimeError("no judge")

    with pytest.raises(ScribeError, match="could not be scored.*RuntimeError: no judge"):
        run(tmp_path / "b", [always], steps=2, val_fraction=0)


def test_empty_prompts_and_an_exploding_kl_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ScribeError, match="no prompts"):
        finetune_grpo(fresh_policy(), empty, [ends_a_sentence], tmp_path / "run")
    rl = GRPOOptions(num_generations=4, prompts_per_step=2, max_new_tokens=8, max_kl=1e-4)
    with pytest.raises(TrainingDiverged, match="KL to the reference.*last good checkpoint is .*step-0000000"):
        run(tmp_path / "kl", [ends_a_sentence], steps=10, rl=rl, lr=3e-3, checkpoint_every=1, val_fraction=0)
    assert any((tmp_path / "kl" / "run" / "checkpoints").iterdir())


def test_a_reward_model_with_another_tokenizer_scores_the_text(tmp_path, tokenizer):
    from scribelm.finetune.reward import RewardModel, save_reward_model
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    reward_model = RewardModel(scribelm.Transformer(tiny_config()))  # vocabulary 400; the policy's is 512
    save_reward_model(tmp_path / "rm", reward_model, tokenizer)
    result = run(tmp_path, [str(tmp_path / "rm"), ends_a_sentence], steps=2, val_fraction=0,
                 rl=GRPOOptions(num_generations=4, prompts_per_step=2, max_new_tokens=8, reward_weights=[0.5, 1.0]))
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(s["reward_failed"] == 0 and s["reward_std"] > 0 for s in steps)
    assert "reward_rm" in steps[0] and "reward_ends_a_sentence" in steps[0]
    assert result.steps == 2


def test_cli_grpo_with_a_reward_file(tmp_path, capsys):
    from scribelm.checkpoint import save_checkpoint
    from scribelm.cli import main

    lm = trained_lm("llama")
    save_checkpoint(tmp_path / "policy", lm.model, lm.config, lm.tokenizer)
    (tmp_path / "rewards.py").write_text("def full_stop(prompt, completion):\n    return float('.' in completion)\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in verse_openings(12)))
    base = ["finetune", "grpo", str(tmp_path / "policy"), "--reward", f"{tmp_path / 'rewards.py'}:full_stop",
            "--max-steps", "2", "-G", "4", "--prompts-per-step", "2", "--max-new-tokens", "8", "--lr", "1e-4"]
    assert main(base + ["--prompts", str(prompts), "-o", str(tmp_path / "run")]) == 0
    assert "held-out reward" in capsys.readouterr().out and (tmp_path / "run" / "model").is_dir()
    (tmp_path / "none.jsonl").write_text("")
    assert main(base + ["--prompts", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "no prompts" in err and "Traceback" not in err
    assert main(base[:4] + ["nomodule:fn", "--prompts", str(prompts), "-o", str(tmp_path / "run3")]) == 2
    assert "cannot import nomodule" in capsys.readouterr().err


def test_rollouts_lay_out_what_generation_samples_and_the_logps_need_no_entropy():
    from scribelm.finetune.rollouts import completion_logps, completion_token_logps, sample_rollouts
    from scribelm.generate import BatchGeneration
    from scribelm.sampling import SamplingSettings

    lm = fresh_policy()
    prompts = [lm.tokenizer.encode(p) for p in verse_openings(3) for _ in range(4)]
    settings = SamplingSettings(max_new_tokens=12, temperature=1.3)
    rollouts = sample_rollouts(lm.model, lm.tokenizer, prompts, settings, seed=7)
    alone = [BatchGeneration(lm.model, lm.tokenizer, [p], settings.replace(seed=7 + i)).run()[0]
             for i, p in enumerate(prompts)]  # each row is what its own seed samples alone
    assert rollouts.completion_texts == [c.text for c in alone]
    for b, (p, c) in enumerate(zip(prompts, alone)):
        assert rollouts.ids[b, : len(p) + len(c.token_ids)].tolist() == p + c.token_ids
        assert rollouts.targets[b][rollouts.mask[b]].tolist() == c.token_ids
    assert len(set(rollouts.completion_texts)) > 6
    with torch.no_grad():
        logps, _ = completion_token_logps(lm.model, rollouts.ids, rollouts.targets, 1.3)
        assert torch.equal(completion_logps(lm.model, rollouts.ids, rollouts.targets, 1.3), logps)
