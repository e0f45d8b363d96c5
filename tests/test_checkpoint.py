import json

import pytest
import torch

import scribelm
from scribelm.checkpoint import read_config
from scribelm.errors import CheckpointError
from scribelm.model import Transformer
from tests.conftest import tiny_config


@pytest.fixture
def saved(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_embeddings=False)).eval()
    lm = scribelm.LM(model, tokenizer, {"temperature": 0.7})
    path = lm.save(tmp_path / "ckpt")
    return lm, path


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tokenizer, tie):
    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_embeddings=tie, position="learned")).eval()
    scribelm.LM(model, tokenizer).save(tmp_path / "m")
    loaded = scribelm.load(tmp_path / "m")
    ids = torch.randint(0, 400, (2, 16))
    assert torch.equal(loaded.model(ids), model(ids))
    assert loaded.config == model.config
    assert loaded.tokenizer.encode("the earth") == tokenizer.encode("the earth")
    assert (loaded.model.unembedding.weight is loaded.model.token_embedding.weight) == tie


def test_files_and_no_leftovers(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        ".scribelm-output.json", "config.json", "generation.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no temp dirs left
    assert json.loads((path / "config.json").read_text())["format"] == "scribelm"
    assert scribelm.load(path).generation_config == {"temperature": 0.7}


def test_overwrite_is_atomic(saved):
    lm, path = saved
    lm.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_failed_save_leaves_old_checkpoint(saved, monkeypatch):
    lm, path = saved
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("scribelm.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        lm.save(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_missing_weights(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        scribelm.load(path)


def test_truncated_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        scribelm.load(path)


def test_corrupt_config(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        scribelm.load(path)


def test_missing_config(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        scribelm.load(path)


def test_config_disagrees_with_weights(saved):
    _, path = saved
    data = json.loads((path / "config.json").read_text())
    data["d_mlp"] = 128
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="has shape .* but config.json implies"):
        scribelm.load(path)


def test_bad_field_in_config(saved):
    _, path = saved
    data = json.loads((path / "config.json").read_text())
    data["n_heads"] = "four"
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'n_heads' must be int"):
        read_config(path)


def test_load_nonexistent(tmp_path):
    with pytest.raises(CheckpointError, match="no model at"):
        scribelm.load(tmp_path / "nothing")


def test_load_as_bf16(saved):
    _, path = saved
    lm = scribelm.load(path, dtype=torch.bfloat16)
    assert lm.model.blocks[0].attention.q.weight.dtype == torch.bfloat16
    logits = lm.model(torch.randint(0, 400, (1, 8)))
    assert torch.isfinite(logits.float()).all()


def test_save_never_replaces_a_directory_holding_other_files(saved, tmp_path):
    from scribelm.io import OutputError

    lm, path = saved
    weights = (path / "model.safetensors").read_bytes()
    (path / "notes.txt").write_text("my notes on this model")
    with pytest.raises(OutputError, match="notes.txt"):
        lm.save(path)
    assert (path / "notes.txt").read_text() == "my notes on this model"
    assert (path / "model.safetensors").read_bytes() == weights
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "letter.txt").write_text("dear")
    with pytest.raises(OutputError, match="not written by scribelm"):
        lm.save(documents)
    assert [p.name for p in documents.iterdir()] == ["letter.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "documents"]  # no temporaries
