import json
import re
import subprocess
import sys

import scribelm


def scribe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scribelm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_quickstart_end_to_end_on_the_bundled_corpus(tmp_path):
    result = scribe("quickstart", "--minutes", 0.2, "--out", tmp_path / "qs")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    bpb = float(re.search(r"validation: ([0-9.]+) bits per byte", out).group(1))
    assert 0 < bpb < 8.5  # a few steps from random init: near uniform over bytes, but measured and finite
    assert out.count("sample") == 3 and "In the beginning" in out
    model_dir = tmp_path / "qs" / "model"
    assert f"model: {model_dir}" in out
    lm = scribelm.load(model_dir)  # what every other command loads
    assert lm.tokenizer.vocab_size == lm.config.vocab_size == 4096
    assert isinstance(lm.generate("And God said", max_new_tokens=5, seed=0), str)
    manifest = json.loads((tmp_path / "qs" / "data" / "manifest.json").read_text())
    assert manifest["documents"] == 1189  # every chapter of the King James Bible
    records = [json.loads(line) for line in (tmp_path / "qs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[-1]["val_bpb"] - bpb) <= 5e-4  # the printed number is the logged one, rounded
    assert (tmp_path / "qs" / "run" / "loss.png").stat().st_size > 0


def test_quickstart_on_your_own_corpus(tmp_path):
    corpus = tmp_path / "mine.txt"
    corpus.write_text("\n\n".join(f"Entry {i}: the weather on day {i} was {'sunny' if i % 3 else 'rainy'} and mild."
                                  for i in range(400)))
    result = scribe("quickstart", "--minutes", 0.1, "--corpus", corpus, "--out", tmp_path / "qs")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bits per byte" in result.stdout and str(corpus) in result.stdout
    lm = scribelm.load(tmp_path / "qs" / "model")
    assert lm.config.vocab_size == lm.tokenizer.vocab_size <= 4096

    missing = scribe("quickstart", "--corpus", tmp_path / "nope.txt", "--out", tmp_path / "qs2")
    assert missing.returncode == 2 and "input not found" in missing.stderr and "Traceback" not in missing.stderr
