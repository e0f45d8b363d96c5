"""A run directory belongs to one run: resume, refuse, start over, never touch a user's files;
honest MFU; no stale temporaries; damaged training states; a full disk."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from scribelm.errors import CheckpointError, ScribeError
from scribelm.model import Transformer
from scribelm.train import CheckpointWarning, TrainConfig, Trainer, list_checkpoints
from scribelm.train.run_dir import RunDirectoryError, claim_run_directory
from scribelm.io import DiskFullError
from tests.conftest import tiny_config
from tests.train.test_train import ListLoader, random_batches


def scribe(*args):
    return subprocess.run([sys.executable, "-m", "scribelm.cli", *map(str, args)], capture_output=True, text=True)


def metric_steps(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def dead_pid():
    """The id of a process that has ended: the owner of a temporary left by a killed run."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def checkpoint_names(out_dir):
    return sorted(p.name for p in list_checkpoints(out_dir))


def write_recipe(path, data_dir, out_dir, **train):
    recipe = {
        "model": {"vocab_size": 400, "context_length": 32, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_mlp": 32},
        "data": {"dir": str(data_dir), "batch_size": 2, "sequence_length": 16},
        "train": {"max_steps": 4, "lr": 1e-3, "warmup_steps": 0, "checkpoint_every": 2, "plot": False, **train},
        "out_dir": str(out_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


# ----------------------------------------------------------------------------- one run per directory


def test_same_recipe_resumes_and_the_metrics_continue(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, tmp_path / "run")
    first = scribe("pretrain", "--config", recipe)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / "run.json").is_file()

    again = scribe("pretrain", "--config", recipe, "--train.max_steps", 6)  # how long to train may change
    assert again.returncode == 0, again.stderr
    assert "resuming from step 4" in again.stdout and "train.max_steps 4 -> 6" in again.stdout
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


def test_a_changed_recipe_is_refused_with_the_differences(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, tmp_path / "run")
    assert scribe("pretrain", "--config", recipe).returncode == 0
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_bytes()

    result = scribe("pretrain", "--config", recipe, "--train.lr", 3e-3, "--model.n_layers", 2)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "holds another training run" in result.stderr and "--new" in result.stderr
    assert "train.lr 0.001 -> 0.003" in result.stderr and "model.n_layers 1 -> 2" in result.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics_before
    assert checkpoint_names(tmp_path / "run") == ["step-00000002", "step-00000004"]


def test_new_starts_clean_and_keeps_the_users_files(tmp_path, data_dir):
    out = tmp_path / "run"
    long_run = write_recipe(tmp_path / "a.yaml", data_dir, out, max_steps=6, keep_last=1)
    assert scribe("pretrain", "--config", long_run).returncode == 0
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "README").write_text("also mine")

    short_run = write_recipe(tmp_path / "b.yaml", data_dir, out, max_steps=2, keep_last=1, lr=2e-3)
    result = scribe("pretrain", "--config", short_run, "--new")
    assert result.returncode == 0, result.stderr
    assert "starting over in" in result.stdout
    assert metric_steps(out) == [1, 2]
    # The earlier run's step 6 is gone; keep_last=1 kept the new run's own checkpoint.
    assert checkpoint_names(out) == ["step-00000002"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "README").read_text() == "also mine"
    assert json.loads((out / "run.json").read_text())["recipe"]["train"]["lr"] == 2e-3


def test_a_directory_scribelm_did_not_write_is_never_touched(tmp_path, data_dir):
    """pretrain and quickstart --out, with and without --force/--new: the user's file survives."""
    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, users)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"Line {i} of a small corpus." for i in range(50)))
    for args in (
        ["pretrain", "--config", recipe], ["pretrain", "--config", recipe, "--new"],
        ["pretrain", "--config", recipe, "--force"],
        ["quickstart", "--minutes", 0.05, "--corpus", corpus, "--out", users],
        ["quickstart", "--minutes", 0.05, "--corpus", corpus, "--out", users, "--force"],
    ):
        result = scribe(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "not written by scribelm" in result.stderr and "thesis.tex" in result.stderr, args
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"], args
        assert (users / "thesis.tex").read_text() == "years of work"


def test_claim_rules(tmp_path):
    recipe = {"model": {"d_model": 32}, "train": {"lr": 1e-3, "max_steps": 10}}
    assert claim_run_directory(tmp_path / "new", "training run", recipe).status == "new"
    again = claim_run_directory(tmp_path / "new", "training run", {**recipe, "train": {"lr": 1e-3, "max_steps": 20}},
                                may_change=["train.max_steps"])
    assert again.status == "resume" and again.changed == ["train.max_steps 10 -> 20"]
    with pytest.raises(RunDirectoryError, match="holds a scribelm training run, not a quickstart"):
        claim_run_directory(tmp_path / "new", "quickstart", recipe)
    with pytest.raises(RunDirectoryError, match="resume: false"):
        claim_run_directory(tmp_path / "new", "training run", recipe, resume=False, may_change=["train.max_steps"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="is not a directory"):
        claim_run_directory(tmp_path / "file", "training run", recipe)
    (tmp_path / "empty").mkdir()
    assert claim_run_directory(tmp_path / "empty", "training run", recipe).status == "new"
    # A run directory from before run.json existed: recognised by what is in it, started over only with --new.
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints" / "step-00000010").mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(RunDirectoryError, match="recipe was not recorded.*--new"):
        claim_run_directory(earlier, "training run", recipe)
    assert claim_run_directory(earlier, "training run", recipe, new=True).status == "new"
    assert not (earlier / "metrics.jsonl").exists() and not (earlier / "checkpoints").exists()
    # A user's file inside a folder scribelm writes whole stops --new before anything is removed.
    (earlier / "best").mkdir()
    (earlier / "best" / "mine.txt").write_text("x")
    (earlier / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ScribeError, match="mine.txt"):
        claim_run_directory(earlier, "training run", {"other": True}, new=True)
    assert (earlier / "metrics.jsonl").is_file() and (earlier / "best" / "mine.txt").is_file()
    # A model directory is scribelm's, but not a run: it is not taken over.
    from scribelm.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "model", Transformer(tiny_config()), tiny_config())
    with pytest.raises(RunDirectoryError, match="holds a scribelm checkpoint, not a training run"):
        claim_run_directory(tmp_path / "model", "training run", recipe, new=True)


def test_quickstart_resumes_refuses_and_starts_over(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"Day {i}: the weather was {'sunny' if i % 3 else 'rainy'} and mild." for i in range(300)))
    out = tmp_path / "qs"
    base = ["quickstart", "--minutes", 0.05, "--corpus", corpus, "--out", out]
    first = scribe(*base)
    assert first.returncode == 0, first.stderr[-2000:]
    steps = metric_steps(out / "run")
    checkpoints = checkpoint_names(out / "run")

    again = scribe(*base)  # the same command: resumes (the budget is spent, so it evaluates and samples)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from step {steps[-1]}" in again.stdout and "tokenizing" not in again.stdout
    assert metric_steps(out / "run") == steps and checkpoint_names(out / "run") == checkpoints

    other = scribe("quickstart", "--minutes", 0.06, "--corpus", corpus, "--out", out)
    assert other.returncode == 2 and "minutes 0.05 -> 0.06" in other.stderr and "--new" in other.stderr

    (out / "model" / "my-notes.md").write_text("keep")  # inside a folder the quickstart replaces: refused up front
    inside = scribe("quickstart", "--minutes", 0.06, "--corpus", corpus, "--out", out, "--new")
    assert inside.returncode == 2 and "my-notes.md" in inside.stderr and "tokenizing" not in inside.stdout
    assert metric_steps(out / "run") == steps  # and the earlier run was left as it was
    (out / "model" / "my-notes.md").rename(out / "my-notes.md")
    fresh = scribe("quickstart", "--minutes", 0.06, "--corpus", corpus, "--out", out, "--new")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "resuming" not in fresh.stdout and metric_steps(out / "run")[0] == 1
    assert len(list_checkpoints(out / "run")) == 1 and (out / "my-notes.md").read_text() == "keep"


