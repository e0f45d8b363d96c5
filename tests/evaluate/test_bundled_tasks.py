"""The bundled tasks: rebuilt byte for byte from the corpus by their build script, found by
name and by their group, and they tell a trained model from an untrained one."""

import json

import pytest
import torch

import scribelm
from scribelm.cli import main
from scribelm.evaluate import load_tasks
from scribelm.evaluate.kjv_tasks import TASK_DIR, build_files, held_out_chapters
from tests.trained_tiny import config, trained_lm


def test_build_is_deterministic_and_matches_the_shipped_files():
    built = build_files()
    assert sorted(built) == sorted(p.name for p in TASK_DIR.iterdir())
    for name, content in built.items():
        assert (TASK_DIR / name).read_text(encoding="utf-8") == content, name
    assert build_files() == built


def test_held_out_chapters_are_what_training_leaves_out():
    from scribelm.data.sources import document_hash, is_validation, normalize

    chapters = held_out_chapters()
    assert 5 <= len(chapters) <= 30
    assert all(is_validation(document_hash(normalize(c)), 0.01) for c in chapters)
    rows = [json.loads(line) for line in (TASK_DIR / "kjv_cloze.jsonl").read_text().splitlines()]
    assert all(r["target"].startswith(" ") and r["target"][1:].isalpha() for r in rows)
    assert all(any(r["context"] + r["target"] in c for c in chapters) for r in rows[:20])


def test_the_kjv_group_names_its_three_tasks():
    assert sorted(t.name for t in load_tasks(["kjv"])) == ["kjv_bpb", "kjv_cloze", "kjv_mc"]


def test_bundled_tasks_tell_trained_from_untrained(tmp_path, capsys, one_thread):
    trained = trained_lm("llama").save(tmp_path / "trained")
    torch.manual_seed(0)
    scribelm.LM(scribelm.Transformer(config("llama")).eval(), trained_lm("llama").tokenizer).save(tmp_path / "untrained")
    assert main(["eval", str(tmp_path / "untrained"), str(trained), "--tasks", "kjv", "--limit", "12", "--json"]) == 0
    untrained, learned = ({r["task"]: r["metrics"] for r in m["results"]}
                          for m in json.loads(capsys.readouterr().out)["models"])
    assert learned["kjv_bpb"]["bits_per_byte"]["value"] < 0.8 * untrained["kjv_bpb"]["bits_per_byte"]["value"]
    assert learned["kjv_cloze"]["perplexity"]["value"] < untrained["kjv_cloze"]["perplexity"]["value"]
    assert set(learned["kjv_mc"]) == {"acc", "acc_norm"}
