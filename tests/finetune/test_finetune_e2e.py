"""Fine-tuning end to end: a synthetic instruction task, learned from scratch-sized weights,
judged by exact match of greedy generations on held-out prompts."""

import json
import random

import pytest
import torch

from scribelm.adapters import LoRAConfig
from scribelm.config import ModelConfig
from scribelm.finetune.run import FinetuneOptions, finetune_sft, load_with_adapters
from scribelm.generate import chat_stop_ids
from scribelm.lm import LM
from scribelm.model import Transformer
from scribelm.tokenizer import Tokenizer

WORDS = "red blue green cat dog sun moon tree fish bird".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def reverse_task(n_train=600, n_test=60, seed=0):
    """'reverse: a b c' -> 'c b a' over 3 distinct words of 10 (720 prompts); train and test never overlap."""
    rng = random.Random(seed)
    prompts = {}
    while len(prompts) < n_train + n_test:
        words = rng.sample(WORDS, 3)
        prompts["reverse: " + " ".join(words)] = " ".join(reversed(words))
    items = [{"instruction": k, "output": v} for k, v in prompts.items()]
    rng.shuffle(items)
    return items[:n_train], items[n_train:]


def small_lm(texts, d_model=64, seed=0):
    tokenizer = Tokenizer.train(texts, vocab_size=300, min_frequency=1)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, d_model=d_model, n_layers=2, n_heads=4,
                         d_mlp=4 * d_model, activation="swiglu", norm="rmsnorm", position="rope", qkv_bias=False,
                         attn_out_bias=False, mlp_bias=False, tie_embeddings=True)
    torch.manual_seed(seed)
    return LM(Transformer(config), tokenizer, {})


def exact_match(lm, items):
    prompts = [lm.tokenizer.encode_chat([{"role": "user", "content": e["instruction"]}]) for e in items]
    replies = lm.generate(prompts, temperature=0.0, max_new_tokens=8, extra_stop_ids=chat_stop_ids(lm.tokenizer))
    return sum(r.strip() == e["output"] for r, e in zip(replies, items)) / len(items)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.slow
def test_sft_lifts_held_out_exact_match_far_above_the_untuned_model(tmp_path):
    train, test = reverse_task()
    lm = small_lm([e["instruction"] + " " + e["output"] for e in train + test])
    untuned = exact_match(lm, test)
    data = write_jsonl(tmp_path / "train.jsonl", train)
    options = FinetuneOptions(method="full", max_steps=360, batch_size=16, lr=3e-3, val_fraction=0.05, device="cpu")
    result = finetune_sft(lm, data, tmp_path / "run", options)
    tuned = exact_match(lm, test)
    assert untuned <= 0.05
    assert tuned >= 0.8, (untuned, tuned)
    assert result.final_eval["val_loss"] < 0.2
    assert result.data["packing_fill"] > 0.85 and result.data["skipped"] == 0
    # the saved model is the tuned one
    import scribelm

    assert exact_match(scribelm.load(result.output), test[:20]) == exact_match(lm, test[:20])


@pytest.fixture(scope="module")
def copy_tuned_base(tmp_path_factory):
    """A base that already knows the words and how to answer: tuned to repeat them, not to reverse them.
    (A random-init base cannot be steered by adapters alone: its frozen tied embeddings and norms
    cap how confident any output can be.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("copy_base")
    train, test = reverse_task(n_train=300, n_test=30)
    repeat = [{"instruction": e["instruction"].replace("reverse", "repeat"), "output": e["instruction"].split(": ")[1]}
              for e in train]
    lm = small_lm([e["instruction"] + " " + e["output"] for e in train + test + repeat])
    finetune_sft(lm, write_jsonl(root / "repeat.jsonl", repeat), root / "run",
                 FinetuneOptions(max_steps=150, batch_size=16, lr=3e-3, val_fraction=0.0, device="cpu"))
    torch.set_num_threads(before)
    return lm.save(root / "base"), train, test


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_learn_a_new_task_and_merge_into_an_equal_model(tmp_path, copy_tuned_base, method):
    import scribelm

    base_dir, train, test = copy_tuned_base
    data = write_jsonl(tmp_path / "train.jsonl", train)
    val = write_jsonl(tmp_path / "val.jsonl", test)
    before = finetune_loss(scribelm.load(base_dir), val)
    lm = scribelm.load(base_dir)
    options = FinetuneOptions(method=method, lora=LoRAConfig(rank=16, alpha=32, targets="all-linear"), max_steps=80,
                              batch_size=16, lr=1e-2, val_data=str(val), device="cpu", quant_group_size=32)
    result = finetune_sft(lm, data, tmp_path / "run", options, base_name=str(base_dir))
    assert result.trainable_parameters < 0.5 * result.total_parameters
    assert result.final_eval["val_loss"] < before - 0.4, (before, result.final_eval)
    if method == "qlora":
        bf16 = 2 * Transformer(lm.config).num_parameters()
        assert result.base_bytes <= 0.3 * bf16
    # adapters on the full-precision base, merged, give the same logits as unmerged
    merged = load_with_adapters(base_dir, result.output)
    unmerged = load_with_adapters(base_dir, result.output, merge=False)
    ids = torch.tensor([lm.tokenizer.encode_chat([{"role": "user", "content": test[0]["instruction"]}])])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), unmerged.model(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged.model(ids), scribelm.load(base_dir).model(ids), atol=1e-3)


def finetune_loss(lm, path):
    from scribelm.data.chat import ChatDataset, SFTLoader

    ds = ChatDataset.from_jsonl(path, lm.tokenizer, max_length=32)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in SFTLoader(ds, 16, pack=False, shuffle=False):
            n = int((batch["targets"] != -100).sum())
            total += float(lm.model.loss(batch["ids"], batch["targets"])) * n
            count += n
    return total / count
