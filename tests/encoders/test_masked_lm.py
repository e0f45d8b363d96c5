"""The masked-LM objective: BERT's 15% / 80-10-10 statistics over 10^5 tokens, never a
special token; `objective: mlm` in a pretraining recipe trains a tiny BERT whose
validation loss falls; mismatched objective and model are refused in one line."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import scribelm
from scribelm.errors import ScribeError
from scribelm.train.masking import mask_tokens
from scribelm.train.objectives import IGNORE_INDEX
from scribelm.train.pretrain import load_recipe, run_pretraining


def test_masking_statistics_over_a_hundred_thousand_tokens():
    g = torch.Generator().manual_seed(0)
    vocab, mask_id, special = 1000, 3, [0, 1, 2, 3]
    ids = torch.randint(0, vocab, (100, 1000), generator=g)  # 10^5 tokens, ~400 of them special
    inputs, targets = mask_tokens(ids, mask_id=mask_id, vocab_size=vocab, special_ids=special, generator=g)
    is_special = torch.isin(ids, torch.tensor(special))
    selected = targets != IGNORE_INDEX
    assert not (selected & is_special).any()  # never a special token
    assert torch.equal(targets[selected], ids[selected])  # targets are the original tokens
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing else changes
    n = int(selected.sum())
    assert abs(n / int((~is_special).sum()) - 0.15) < 0.01
    masked = (inputs == mask_id) & selected
    unchanged = (inputs == ids) & selected
    replaced = selected & ~masked & ~unchanged
    assert abs(int(masked.sum()) / n - 0.8) < 0.01
    assert abs(int(replaced.sum()) / n - 0.1) < 0.01
    # a random replacement can land on the original token (1 in ~996): "unchanged" is 10% plus that
    assert abs(int(unchanged.sum()) / n - 0.1) < 0.01
    assert not torch.isin(inputs[replaced], torch.tensor(special)).any()  # replacements are ordinary tokens


def _recipe(tmp_path, data_dir, **extra):
    recipe = {
        "objective": "mlm",
        "model": {"preset": "tiny-bert", "context_length": 32, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_mlp": 64},
        "data": {"dir": str(data_dir), "batch_size": 32, "sequence_length": 32},
        "train": {"max_steps": 400, "lr": 1e-2, "warmup_steps": 5, "eval_every": 100, "eval_batches": 4,
                  "checkpoint_every": 400, "plot": False, "seed": 0},
        "out_dir": str(tmp_path / "run"),
    }
    recipe.update(extra)
    return recipe


def test_mlm_pretraining_lowers_the_validation_loss_and_saves_a_mask_token(tmp_path, data_dir, one_thread):
    result = run_pretraining(_recipe(tmp_path, data_dir))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 1.0  # past the unigram plateau: context is used
    lm = scribelm.load(result.last_checkpoint)
    assert not lm.config.causal and lm.config.mlm_head
    mask_id = lm.tokenizer.token_to_id("<|mask|>")
    assert mask_id == lm.config.vocab_size - 1  # the one row added for the new special token
    assert lm.embed(["In the beginning", "and the earth"]).shape == (2, 32)


def test_the_tiny_bert_and_tiny_t5_recipes_read():
    recipes = Path(__file__).parents[2] / "recipes"
    assert load_recipe(recipes / "tiny-bert.yaml")["objective"] == "mlm"
    assert load_recipe(recipes / "tiny-t5.yaml")["objective"] == "span"


def test_objective_and_model_must_agree(tmp_path, data_dir):
    with pytest.raises(ScribeError, match="objective mlm needs a bidirectional model"):
        run_pretraining(_recipe(tmp_path, data_dir, model={"preset": "tiny", "d_model": 32, "n_layers": 1}))
    with pytest.raises(ScribeError, match="objective causal needs a causal model"):
        run_pretraining(_recipe(tmp_path, data_dir, objective="causal"))
    with pytest.raises(ScribeError, match="unknown objective 'prefix'"):
        run_pretraining(_recipe(tmp_path, data_dir, objective="prefix"))
    with pytest.raises(ScribeError, match="objective span needs an encoder-decoder"):
        run_pretraining(_recipe(tmp_path, data_dir, objective="span"))
