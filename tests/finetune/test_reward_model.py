"""Reward models: training lifts held-out pairwise accuracy; the saved model loads and scores the
same; transformers' AutoModelForSequenceClassification scores the exported directory the same."""

from __future__ import annotations

import json
import random

import pytest
import torch

import scribelm
from scribelm.errors import ScribeError
from scribelm.finetune.reward import export_reward_hf, load_reward_model, score_texts
from scribelm.finetune.reward_run import finetune_reward
from scribelm.finetune.run import FinetuneOptions
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["best", "times", "worst", "wisdom", "earth", "heaven", "money", "fox", "dog", "lazy", "quick", "brown",
         "age", "beginning", "little", "years"]


def write_prefs(path, n=48, seed=0, margin=False):
    """Chosen replies end with a full stop, rejected ones do not: easy to learn, easy to check."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            record = {"prompt": f"tell me about {rng.choice(WORDS)}", "chosen": words + ".", "rejected": words}
            if margin:
                record["margin"] = 0.5
            f.write(json.dumps(record) + "\n")
    return path


def tiny_lm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return scribelm.LM(scribelm.Transformer(tiny_config()).eval(), tokenizer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_prefs(tmp / "prefs.jsonl", margin=True)
    options = FinetuneOptions(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=2, val_fraction=0.25, seed=0)
    result = finetune_reward(tiny_lm(tokenizer), data, tmp / "run", options, center_coefficient=0.01)
    return tmp, result


def test_training_lifts_held_out_pairwise_accuracy(trained):
    tmp, result = trained
    before, after = result.extra["held_out_before"], result.extra["held_out_after"]
    assert after["pairs"] == 12
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"]
    assert after["loss"] < before["loss"]
    steps = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in s and "reward_margin" in s for s in steps)  # the objective's metrics are logged


def test_the_saved_model_loads_as_a_reward_model_and_exports_to_transformers(trained, tokenizer):
    from transformers import AutoModelForSequenceClassification

    tmp, result = trained
    model, tok = load_reward_model(result.output)
    prompts = ["tell me about fox", "tell me about dog", "tell me about age"]
    replies = ["quick brown fox.", "lazy dog", "the best of times."]
    ours = score_texts(model, tok, prompts, replies)
    assert ours[0] > ours[1] and ours[2] > ours[1]
    assert scribelm.load(result.output).config.d_model == 32  # also a plain language-model checkpoint

    hf_dir = export_reward_hf(model, tok, tmp / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert hf.config.num_labels == 1 and hf.config.architectures == ["LlamaForSequenceClassification"]
    from scribelm.finetune.reward import conversation_ids

    rows = [conversation_ids(tok, p, r) for p, r in zip(prompts, replies)]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(theirs, torch.tensor(ours), atol=1e-4, rtol=0)


def test_a_directory_without_a_head_is_refused(tmp_path, tokenizer):
    from scribelm.checkpoint import save_checkpoint

    lm = tiny_lm(tokenizer)
    save_checkpoint(tmp_path / "plain", lm.model, lm.config, tokenizer)
    with pytest.raises(ScribeError, match="not a reward model"):
        load_reward_model(tmp_path / "plain")


def test_cli_trains_a_reward_model(tmp_path, tokenizer, capsys):
    from scribelm.checkpoint import save_checkpoint
    from scribelm.cli import main

    lm = tiny_lm(tokenizer)
    save_checkpoint(tmp_path / "base", lm.model, lm.config, tokenizer)
    data = write_prefs(tmp_path / "prefs.jsonl", n=24, seed=1)
    assert main(["finetune", "reward", str(tmp_path / "base"), "--data", str(data), "-o", str(tmp_path / "run"),
                 "--max-steps", "4", "--lr", "1e-3", "--batch-size", "8", "--export-hf", str(tmp_path / "hf")]) == 0
    assert "pairwise accuracy" in capsys.readouterr().out
    load_reward_model(tmp_path / "run" / "model")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForSequenceClassification"] and exported["num_labels"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}) + "\n")
    assert main(["finetune", "reward", str(tmp_path / "base"), "--data", str(bad), "-o", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "margin" in err and "Traceback" not in err
