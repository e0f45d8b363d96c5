"""PPO end to end on the shared Trainer: the same sentence-ending task as GRPO, with a value head,
KL in the reward (fixed and adaptive), LoRA, resume, and the CLI."""

from __future__ import annotations

import json
import warnings

import pytest

import scribelm
from scribelm.finetune.ppo import PPOOptions
from scribelm.finetune.rl_run import finetune_ppo
from scribelm.finetune.run import FinetuneOptions
from tests.finetune.test_grpo import ends_a_sentence, fresh_policy, verse_openings
from tests.trained_tiny import trained_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, steps, rl=None, lm=None, progress=None, **options):
    settings = dict(max_steps=steps, lr=1e-3, warmup_steps=2, val_fraction=0.3, seed=0) | options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return finetune_ppo(lm or fresh_policy(), verse_openings(), [ends_a_sentence], tmp_path / "run",
                            FinetuneOptions(**settings), rl or PPOOptions(max_new_tokens=16, sample_every=5),
                            progress=progress)


class Interrupted(Exception):
    pass


def interrupt_at(step):
    def progress(event, info):
        if event == "step" and info["step"] == step:
            raise Interrupted  # after that step's update, before its checkpoint: as a killed run
    return progress


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_held_out_reward_with_bounded_kl(tmp_path):
    result = run(tmp_path, steps=60)
    before, after = result.extra["held_out_before"], result.extra["held_out_after"]
    assert after["reward_mean"] > before["reward_mean"] + 0.3, (before, after)
    steps = metrics(tmp_path)
    for key in ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss",
                "policy_loss", "value_clip_fraction", "approx_kl", "completion_length"):
        assert key in steps[-1], key
    assert max(s["kl"] for s in steps) < 2.0
    assert any(s["clip_fraction"] > 0 for s in steps)  # later minibatch epochs move past the clip
    assert (tmp_path / "run" / "samples.jsonl").is_file()
    assert scribelm.load(result.output).generate("And God said", max_new_tokens=4, temperature=0)


def test_adaptive_kl_lora_and_exact_resume(tmp_path):
    from scribelm.adapters.lora import LoRAConfig

    def options(**kw):
        return dict(method="lora", lora=LoRAConfig(rank=4, targets="all-linear"), lr=3e-3, val_fraction=0,
                    checkpoint_every=4) | kw

    rl = PPOOptions(rollouts_per_batch=8, minibatches=2, ppo_epochs=2, max_new_tokens=8, kl_coef=0.2, kl_target=0.01,
                    kl_horizon=100)
    straight = run(tmp_path / "a", steps=8, rl=rl, **options())
    assert straight.output.name == "adapter" and straight.extra["kl_coef"] != 0.2  # β moved toward the target
    with pytest.raises(Interrupted):  # killed during step 6; the checkpoint of step 4 is the last one
        run(tmp_path / "b", steps=8, rl=rl, progress=interrupt_at(6), **options())
    resumed = run(tmp_path / "b", steps=8, rl=rl, **options(resume=True))
    assert resumed.steps == 8
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [s["step"] for s in b] == list(range(1, 9))
    assert [round(s["loss"], 5) for s in a] == [round(s["loss"], 5) for s in b]
    assert a[-1]["kl_coef"] == b[-1]["kl_coef"]


def test_cli_ppo(tmp_path, capsys):
    from scribelm.checkpoint import save_checkpoint
    from scribelm.cli import main

    lm = trained_lm("llama")
    save_checkpoint(tmp_path / "policy", lm.model, lm.config, lm.tokenizer)
    (tmp_path / "rewards.py").write_text("def full_stop(prompt, completion):\n    return float('.' in completion)\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in verse_openings(12)))
    assert main(["finetune", "ppo", str(tmp_path / "policy"), "--prompts", str(prompts), "--reward",
                 f"{tmp_path / 'rewards.py'}:full_stop", "--max-steps", "2", "--rollouts", "4", "--max-new-tokens", "8",
                 "--kl-target", "0.1", "-o", str(tmp_path / "run")]) == 0
    assert "held-out reward" in capsys.readouterr().out and (tmp_path / "run" / "model").is_dir()
