"""The local model store and the `scribe models` / `scribe serve` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scribelm.store import ModelStore, RegistryError, describe_model, resolve_model_path
from tests.serving import save_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("registry-models"), tokenizer)


def test_add_copy_link_show_remove(tmp_path, models):
    store = ModelStore(tmp_path / "store")
    assert store.names() == []
    store.add("alpha", models["alpha"])
    store.add("beta-link", models["beta"], link=True)
    assert store.names() == ["alpha", "beta-link"]
    assert not (store.root / "alpha").is_symlink() and (store.root / "beta-link").is_symlink()
    info = store.info("alpha")
    from scribelm import load

    lm = load(models["alpha"])
    assert info.parameters == sum(p.numel() for p in lm.model.state_dict().values()) - lm.model.unembedding.weight.numel()  # tied: stored once
    assert info.format == "scribelm" and info.quantization == "none" and info.chat_template == lm.tokenizer.chat_template
    assert info.config["d_model"] == 32 and info.size_bytes > 0
    assert resolve_model_path("alpha", store) == (store.root / "alpha").resolve()
    assert str(resolve_model_path(models["beta"], store)) == models["beta"]  # a directory path wins
    with pytest.raises(RegistryError, match="already stored"):
        store.add("alpha", models["beta"])
    store.remove("beta-link")
    assert os.path.isdir(models["beta"])  # removing a link leaves the model where it was
    store.remove("alpha")
    assert store.names() == []
    with pytest.raises(RegistryError, match="neither a model directory nor a model in the store"):
        resolve_model_path("alpha", store)


def test_bad_names_and_sources(tmp_path, models):
    store = ModelStore(tmp_path / "store")
    for name in ("../evil", "a/b", "", ".hidden"):
        with pytest.raises(RegistryError, match="not a valid model name"):
            store.add(name, models["alpha"])
    with pytest.raises(RegistryError, match="not a model directory"):
        store.add("empty", tmp_path)
    with pytest.raises(RegistryError, match="no model at"):
        store.add("gone", tmp_path / "missing")
    with pytest.raises(RegistryError, match="not a model directory"):
        describe_model(tmp_path)


def test_hf_style_directory_is_described(tmp_path):
    from safetensors.torch import save_file
    import torch

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(d / "model-00002-of-00002.safetensors"))
    info = describe_model(d)
    assert info.format == "huggingface" and info.parameters == 12 + 5 + 8 and info.quantization == "gptq (4-bit)"


def run_cli(capsys, monkeypatch, store, *args):
    """`scribe ARGS...` in this process (the subprocess test below covers the real entry point)."""
    from scribelm.cli import main

    monkeypatch.setenv("SCRIBE_MODELS_DIR", str(store))
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_cli(tmp_path, models, capsys, monkeypatch):
    store = tmp_path / "store"
    code, _, err = run_cli(capsys, monkeypatch, store, "models", "add", "alpha", models["alpha"])
    assert code == 0, err
    assert run_cli(capsys, monkeypatch, store, "models", "add", "beta", models["beta"], "--link")[0] == 0
    listed = json.loads(run_cli(capsys, monkeypatch, store, "models", "list", "--json")[1])
    assert [m["name"] for m in listed] == ["alpha", "beta"] and listed[1]["linked"]
    table = run_cli(capsys, monkeypatch, store, "models", "list")[1]
    assert "alpha" in table and "link" in table
    shown = json.loads(run_cli(capsys, monkeypatch, store, "models", "show", "alpha", "--json")[1])
    assert shown["parameters"] > 0 and shown["config"]["n_layers"] == 2 and "<|assistant|>" in shown["chat_template"]
    text = run_cli(capsys, monkeypatch, store, "models", "show", "alpha")[1]
    assert "parameters" in text and "chat template" in text
    code, _, err = run_cli(capsys, monkeypatch, store, "models", "show", "nope")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    params = json.loads(run_cli(capsys, monkeypatch, store, "params", "alpha", "--json")[1])  # other verbs take store names
    assert params["config"]["d_model"] == 32
    assert run_cli(capsys, monkeypatch, store, "models", "rm", "alpha")[0] == 0
    assert [m["name"] for m in json.loads(run_cli(capsys, monkeypatch, store, "models", "list", "--json")[1])] == ["beta"]
    code, _, err = run_cli(capsys, monkeypatch, store, "serve", "no-such-model")
    assert code == 2 and "no-such-model" in err and len(err.strip().splitlines()) == 1


def test_scribe_serve_prints_addresses_and_serves_store_names(tmp_path, models):
    store = tmp_path / "store"
    ModelStore(store).add("alpha", models["alpha"])
    env = dict(os.environ, SCRIBE_MODELS_DIR=str(store))
    proc = subprocess.Popen([sys.executable, "-m", "scribelm.cli", "serve", "alpha", f"b={models['beta']}", "--port", "0",
                             "--api-key", "k", "--max-batch", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        assert "/v1" in first and "chat page" in second, (first, second, proc.stderr.read() if proc.poll() is not None else "")
        base = second.split("chat page:")[1].split()[0].rstrip("/")
        assert base.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(base + "/health").json()
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert sorted(health["models"]) == ["alpha", "b"]
        r = httpx.post(base + "/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"model": "alpha", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "alpha"
    finally:
        proc.terminate()
        proc.wait(10)


def test_quantized_checkpoint_shows_its_scheme(tmp_path, models):
    from scribelm import load
    from scribelm.quant import quantize_model

    lm = load(models["alpha"])
    quantize_model(lm.model, bits=4, group_size=32)
    info = describe_model(lm.save(tmp_path / "alpha-int4"))
    assert info.quantization == "int4-per-group-asymmetric (groups of 32)"
    assert describe_model(models["alpha"]).quantization == "none"


def test_scribelm_load_accepts_a_store_name(tmp_path, monkeypatch):
    import torch

    import scribelm
    from scribelm.model import Transformer
    from tests.conftest import tiny_config

    monkeypatch.setenv("SCRIBE_MODELS_DIR", str(tmp_path / "store"))
    model = Transformer(tiny_config()).eval()
    scribelm.LM(model, None).save(tmp_path / "ckpt")
    from scribelm.store import ModelStore

    ModelStore().add("named-model", tmp_path / "ckpt")
    lm = scribelm.load("named-model")
    ids = torch.randint(0, 400, (1, 6))
    assert torch.equal(lm.model(ids), model(ids))
    with pytest.raises(scribelm.ScribeError, match="scribe models list"):
        scribelm.load("not-a-stored-model")


# ----------------------------------------------------------------------------- the store never loses a model


def _tree(directory):
    from pathlib import Path

    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _leftovers(store):
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".") and p.name != ".lock")


def test_a_source_inside_the_store_is_refused_and_the_entry_survives(tmp_path, models, capsys, monkeypatch):
    store = ModelStore(tmp_path / "store")
    store.add("keep", models["alpha"])
    before = _tree(store.root / "keep")
    alias = tmp_path / "alias"
    alias.symlink_to(store.root / "keep")  # a way in from outside: resolved before the check
    for source, extra in ((store.root / "keep", ["--link", "--force"]), (store.root / "keep", ["--force"]),
                          (alias, ["--link", "--force"]), (store.root / "keep", [])):
        for name in ("keep", "other"):
            code, out, err = run_cli(capsys, monkeypatch, store.root, "models", "add", name, source, *extra)
            assert code == 2 and "inside the model store" in err and len(err.strip().splitlines()) == 1, (out, err)
    assert not (store.root / "keep").is_symlink() and _tree(store.root / "keep") == before
    assert store.names() == ["keep"] and _leftovers(store) == []
    from scribelm import load

    assert load(store.path("keep")).config.d_model == 32


def test_force_swaps_in_a_complete_entry_and_leaves_no_temporaries(tmp_path, models):
    store = ModelStore(tmp_path / "store")
    store.add("m", models["alpha"])
    store.add("m", models["beta"], overwrite=True)  # copy over copy
    assert _tree(store.root / "m") == _tree(models["beta"])
    store.add("m", models["alpha"], link=True, overwrite=True)  # link over copy
    assert (store.root / "m").is_symlink() and store.path("m") == Path(models["alpha"]).resolve()
    store.add("m", models["beta"], overwrite=True)  # copy over link: the linked model is left alone
    assert not (store.root / "m").is_symlink() and _tree(store.root / "m") == _tree(models["beta"])
    assert _tree(models["alpha"]) and os.path.isdir(models["alpha"])
    assert _leftovers(store) == [] and store.names() == ["m"]


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_concurrent_adds_of_one_name_have_exactly_one_winner(tmp_path, models, link):
    import threading

    store = ModelStore(tmp_path / "store")
    sources = [models["alpha"], models["beta"]] * 4
    start, results = threading.Barrier(len(sources)), [None] * len(sources)

    def add(i):
        start.wait()
        try:
            ModelStore(store.root).add("same", sources[i], link=link)
            results[i] = "ok"
        except RegistryError as err:
            results[i] = str(err)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r == "ok"]
    assert len(winners) == 1, results
    assert all("already stored" in r for i, r in enumerate(results) if i not in winners)
    stored = store.path("same")
    assert (stored == Path(sources[winners[0]]).resolve()) if link else (_tree(stored) == _tree(sources[winners[0]]))
    assert _leftovers(store) == []


def test_concurrent_cli_adds_one_wins_the_other_says_it_exists(tmp_path, models):
    env = {**os.environ, "SCRIBE_MODELS_DIR": str(tmp_path / "store")}
    procs = [subprocess.Popen([sys.executable, "-m", "scribelm.cli", "models", "add", "same", models[m]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in ("alpha", "beta")]
    done = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in done) == [0, 2], done
    loser = next(err for code, err in done if code == 2)
    assert "already stored" in loser and "Traceback" not in loser and len(loser.strip().splitlines()) == 1


def test_a_source_with_a_symlink_loop_is_one_line(tmp_path, models, capsys, monkeypatch):
    import shutil

    source = tmp_path / "looped"
    shutil.copytree(models["alpha"], source)
    (source / "extras").mkdir()
    (source / "extras" / "again").symlink_to(source, target_is_directory=True)
    store = tmp_path / "store"
    code, _, err = run_cli(capsys, monkeypatch, store, "models", "add", "looped", source)
    assert code == 2 and "symlink loop" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (source / "extras" / "again").unlink()
    (source / "extras" / "self").symlink_to(source / "extras" / "self")  # a link to itself
    code, _, err = run_cli(capsys, monkeypatch, store, "models", "add", "looped", source)
    assert code == 2 and "points back to itself" in err and len(err.strip().splitlines()) == 1
    assert ModelStore(store).names() == [] and [p.name for p in store.iterdir() if p.name != ".lock"] == []


def test_linked_files_of_a_snapshot_are_copied_as_files(tmp_path, models):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for item in Path(models["alpha"]).iterdir():
        if not item.name.startswith("."):
            (blobs / item.name).write_bytes(item.read_bytes())
            (snapshot / item.name).symlink_to(blobs / item.name)  # as a Hugging Face cache snapshot is laid out
    store = ModelStore(tmp_path / "store")
    store.add("snap", snapshot)
    entry = store.root / "snap"
    assert not any(p.is_symlink() for p in entry.iterdir()) and _tree(entry) == _tree(models["alpha"])


def _safetensors_with_header(path, header):
    import struct

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


@pytest.mark.parametrize(
    "header, message",
    [
        ([1, 2, 3], "header is a JSON list"),
        ({"w": {"dtype": "F32", "shape": ["x", 2], "data_offsets": [0, 8]}}, "has shape [\"x\", 2]"),
        ({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, "not a list of non-negative integers"),
        ({"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 8]}}, "not a list of non-negative integers"),
        ({"w": {"dtype": "F32", "shape": 7, "data_offsets": [0, 8]}}, "not a list of non-negative integers"),
        ({"w": [1, 2]}, "described by a list"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"\xff\xfe not json", "not valid JSON"),
    ],
    ids=["list", "string-dim", "float-dim", "negative-dim", "shape-int", "entry-list", "deep", "bytes"],
)
def test_models_show_on_a_malformed_safetensors_header_is_one_line(tmp_path, capsys, monkeypatch, header, message):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _safetensors_with_header(d / "model.safetensors", header)
    code, _, err = run_cli(capsys, monkeypatch, tmp_path / "store", "models", "show", d)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_models_show_on_a_huge_or_truncated_header_length_is_one_line(tmp_path, capsys, monkeypatch):
    import struct

    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for raw, message in ((struct.pack("<Q", 2**63) + b"{}", "header claims"), (b"\x01\x02", "shorter than")):
        (d / "model.safetensors").write_bytes(raw)
        code, _, err = run_cli(capsys, monkeypatch, tmp_path / "store", "models", "show", d)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_models_show_on_a_deeply_nested_config_is_one_line(tmp_path, capsys, monkeypatch):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _safetensors_with_header(d / "model.safetensors", {})
    code, _, err = run_cli(capsys, monkeypatch, tmp_path / "store", "models", "show", d)
    assert code == 2 and "nested too deeply" in err and len(err.strip().splitlines()) == 1, err


def test_one_rule_reads_a_model_argument(tmp_path, models, monkeypatch):
    """A directory wins, else a stored name; scribelm.load, the verbs and the server share it."""
    import scribelm
    from scribelm.errors import CheckpointError
    from scribelm.store import find_model_path

    store = ModelStore(tmp_path / "store")
    store.add("alpha", models["alpha"])
    monkeypatch.setenv("SCRIBE_MODELS_DIR", str(store.root))
    monkeypatch.chdir(tmp_path)
    assert find_model_path("alpha") == (store.root / "alpha").resolve()
    assert find_model_path("missing") is None and find_model_path("../alpha") is None
    (tmp_path / "alpha").mkdir()  # a directory of that name in the working directory wins
    assert find_model_path("alpha") == Path("alpha")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="is a file"):
        scribelm.load("notes.txt")
    with pytest.raises(CheckpointError, match="no model at missing"):
        scribelm.load("missing")
