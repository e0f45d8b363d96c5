"""`scribe eval`: the table, JSON, samples, several models side by side; and every kind of bad
task file answered with one line naming the problem, exit status 2, no traceback."""

import json
import subprocess
import sys

import pytest
import torch

from scribelm.cli import main
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config
from tests.evaluate.taskdata import write_jsonl, write_parity_tasks, write_yaml


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval-cli")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(LM(model=Transformer(tiny_config(vocab_size=tokenizer.vocab_size)).eval(),
                        tokenizer=tokenizer).save(root / f"model{seed}"))
    return paths, write_parity_tasks(root / "tasks")


def test_table_json_and_samples(models, tmp_path, capsys, one_thread):
    (a, _), tasks = models
    code = main(["eval", str(a), "--tasks", "capitals_mc0,verses_rolling", "--include-path", str(tasks),
                 "--limit", "4", "--log-samples", str(tmp_path / "samples"), "--output", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].split("|")[1:4] == ["Task          ", "n-shot", "Metric         "]
    assert "|capitals_mc0  |     0|acc " in out and "bits_per_byte" in out
    saved = json.loads((tmp_path / "r.json").read_text())["models"][0]
    assert [r["task"] for r in saved["results"]] == ["capitals_mc0", "verses_rolling"]
    assert saved["results"][0]["samples"] == 4
    lines = (tmp_path / "samples").glob("*capitals_mc0.jsonl").__next__().read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 4 and len(first["loglikelihoods"]) == 3 and first["context"].startswith("Q: What is")
    acc = sum(json.loads(line)["scores"]["acc"] for line in lines) / 4
    assert saved["results"][0]["metrics"]["acc"]["value"] == pytest.approx(acc)


def test_several_models_one_table_with_differences(models, capsys, one_thread):
    (a, b), tasks = models
    assert main(["eval", str(a), str(b), "--tasks", "capitals_mc0", "--include-path", str(tasks), "--limit", "3",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in data["models"]] == [str(a), str(b)]
    assert main(["eval", str(a), str(b), "--tasks", "capitals_mc0", "--include-path", str(tasks), "--limit", "3"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"{b} − {a}" in header


def _bad(tmp_path, yaml_text, rows=None):
    data = write_jsonl(tmp_path / "data.jsonl", rows if rows is not None else
                       [{"q": "one", "choices": ["a", "b"], "label": 0}, {"q": "two", "choices": ["a", "b"], "label": 1}])
    return write_yaml(tmp_path / "task.yaml", yaml_text.replace("DATA", str(data)))


BASE = """task: bad
dataset_path: json
dataset_kwargs: {data_files: {test: DATA}}
test_split: test
doc_to_text: "{{q}}"
doc_to_choice: choices
doc_to_target: label
"""


@pytest.mark.parametrize("yaml_text, rows, message", [
    (BASE + "output_type: ranking\n", None, "unknown output_type 'ranking'"),
    (BASE.replace("DATA", "/nonexistent/data.jsonl") + "output_type: multiple_choice\n", None,
     "missing data file /nonexistent/data.jsonl"),
    (BASE.replace('"{{q}}"', '"{{question}}"') + "output_type: multiple_choice\n", None,
     "doc_to_text uses field 'question', which data.jsonl line 1 does not have (its fields: q, choices, label)"),
    (BASE + "output_type: multiple_choice\n", [{"q": "x", "choices": ["a", "b"], "label": 0},
                                                {"q": "y", "choices": ["a", "b"], "label": 5}],
     "label 5 of data.jsonl line 2 is out of range for its 2 choices"),
    ("task: hub\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\ntest_split: test\noutput_type: multiple_choice\n",
     None, "dataset_path 'allenai/ai2_arc' is not a local format; scribe eval does not download datasets"),
    (BASE + "output_type: multiple_choice\nprocess_docs: !function utils.process\n", None,
     "runs Python code from the task folder"),
    (BASE + "output_type: multiple_choice\nmetric_list: [{metric: bleu}]\n", None,
     "metric 'bleu' does not apply to multiple_choice"),
    (BASE + "output_type: multiple_choice\n", [{"q": "x", "choices": ["a"], "label": 0}, "oops"],
     "data.jsonl line 2: each line is a JSON object, got str"),
])
def test_bad_task_files_are_one_clear_line(models, tmp_path, capsys, yaml_text, rows, message):
    (a, _), _ = models
    task = _bad(tmp_path, yaml_text, rows)
    assert main(["eval", str(a), "--tasks", str(task)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_unknown_task_name_and_no_traceback_from_the_command(models, tmp_path):
    (a, _), _ = models
    done = subprocess.run([sys.executable, "-m", "scribelm.cli", "eval", str(a), "--tasks", "no_such_task"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown task 'no_such_task'") and "Traceback" not in done.stderr
