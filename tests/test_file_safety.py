"""No command loses a user's file.

Every command that writes is pointed at a directory holding a user's file:
none deletes it without --force, and none deletes it with --force either,
because scribelm did not write that directory. Where scribelm did write it,
--force replaces it. Then `kill -9` at random moments of `prepare`,
`models add` and `convert`: the previous output is intact or the new one is
complete, never a mix, and the next run leaves no temporaries.
"""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scribelm.cli import main
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

THESIS = "\\documentclass{article} years of work"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer, corpus):
    """A tiny model, a text corpus, shards, chat data and a pretraining recipe to point commands at."""
    from scribelm.data import prepare

    root = tmp_path_factory.mktemp("file-safety")
    torch.manual_seed(0)
    LM(Transformer(tiny_config()), tokenizer, {}).save(root / "model")
    (root / "corpus").mkdir()
    (root / "corpus" / "text.txt").write_text("\n\n".join(f"{i}. {line}" for i, line in enumerate(corpus)))
    tokenizer.save(root / "tok")
    prepare([root / "corpus"], root / "shards", tokenizer, val_fraction=0.1)
    (root / "chat.jsonl").write_text("\n".join(json.dumps({"instruction": f"say {w}", "output": w})
                                             for w in ["one", "two", "three", "four", "five", "six", "seven", "eight"]))
    recipe = {
        "model": {"vocab_size": 400, "context_length": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "d_mlp": 64},
        "data": {"dir": str(root / "shards"), "batch_size": 2, "sequence_length": 16},
        "train": {"max_steps": 2, "lr": 1e-3, "warmup_steps": 1, "plot": False},
        "out_dir": str(root / "unused-run"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


# Each writing command, as `scribe` arguments writing to OUT; FORCE is its flag for replacing.
COMMANDS = {
    "prepare": lambda ws, out: ["prepare", ws / "corpus", "-o", out, "--tokenizer", ws / "tok"],
    "pretrain": lambda ws, out: ["pretrain", "--config", ws / "recipe.yaml", "--out_dir", out],
    "convert-scribe": lambda ws, out: ["convert", ws / "model", out, "--to", "scribe"],
    "convert-hf": lambda ws, out: ["convert", ws / "model", out, "--to", "hf"],
    "quantize": lambda ws, out: ["quantize", ws / "model", "--bits", "8", "-o", out, "--no-eval"],
    "finetune": lambda ws, out: ["finetune", "sft", ws / "model", "--data", ws / "chat.jsonl", "-o", out,
                                 "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0"],
    "models-add": lambda ws, out: ["models", "--store", out.parent, "add", out.name, ws / "model"],
    "tokenizer-train": lambda ws, out: ["tokenizer", "train", ws / "corpus", "--vocab-size", "300", "-o", out],
    "quickstart": lambda ws, out: ["quickstart", "--out", out, "--minutes", "0.05", "--corpus", ws / "corpus"],
}
FORCE = {"pretrain": "--new", "quickstart": "--new"}


def run(capsys, args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_directory_holding_a_users_file_is_never_deleted(ws, tmp_path, capsys, command):
    out = tmp_path / "out"
    if command == "models-add":  # the store is the directory a user might have filled
        out = tmp_path / "store" / "m"
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text(THESIS)
    for extra in ([], [FORCE.get(command, "--force")]):
        code, err = run(capsys, COMMANDS[command](ws, out) + extra)
        assert code == 2, (extra, err)
        assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"] and (out / "thesis.tex").read_text() == THESIS
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) in ([], [".lock"])


# What a second run does on the first one's output: refused without --force, replaced with it.
REPLACEABLE = ["prepare", "convert-scribe", "convert-hf", "quantize", "finetune", "models-add", "tokenizer-train"]


@pytest.mark.parametrize("command", REPLACEABLE)
def test_scribelms_own_output_is_replaced_only_with_force(ws, tmp_path, capsys, command):
    out = tmp_path / "store" / "m" if command == "models-add" else tmp_path / "out"
    assert run(capsys, COMMANDS[command](ws, out))[0] == 0
    code, err = run(capsys, COMMANDS[command](ws, out))
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1, err
    marker = out / ".scribelm-output.json"
    assert marker.is_file()
    marker.write_text(marker.read_text())  # touched, not changed: still scribelm's
    code, err = run(capsys, COMMANDS[command](ws, out) + ["--force"])
    assert code == 0, err
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_published_outputs_follow_the_users_umask(ws, tmp_path, capsys, mask):
    old = os.umask(mask)
    try:
        for command in ("prepare", "convert-scribe", "convert-hf", "quantize", "models-add", "tokenizer-train"):
            out = tmp_path / mask.__format__("o") / command
            out = out / "m" if command == "models-add" else out
            assert run(capsys, COMMANDS[command](ws, out))[0] == 0
            modes = {stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")] if p.is_dir()}
            assert modes == {0o777 & ~mask}, (command, sorted(map(oct, modes)))
            modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
            assert modes == {0o666 & ~mask}, (command, sorted(map(oct, modes)))
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- kill -9


def _tree(directory):
    directory = Path(directory)
    if not directory.exists():
        return None
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _scribe(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "scribelm.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _temporaries(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.is_dir() else []


def _kill_at_random_moments(make_args, out, check, *, kills=4, seed=0, env=None):
    """Run `make_args()` to completion once, then `kills` times kill -9 it while it writes:
    as soon as its temporary beside `out` appears, then after a random pause (0 for the first
    kill, so that one surely lands mid-write). After each, `check(out)` must hold; finally a
    full run succeeds and leaves no temporaries beside `out`."""
    rng = random.Random(seed)
    proc = _scribe(*make_args(), env=env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    check(out)
    interrupted = 0
    for attempt in range(kills):
        proc = _scribe(*make_args(), env=env)
        while proc.poll() is None and not _temporaries(out):
            time.sleep(0.002)
        time.sleep(0 if attempt == 0 else rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        interrupted += proc.returncode == -signal.SIGKILL and bool(_temporaries(out))
        check(out)
    assert interrupted >= 1, "no kill landed while the output was being written"
    proc = _scribe(*make_args(), env=env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    check(out)
    assert _temporaries(out) == []


@pytest.fixture(scope="module")
def big_corpora(tmp_path_factory):
    """Two corpora large enough that tokenizing and writing take a while."""
    root = tmp_path_factory.mktemp("corpora")
    for name, word in (("a.txt", "alpha"), ("b.txt", "beta")):
        (root / name).write_text("\n\n".join(f"Paragraph {i}: {word} " + " ".join(f"w{(i * j) % 997}" for j in range(40))
                                             for i in range(6000)))
    return root


def test_kill_9_during_prepare_leaves_old_or_new_shards(ws, tmp_path, big_corpora):
    from scribelm.data import read_manifest, read_split

    out = tmp_path / "data"
    sources = iter([])
    outputs = {}

    def make_args():
        nonlocal sources
        source = next(sources, None)
        if source is None:
            sources = iter([big_corpora / "a.txt", big_corpora / "b.txt"] * 4)
            source = next(sources)
        return ["prepare", source, "-o", out, "--tokenizer", ws / "tok", "--force"]

    def check(out):
        tree = _tree(out)
        assert tree is not None
        manifest = read_manifest(out)  # complete: the manifest is there and every shard has its size
        for split in ("train", "validation"):
            read_split(out, split)
        source = Path(manifest["sources"][0]["path"]).name
        if source in outputs:
            assert tree == outputs[source]  # exactly an earlier complete output, not a mix
        else:
            outputs[source] = tree

    _kill_at_random_moments(make_args, out, check, kills=4)
    assert set(outputs) == {"a.txt", "b.txt"}


def _big_model(path, seed, tokenizer):
    torch.manual_seed(seed)
    config = tiny_config(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_mlp=1024, vocab_size=400)
    return LM(Transformer(config), tokenizer, {}).save(path)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("two-models")
    return _big_model(root / "one", 1, tokenizer), _big_model(root / "two", 2, tokenizer)


def _without_marker(tree):
    return {k: v for k, v in tree.items() if not k.startswith(".")}


def test_kill_9_during_models_add_leaves_the_old_or_the_new_entry(tmp_path, two_models):
    store = tmp_path / "store"
    expected = [_without_marker(_tree(m)) for m in two_models]
    turn = [0]

    def make_args():
        turn[0] += 1
        return ["models", "--store", store, "add", "m", two_models[turn[0] % 2], "--force"]

    def check(entry):
        tree = _tree(entry)
        assert tree is not None and _without_marker(tree) in expected

    _kill_at_random_moments(make_args, store / "m", check, kills=4, seed=1)


def test_kill_9_during_convert_leaves_the_old_or_the_new_directory(tmp_path, two_models):
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    sources = [list(load_file(str(Path(m) / "model.safetensors")).values()) for m in two_models]
    turn = [0]

    def make_args():
        turn[0] += 1  # many shards, so that a mix of two runs would be visible
        return ["convert", two_models[turn[0] % 2], out, "--to", "hf", "--force", "--max-shard-size", "2MB"]

    def check(out):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert sorted(p.name for p in out.glob("*.safetensors")) == shards  # exactly the shards it lists
        owners = set()
        for shard in shards:
            for tensor in load_file(str(out / shard)).values():
                found = {i for i, tensors in enumerate(sources)
                         if any(t.shape == tensor.shape and torch.equal(t, tensor) for t in tensors)}
                assert found, f"a tensor of {shard} is in neither model"
                if len(found) == 1:  # norms start equal in both models; the rest tell them apart
                    owners |= found
        assert len(owners) == 1, "the directory mixes two conversions"

    _kill_at_random_moments(make_args, out, check, kills=4, seed=2)


def test_a_killed_gguf_export_leaves_nothing_after_the_next_one(ws, tmp_path, capsys):
    pytest.importorskip("gguf")
    out = tmp_path / "model.gguf"
    args = ["convert", ws / "model", out, "--to", "gguf"]
    proc = _scribe(*args)
    while proc.poll() is None and not _temporaries(out):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists() or out.read_bytes()[:4] == b"GGUF"  # nothing, or a complete file: never half a file
    if not _temporaries(out):  # the export finished before the kill: leave a temporary as a killed one would
        (tmp_path / ".model.gguf.tmp-999999999-dead0000").write_bytes(b"GGUF half")
    code, err = run(capsys, args + (["--force"] if out.exists() else []))
    assert code == 0, err
    assert out.read_bytes()[:4] == b"GGUF" and _temporaries(out) == []
    essay = tmp_path / "essay.gguf"  # a user's file under a GGUF name is not replaced, --force or not
    essay.write_text("my essay")
    for extra in ([], ["--force"]):
        code, err = run(capsys, ["convert", ws / "model", essay, "--to", "gguf", *extra])
        assert code == 2 and "not a GGUF file" in err, err
    assert essay.read_text() == "my essay"
