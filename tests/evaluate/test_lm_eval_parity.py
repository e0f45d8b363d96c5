"""The same task files scored by lm-evaluation-harness itself (`lm_eval.simple_evaluate`,
model "hf") and by scribelm on random-init transformers Llama and GPT-2 models saved by the
test: per-sample log-likelihoods within 1e-4, the same acc / acc_norm / perplexity /
bits_per_byte, the same generations and exact match."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DISABLE_MULTIPROC", "1")

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

import scribelm  # noqa: E402
from scribelm.evaluate import evaluate, load_tasks  # noqa: E402
from scribelm.lm import LM  # noqa: E402
from tests.evaluate.taskdata import CAPITALS, VERSES, write_parity_tasks  # noqa: E402


def _transformers_model(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # sharper than the 0.02-std init, so greedy generation has no near-ties
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("parity")
    tasks_dir = write_parity_tasks(root / "tasks")
    models = {}
    for kind in ("llama", "gpt2"):
        raw = root / f"{kind}-weights"
        _transformers_model(kind, tokenizer.vocab_size).save_pretrained(raw)
        # the tokenizer travels in Hugging Face's files, written by the exporter
        models[kind] = LM(model=scribelm.load(raw).model, tokenizer=tokenizer).save(root / kind, format="hf")
    return tasks_dir, models


def _lm_eval(model_dir, tasks_dir, names):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=names, batch_size=4, device="cpu",
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), log_samples=True,
        bootstrap_iters=0)
    return out["results"], out["samples"]


NAMES = ["capitals_mc0", "capitals_mc2", "verses_rolling", "capitals_gen", "capitals_ll"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scores_equal_lm_eval_hf(parity_setup, kind):
    tasks_dir, models = parity_setup
    theirs, their_samples = _lm_eval(models[kind], tasks_dir, NAMES)
    ours = {r.name: r for r in evaluate(scribelm.load(models[kind]), load_tasks(NAMES, [tasks_dir]), batch_size=4)}
    assert len(CAPITALS) and len(VERSES)

    for name in ("capitals_mc0", "capitals_mc2", "capitals_ll"):
        samples = sorted(their_samples[name], key=lambda s: s["doc_id"])
        assert len(samples) == len(ours[name].samples)
        for theirs_s, ours_s in zip(samples, ours[name].samples):
            # the same prompt, then the same log-likelihood per choice
            assert theirs_s["arguments"][0][0] == ours_s["context"]
            their_lls = [float(r[0][0]) for r in theirs_s["resps"]]
            assert ours_s["loglikelihoods"] == pytest.approx(their_lls, abs=1e-4)
            assert ours_s["is_greedy"] == [bool(r[0][1]) for r in theirs_s["resps"]]
        for metric, (value, _) in ours[name].metrics.items():
            assert value == pytest.approx(theirs[name][f"{metric},none"], rel=1e-5), (name, metric)
    assert set(ours["capitals_mc2"].metrics) == {"acc", "acc_norm"}
    assert set(ours["capitals_ll"].metrics) == {"perplexity", "acc"}

    rolling = sorted(their_samples["verses_rolling"], key=lambda s: s["doc_id"])
    assert [float(s["resps"][0][0]) for s in rolling] == pytest.approx(
        [s["loglikelihood"] for s in ours["verses_rolling"].samples], abs=1e-4)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["verses_rolling"].metrics[metric][0] == pytest.approx(theirs["verses_rolling"][f"{metric},none"], rel=1e-6)

    generated = sorted(their_samples["capitals_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in generated] == [s["generation"] for s in ours["capitals_gen"].samples]
    assert ours["capitals_gen"].metrics["exact_match"][0] == theirs["capitals_gen"]["exact_match,none"]
