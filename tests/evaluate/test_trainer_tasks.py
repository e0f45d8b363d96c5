"""The Trainer's evaluations run task lists too: their metrics land in metrics.jsonl as
"task/metric" next to the validation loss, and in a plot; a bad task stops the run before
it trains."""

import json

import pytest
import torch

from scribelm.errors import ScribeError
from scribelm.evaluate import evaluate, load_tasks
from scribelm.evaluate.scoring import ScoringModel
from scribelm.model import Transformer
from scribelm.train import TrainConfig, Trainer
from tests.conftest import tiny_config
from tests.evaluate.taskdata import write_parity_tasks


def _batches(tokenizer, corpus, n=4, T=16):
    ids = torch.tensor(tokenizer.encode(" ".join(corpus[:10])))
    return [{"ids": ids[i * T:(i + 1) * T][None], "targets": ids[i * T + 1:(i + 1) * T + 1][None]} for i in range(n)]


def test_eval_every_runs_tasks_into_metrics_jsonl(tmp_path, tokenizer, corpus, one_thread):
    tasks = write_parity_tasks(tmp_path / "tasks")
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size))
    config = TrainConfig(max_steps=4, eval_every=2, warmup_steps=1, checkpoint_every=0, keep_best=False,
                         eval_tasks=f"{tasks / 'capitals_mc0.yaml'},{tasks / 'verses_rolling.yaml'}",
                         eval_tasks_limit=3, device="cpu")
    trainer = Trainer(model, None, _batches(tokenizer, corpus), _batches(tokenizer, corpus, n=2), config,
                      tmp_path / "run", tokenizer=tokenizer)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0.0 <= r["capitals_mc0/acc"] <= 1.0 and r["verses_rolling/bits_per_byte"] > 0
    # the last line is what `scribe eval` gives the final weights on the same documents
    final = {r.name: r for r in evaluate(ScoringModel(model.eval(), tokenizer),
                                          load_tasks([str(tasks / "capitals_mc0.yaml"), str(tasks / "verses_rolling.yaml")]),
                                          limit=3)}
    assert evals[-1]["verses_rolling/bits_per_byte"] == pytest.approx(final["verses_rolling"].metrics["bits_per_byte"][0], rel=1e-5)
    assert (tmp_path / "run" / "eval_tasks.png").stat().st_size > 0


def test_a_bad_task_stops_the_run_before_training(tmp_path, tokenizer, corpus):
    config = TrainConfig(max_steps=2, eval_tasks="no_such_task", device="cpu")
    with pytest.raises(ScribeError, match="unknown task 'no_such_task'"):
        Trainer(Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), None, _batches(tokenizer, corpus), None,
                config, tmp_path / "run", tokenizer=tokenizer)
