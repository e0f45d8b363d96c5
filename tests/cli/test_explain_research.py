"""`scribe explain embeddings | superposition | sae`: the commands end to end on the
MiniLM weights and a small trained model, and their one-line errors."""

from __future__ import annotations

import json

import pytest

from scribelm.cli import main


def explain(argv: list[str], capsys) -> tuple[int, str, str]:
    """`scribe explain SUBVERB ...` in this process: (exit status, stdout, stderr)."""
    code = main(["explain", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.trained_tiny import trained_lm

    path = tmp_path_factory.mktemp("model") / "tiny"
    trained_lm("llama").save(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from tests.trained_tiny import corpus

    path = tmp_path_factory.mktemp("text") / "kjv.txt"
    path.write_text(corpus()[0].replace("\n", "\n\n"), encoding="utf-8")
    return path


def test_embeddings_of_minilm(tmp_path, capsys):
    code, out, _ = explain(["embeddings", "minilm", "--analogy", "king", "man", "woman", "--nearest", "paris",
                            "--map", "king", "queen", "man", "woman", "-o", str(tmp_path / "map"), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["analogies"][0]["answers"][0][0] == "queen"
    assert "paris" not in [w for w, _ in result["nearest"]["paris"]]
    assert (tmp_path / "map" / "map.png").stat().st_size > 1000


def test_embeddings_evaluation_on_a_file(tmp_path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text(": capitals\nathens greece paris france\nberlin germany rome italy\nfoo bar baz qux\n")
    code, out, _ = explain(["embeddings", "minilm", "--evaluate", str(questions)], capsys)
    assert code == 0
    assert "analogy accuracy" in out and "1 questions skipped" in out


def test_embeddings_of_a_trained_model_and_bad_words(model_dir, capsys):
    from scribelm.inspect.geometry import lm_input_embeddings
    from tests.trained_tiny import trained_lm

    word = lm_input_embeddings(trained_lm("llama")).words[0]
    code, out, _ = explain(["embeddings", str(model_dir), "--nearest", word, "-k", "3"], capsys)
    assert code == 0 and f"nearest to {word}:" in out
    code, out, _ = explain(["embeddings", str(model_dir), "--vectors", "both", "--nearest", word, "-k", "3", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["input"]["words"] == result["pooled"]["words"]
    assert result["input"]["nearest"][word] != result["pooled"]["nearest"][word]  # the pooled outputs are other vectors
    code, out, err = explain(["embeddings", "minilm", "--analogy", "king", "man", "zzqxv"], capsys)
    assert code == 2 and err.startswith("error: not in the vocabulary: 'zzqxv'")


def test_superposition_writes_plots(tmp_path, capsys):
    out_dir = tmp_path / "sup"
    code, out, _ = explain(["superposition", "--vectors", "300", "--dim", "20", "--spread-steps", "5", "--steps", "300",
                            "--sparsity", "0.9", "-o", str(out_dir), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["counting"]["random"]["n"] == 300 and result["toy"][0]["represented"] >= 4
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["angles.png", "toy-sparsity-0.9.png"]
    code, _, err = explain(["superposition", "--only", "toy", "-o", str(out_dir)], capsys)
    assert code == 2 and "--force" in err  # an earlier run is not replaced silently
    code, _, err = explain(["superposition", "--hidden", "5", "-o", str(tmp_path / "other")], capsys)
    assert code == 2 and "d < n" in err


def test_sae_trains_reports_and_shows_features(model_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "sae"
    code, out, _ = explain(["sae", str(model_dir), "--data", str(text_file), "--layer", "1", "--k", "8", "--steps", "40",
                            "--batch-tokens", "256", "--sequence-length", "64", "--show", "3", "-o", str(out_dir)], capsys)
    assert code == 0, out
    assert "explained variance" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["hook"] == "blocks.1.mlp.hook_post" and report["features"] == 8 * 128
    assert report["l0"] <= 8 and 0 < report["explained_variance"] <= 1
    assert len(report["contexts"]) == 3
    page = (out_dir / "features.html").read_text()
    assert page.count('class="feature"') == 3 and "<script" not in page
    from scribelm.inspect.sae import SparseAutoencoder

    assert SparseAutoencoder.load(out_dir / "sae.safetensors").config.k == 8


def test_sae_on_a_layer_the_model_lacks(model_dir, text_file, tmp_path, capsys):
    code, _, err = explain(["sae", str(model_dir), "--data", str(text_file), "--layer", "7", "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and err.strip() == "error: the model has 2 layers (0..1); there is no layer 7"
    assert not (tmp_path / "x").exists()