def test_a_fresh_trainer_keeps_its_own_checkpoint_beside_a_higher_numbered_one(tmp_path):
    """keep_last counts only checkpoints older than the one just saved."""
    cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, keep_last=1, plot=False)
    earlier = tmp_path / "checkpoints" / "step-00000528"
    earlier.mkdir(parents=True)
    torch.manual_seed(0)
    trainer = Trainer(Transformer(tiny_config()), None, ListLoader(random_batches(2, 2)), None, cfg, tmp_path)
    result = trainer.fit()
    assert result.last_checkpoint.is_dir() and result.last_checkpoint.name == "step-00000002"


# ----------------------------------------------------------------------------- MFU


def test_mfu_is_never_above_one_and_the_peak_is_raised(tmp_path):
    events = []
    cfg = TrainConfig(max_steps=3, lr=1e-3, warmup_steps=0, plot=False, peak_flops=1.0)  # far below any real rate
    torch.manual_seed(0)
    trainer = Trainer(Transformer(tiny_config()), None, ListLoader(random_batches(3, 2)), None, cfg, tmp_path,
                      progress=lambda event, info: events.append((event, info)))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "mfu" in r]
    assert len(steps) == 3 and all(0 < r["mfu"] <= 1.0 for r in steps)
    assert steps[0]["peak_flops"] > 1.0  # raised to the rate seen, and written beside the MFU
    raised = [info for event, info in events if event == "peak_flops"]
    assert raised and raised[0]["previous"] == 1.0 and raised[0]["peak_flops"] > 1.0


