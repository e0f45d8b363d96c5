import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import scribelm
from scribelm.errors import ConfigError
from scribelm.model import Transformer
from scribelm.train import (
    CheckpointWarning,
    LRSchedule,
    NextTokenObjective,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    list_checkpoints,
)
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


class ListLoader:
    """Fixed batches, in order, with a saveable position."""

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def __iter__(self):
        while self.index < len(self.batches):
            self.index += 1
            yield self.batches[self.index - 1]

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def random_batches(n, batch_size, T=16, vocab=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch_size, T + 1), generator=g)
        out.append({"ids": x[:, :-1], "targets": x[:, 1:]})
    return out


def test_schedule_values():
    s = LRSchedule(1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert [s(i, 0.0) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s(10, 0.0) == pytest.approx(1.0)
    assert s(50, 0.5) == pytest.approx(0.55)  # halfway down the cosine: (peak + floor) / 2
    assert s(99, 1.0) == pytest.approx(0.1) and s(200, 7.0) == pytest.approx(0.1)  # the floor, never below
    assert s.step_progress(55, 100) == pytest.approx(0.5)
    lin = LRSchedule(2.0, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert [lin(0, p) for p in (0.0, 0.25, 1.0)] == pytest.approx([2.0, 1.5, 0.0])
    assert LRSchedule(2.0, 0, "constant")(5, 0.9) == 2.0
    with pytest.raises(ConfigError, match="decay must be one of"):
        LRSchedule(1.0, 0, "exponential")


def test_trainer_applies_the_schedule(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=20, lr=1e-2, warmup_steps=5, min_lr_ratio=0.1, plot=False)
    Trainer(Transformer(tiny_config()), None, ListLoader(random_batches(20, 2)), None, cfg, tmp_path).fit()
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    expected = [LRSchedule(1e-2, 5, "cosine", 0.1)(s, (s - 5) / 15) for s in range(20)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] > 1e-3 and lrs[4] == pytest.approx(1e-2)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    torch.manual_seed(0)
    base = Transformer(tiny_config())
    big = random_batches(4, 8)
    small = [{k: v[i * 2:(i + 1) * 2] for k, v in b.items()} for b in big for i in range(4)]  # each big batch as 4 micro-batches
    models = []
    for batches, accum, name in ((big, 1, "big"), (small, 4, "small")):
        model = copy.deepcopy(base)
        # eps keeps Adam from turning float-rounding differences of near-zero gradients into full steps
        cfg = TrainConfig(max_steps=4, lr=1e-2, eps=1e-4, warmup_steps=0, grad_accum_steps=accum, grad_clip=0.5, plot=False)
        Trainer(model, None, ListLoader(batches), None, cfg, tmp_path / name).fit()
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), (name, (a - b).abs().max())
    big_losses, small_losses = (losses(tmp_path / n)[0] for n in ("big", "small"))
    assert [l for _, l in big_losses] == pytest.approx([l for _, l in small_losses], rel=1e-5)
    assert not torch.equal(models[0].token_embedding.weight, base.token_embedding.weight)


def test_loss_decreases_on_a_tiny_corpus(tmp_path, tokenizer, corpus):
    ids = torch.tensor(tokenizer.encode(" ".join(corpus[:5]) + " "))
    batches = []
    for step in range(60):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=torch.Generator().manual_seed(step))
        x = torch.stack([ids[s:s + 33] for s in starts])
        batches.append({"ids": x[:, :-1], "targets": x[:, 1:]})
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=60, lr=1e-2, warmup_steps=5, plot=False)
    Trainer(Transformer(tiny_config(d_model=64, d_mlp=128)), None, ListLoader(batches), None, cfg, tmp_path).fit()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert losses[0] > 5.5  # about ln(400) at init
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_only_trainable_parameters_change_and_decay_skips_vectors(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    for name, p in model.named_parameters():
        p.requires_grad = "blocks.1." in name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, None, ListLoader(random_batches(3, 2)), None, TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, plot=False), tmp_path)
    decayed = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
    assert all(p.dim() >= 2 for p in trainer.optimizer.param_groups[0]["params"])
    assert all(p.dim() == 1 for p in trainer.optimizer.param_groups[1]["params"])
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0 and decayed
    trainer.fit()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) != ("blocks.1." in name), name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    base = NextTokenObjective()
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        loss, metrics = base(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=10, lr=1e-3, warmup_steps=0, checkpoint_every=2, plot=False)
    trainer = Trainer(Transformer(tiny_config()), objective, ListLoader(random_batches(10, 2)), None, cfg, tmp_path)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 5; the last good checkpoint is .*step-00000004"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000002"]
    lm = scribelm.load(tmp_path / "checkpoints" / "step-00000004")
    assert all(torch.isfinite(p).all() for p in lm.model.parameters())


