"""T5's span corruption (15% noise in spans of mean 3, sentinels, nothing lost) and the
supervised input -> target objective, trained in the shared Trainer; `objective: span`
pretrains a tiny T5 whose validation loss falls; a pair missing its target is one line."""

import json

import pytest
import torch

import scribelm
from scribelm.config import ModelConfig
from scribelm.errors import ScribeError
from scribelm.seq2seq import EncoderDecoder
from scribelm.train import TrainConfig, Trainer
from scribelm.train.pretrain import run_pretraining
from scribelm.train.seq2seq_objectives import (
    Seq2SeqObjective, read_seq2seq_pairs, seq2seq_batches, span_corrupt,
)

SENTINELS = list(range(1000, 1100))


def tiny_t5(vocab_size: int) -> ModelConfig:
    return ModelConfig.from_preset("t5-small", vocab_size=vocab_size, context_length=64, d_model=32, n_layers=2,
                                   encoder_layers=2, n_heads=4, head_dim=8, d_mlp=64)


def test_span_corruption_hides_fifteen_percent_in_spans_of_three_and_loses_nothing():
    g = torch.Generator().manual_seed(0)
    noise, spans = 0, 0
    for _ in range(300):
        ids = torch.randint(0, 1000, (128,), generator=g).tolist()
        inputs, targets = span_corrupt(ids, SENTINELS, generator=g)
        n_spans = sum(1 for t in inputs if t in SENTINELS)
        assert [t for t in targets if t in SENTINELS] == SENTINELS[: n_spans + 1]  # in order, one closing
        # put the spans back where their sentinels stand: the original sequence
        pieces, current = {}, None
        for t in targets:
            if t in SENTINELS:
                current = t
                pieces[current] = []
            else:
                pieces[current].append(t)
        rebuilt = [x for t in inputs for x in (pieces[t] if t in SENTINELS else [t])]
        assert rebuilt == ids
        noise += len(targets) - n_spans - 1
        spans += n_spans
    assert abs(noise / (300 * 128) - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.2


def test_seq2seq_pairs_train_in_the_shared_trainer(tmp_path, tokenizer, one_thread):
    words = ["light", "earth", "water", "heaven", "night", "day", "seed", "fruit"]
    lines = [{"input": f"{a} {b}", "target": f"{b} {a}"} for a in words for b in words]  # learn to swap two words
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    pairs = read_seq2seq_pairs(tmp_path / "pairs.jsonl", tokenizer)
    torch.manual_seed(0)
    model = EncoderDecoder(tiny_t5(tokenizer.vocab_size))
    config = TrainConfig(max_steps=150, lr=1e-2, warmup_steps=5, eval_every=50, eval_batches=2, plot=False,
                         checkpoint_every=1000)
    trainer = Trainer(model, Seq2SeqObjective(), seq2seq_batches(pairs, 16), None, config, tmp_path / "run")
    everything = next(seq2seq_batches(pairs, 64, shuffle=False))
    with torch.no_grad():
        before = trainer.objective(model.eval(), everything)[0].item()
    trainer.fit()
    with torch.no_grad():
        after = trainer.objective(model.eval(), everything)[0].item()
    assert after < before / 2


def test_a_pair_without_target_is_refused_naming_its_line(tmp_path, tokenizer):
    (tmp_path / "pairs.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "only the input"}\n')
    with pytest.raises(ScribeError, match=r"pairs.jsonl:2: .*'target' is missing"):
        read_seq2seq_pairs(tmp_path / "pairs.jsonl", tokenizer)


def test_span_pretraining_of_a_tiny_t5_lowers_the_validation_loss(tmp_path, data_dir, one_thread):
    recipe = {
        "objective": "span",
        "model": {"preset": "t5-small", "context_length": 64, "d_model": 32, "n_layers": 2, "encoder_layers": 2,
                  "n_heads": 4, "head_dim": 8, "d_mlp": 64},
        "data": {"dir": str(data_dir), "batch_size": 16, "sequence_length": 32},
        "train": {"max_steps": 200, "lr": 1e-2, "warmup_steps": 5, "eval_every": 100, "eval_batches": 4,
                  "checkpoint_every": 200, "plot": False, "seed": 0},
        "out_dir": str(tmp_path / "run"),
    }
    result = run_pretraining(recipe)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 0.25
    lm = scribelm.load(result.last_checkpoint)  # a native encoder-decoder checkpoint with its sentinels
    assert lm.model.is_encoder_decoder and lm.tokenizer.token_to_id("<|sentinel_0|>") is not None