def test_peak_flops_on_the_command_line(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, tmp_path / "run", max_steps=2)
    result = scribe("pretrain", "--config", recipe, "--peak-flops", 1000)
    assert result.returncode == 0, result.stderr
    assert "MFU relative to 1e-09 TFLOP/s" in result.stdout and "ran faster than the peak" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] <= 1.0 and r["peak_flops"] > 1000 for r in records if "mfu" in r)
    shown = [float(x) for x in re.findall(r"MFU ([0-9.]+)%", result.stdout)]
    assert shown and all(x <= 100.0 for x in shown)

    bad = scribe("pretrain", "--config", recipe, "--peak-flops", 0)
    assert bad.returncode == 2 and "--peak-flops must be positive" in bad.stderr


# ----------------------------------------------------------------------------- temporaries, damage, full disk


def test_stale_temporaries_are_removed_at_start_and_after_each_save(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(parents=True)
    gone = dead_pid()
    stale = [checkpoints / f".step-00000004.tmp-{gone}-ab12", checkpoints / ".step-00000002.tmp-k3j4h5g6",  # (older naming)
             tmp_path / f".best.tmp-{gone}-cd34"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    users = [checkpoints / "step-notes.txt", tmp_path / ".tmp-mine", tmp_path / "step-00000002.tmp-copy",
             checkpoints / f".step-00000006.tmp-{os.getpid()}-0000"]  # a live process's save in progress
    for file in users:
        file.write_text("mine")

    seen_at_checkpoint = []
    later = checkpoints / f".step-00000003.tmp-{gone}-ef56"  # as if an earlier attempt's save had been killed

    def progress(event, info):
        if event == "step" and info["step"] == 1:
            assert not any(p.exists() for p in stale)  # gone before the first step
            later.mkdir()
        if event == "checkpoint":
            seen_at_checkpoint.append(later.exists())

    cfg = TrainConfig(max_steps=4, lr=1e-3, warmup_steps=0, checkpoint_every=2, plot=False)
    torch.manual_seed(0)
    Trainer(Transformer(tiny_config()), None, ListLoader(random_batches(4, 2)), None, cfg, tmp_path, progress=progress).fit()
    assert seen_at_checkpoint == [False, False]
    assert all(f.read_text() == "mine" for f in users)
    assert checkpoint_names(tmp_path) == ["step-00000002", "step-00000004"]


def _two_checkpoints(tmp_path):
    cfg = TrainConfig(max_steps=4, lr=1e-3, warmup_steps=0, checkpoint_every=2, keep_last=2, plot=False)
    batches = random_batches(4, 2)
    torch.manual_seed(0)
    Trainer(Transformer(tiny_config()), None, ListLoader(batches), None, cfg, tmp_path).fit()
    return cfg, batches


@pytest.mark.parametrize("damage", ["missing optimizer", "step as text", "not a dict"])
def test_a_training_state_missing_keys_is_skipped_like_other_damage(tmp_path, damage):
    cfg, batches = _two_checkpoints(tmp_path)
    file = tmp_path / "checkpoints" / "step-00000004" / "training_state.pt"
    state = torch.load(file, weights_only=True)
    if damage == "missing optimizer":
        del state["optimizer"]
    elif damage == "step as text":
        state["step"] = "four"
    else:
        state = [1, 2, 3]
    torch.save(state, file)

    torch.manual_seed(1)
    trainer = Trainer(Transformer(tiny_config()), None, ListLoader(batches), None, cfg, tmp_path)
    with pytest.warns(CheckpointWarning, match="step-00000004.*damaged"):
        resumed = trainer.resume()
    assert resumed.name == "step-00000002" and trainer.step == 2 and trainer.train_loader.index == 2


def test_no_usable_checkpoint_is_a_one_line_error(tmp_path):
    cfg, batches = _two_checkpoints(tmp_path)
    for path in list_checkpoints(tmp_path):
        state = torch.load(path / "training_state.pt", weights_only=True)
        del state["torch_rng"]
        torch.save(state, path / "training_state.pt")
    trainer = Trainer(Transformer(tiny_config()), None, ListLoader(batches), None, cfg, tmp_path)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="none of the 2 checkpoint") as caught:
        trainer.resume()
    assert "\n" not in str(caught.value)
    assert trainer.step == 0


def test_a_full_disk_during_a_save_says_so_and_keeps_what_was_saved(tmp_path, monkeypatch):
    import scribelm.checkpoint

    real_save_file = scribelm.checkpoint.save_file
    calls = {"n": 0}

    def save_file_on_a_filling_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: part of the file is written, then the disk is full
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(scribelm.checkpoint, "save_file", save_file_on_a_filling_disk)
    cfg = TrainConfig(max_steps=4, lr=1e-3, warmup_steps=0, checkpoint_every=2, plot=False)
    torch.manual_seed(0)
    trainer = Trainer(Transformer(tiny_config()), None, ListLoader(random_batches(4, 2)), None, cfg, tmp_path)
    with pytest.raises(DiskFullError, match=r"^disk full while saving checkpoint .*step-00000004.*step-00000002, is kept\)$"):
        trainer.fit()
    assert checkpoint_names(tmp_path) == ["step-00000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]  # no temporaries left
    import scribelm

    scribelm.load(tmp_path / "checkpoints" / "step-00000002")  # still complete


def test_a_full_disk_during_pretrain_is_one_line(tmp_path, data_dir, monkeypatch, capsys, one_thread):
    import scribelm.checkpoint
    from scribelm.cli import main

    real_save_file = scribelm.checkpoint.save_file
    calls = {"n": 0}

    def save_file_on_a_filling_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(scribelm.checkpoint, "save_file", save_file_on_a_filling_disk)
    recipe = write_recipe(tmp_path / "r.yaml", data_dir, tmp_path / "run", keep_best=False)
    code = main(["pretrain", "--config", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: disk full while saving checkpoint") and "step-00000002, is kept" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]