def test_corrupt_and_half_written_checkpoints_are_skipped(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=6, lr=1e-3, warmup_steps=0, checkpoint_every=2, keep_last=3, plot=False)
    batches = random_batches(6, 2)
    first = Trainer(Transformer(tiny_config()), None, ListLoader(batches), None, cfg, tmp_path)
    first.fit()
    # The newest checkpoint has truncated weights; an older one has a damaged training state;
    # a crashed save left a temporary directory behind.
    weights = tmp_path / "checkpoints" / "step-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    state = tmp_path / "checkpoints" / "step-00000004" / "training_state.pt"
    state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 2])
    (tmp_path / "checkpoints" / ".step-00000008.tmp-abc").mkdir()
    torch.manual_seed(1)
    second = Trainer(Transformer(tiny_config()), None, ListLoader(batches), None, cfg, tmp_path)
    with pytest.warns(CheckpointWarning) as caught:
        resumed = second.resume()
    assert resumed.name == "step-00000002" and second.step == 2 and second.train_loader.index == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "step-00000006" in messages and "step-00000004" in messages and "tmp-abc" not in messages


def test_train_config_is_checked():
    with pytest.raises(ConfigError, match="max_steps or time_budget_s"):
        TrainConfig()
    with pytest.raises(ConfigError, match="unknown train setting"):
        TrainConfig.from_dict({"max_steps": 1, "learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="precision must be"):
        TrainConfig(max_steps=1, precision="fp8")
    with pytest.raises(ConfigError, match="'lr' must be float"):
        TrainConfig(max_steps=1, lr="fast")


# ----------------------------------------------------------------------------- recipes, processes


def write_recipe(path, data_dir, out_dir, **train):
    recipe = {
        "model": {"vocab_size": 400, "context_length": 64, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "n_kv_heads": 2, "d_mlp": 64, "activation": "swiglu", "norm": "rmsnorm", "position": "rope",
                  "qkv_bias": False, "attn_out_bias": False, "mlp_bias": False, "tie_embeddings": True, "dropout": 0.1},
        "data": {"dir": str(data_dir), "batch_size": 4, "sequence_length": 16},
        "train": {"max_steps": 12, "lr": 3e-3, "warmup_steps": 2, "plot": False, **train},
        "out_dir": str(out_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def scribe(*args, env=None):
    return subprocess.run([sys.executable, "-m", "scribelm.cli", *map(str, args)], capture_output=True, text=True, env=env)


def losses(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r], [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def test_resume_after_sigkill_continues_with_identical_losses(tmp_path, data_dir):
    steps = 60
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, tmp_path / "ref", max_steps=steps, checkpoint_every=10, eval_every=25)
    assert scribe("pretrain", "--config", recipe).returncode == 0
    reference_train, reference_val = losses(tmp_path / "ref")

    killed_dir = tmp_path / "killed"
    args = ["pretrain", "--config", recipe, "--out_dir", killed_dir]
    proc = subprocess.Popen([sys.executable, "-m", "scribelm.cli", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(12_000):  # polls, not a timing claim: bounds the wait if the run hangs
        if (killed_dir / "checkpoints" / "step-00000020").exists():
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the run wrote no step-20 checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = max(step for step, _ in losses(killed_dir)[0])
    assert interrupted_at < steps

    result = scribe(*args)
    assert result.returncode == 0, result.stderr
    assert re.search(r"resuming from step \d+ \(.*step-\d+\)", result.stdout)
    resumed_train, resumed_val = losses(killed_dir)
    assert resumed_train == reference_train  # same floats, every step, printed digits and all
    assert resumed_val == reference_val
    saved = json.loads((killed_dir / "checkpoints" / f"step-{steps:08d}" / "run_config.json").read_text())
    assert saved["out_dir"] == str(killed_dir) and saved["train"]["max_steps"] == steps and saved["model"]["d_model"] == 32


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, data_dir, strategy):
    one = write_recipe(tmp_path / "one.yaml", data_dir, tmp_path / "one", max_steps=8, eval_every=4)
    assert scribe("pretrain", "--config", one, "--data.batch_size", 4, "--model.dropout", 0.0).returncode == 0
    two = write_recipe(tmp_path / "two.yaml", data_dir, tmp_path / "two", max_steps=8, eval_every=4, distributed=strategy)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "scribelm.cli",
         "pretrain", "--config", str(two), "--data.batch_size", "2", "--model.dropout", "0.0"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (one_train, one_val), (two_train, two_val) = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in two_train] == list(range(1, 9))
    for (_, a), (_, b) in zip(one_train + one_val, two_train + two_val):
        assert math.isclose(a, b, rel_tol=1e-5), (one_train, two_train)
    assert one_train[-1][1] < one_train[0][1]
    scribelm.load(tmp_path / "two" / "checkpoints" / "step-00000008")  # rank 0 wrote a complete checkpoint


def test_run_that_cannot_fit_is_refused_up_front(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, tmp_path / "out")
    result = scribe("pretrain", "--config", recipe, "--model", "{preset: gpt3-175b, vocab_size: 50257}", "--data.sequence_length", 2048)
    assert result.returncode == 2
    assert "this run needs about" in result.stderr and "GiB" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_recipe_errors_are_one_line(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, tmp_path / "out")
    for extra, message in (
        (["--train.learning_rate", "1"], "unknown train setting"),
        (["--model.vocab_size", "256"], "vocabulary of 400 tokens but the model has vocab_size 256"),
        (["--data.dir", str(tmp_path)], "has no manifest.json"),
        (["--tokenizer", str(ROOT / "tests")], "no tokenizer found"),
    ):
        result = scribe("pretrain", "--config", recipe, *extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (extra, result.stderr)


@pytest.mark.parametrize("name", ["tiny", "gpt2-124m"])
def test_shipped_recipes_are_valid(name):
    from scribelm.train.pretrain import apply_overrides, load_recipe, model_config_from_recipe

    recipe = apply_overrides(load_recipe(ROOT / "recipes" / f"{name}.yaml"), ["--train.max_steps", "5"])
    config = TrainConfig.from_dict(recipe["train"])
    model = model_config_from_recipe(recipe["model"], data_vocab_size=4096)
    assert config.max_steps == 5 and isinstance(config.lr, float)
    assert recipe["data"]["sequence_length"] <= model.context_length
    assert model.vocab_size == 4096  # the data's vocabulary unless the recipe sets one
    assert model.d_model == (768 if name == "gpt2-124m" else 192)


def test_mixed_precision_and_gradient_checkpointing_track_fp32(tmp_path):
    runs = {}
    for precision, checkpointing in (("fp32", False), ("fp32", True), ("bf16", True), ("fp16", False)):
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=0, precision=precision,
                          gradient_checkpointing=checkpointing, plot=False)
        name = f"{precision}-{checkpointing}"
        trainer = Trainer(Transformer(tiny_config()), None, ListLoader(random_batches(4, 2)), None, cfg, tmp_path / name)
        assert (trainer.scaler is not None) == (precision == "fp16")
        trainer.fit()
        runs[name] = [loss for _, loss in losses(tmp_path / name)[0]]
    reference = runs.pop("fp32-False")
    assert runs.pop("fp32-True") == pytest.approx(reference, rel=1e-6)  # recomputation changes nothing
    for name, values in runs.items():
        assert values == pytest.approx(reference, abs=2e-2), name
