"""The server as an evaluation backend: prompt log-probabilities with echo, scoring without generating,
and lm-eval's `local-completions` model against `scribe serve` agreeing with its `hf` backend."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from scribelm.lm import LM
from scribelm.model import Transformer
from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from tests.conftest import tiny_config
from tests.serving import ServeProcess, ServerThread


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A random-init tiny Llama saved in Hugging Face format (weights, config, tokenizer)."""
    torch.manual_seed(11)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=128, tie_embeddings=False)).eval()
    return LM(model=model, tokenizer=tokenizer).save(tmp_path_factory.mktemp("hf") / "tiny", format="hf")


@pytest.fixture(scope="module")
def server(hf_dir):
    with ServerThread(create_app(ModelPool({"tiny": str(hf_dir)}, max_batch=8))) as running:
        yield running


def reference_logprobs(hf_dir, ids: list[int]) -> torch.Tensor:
    """transformers' own log-probabilities of ids[1:] given what precedes each, (T-1,)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_logprobs_score_the_prompt_like_transformers(server, hf_dir, tokenizer):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    prompts = [tokenizer.encode("It was the best of times, it was"), tokenizer.encode("Call me Ishmael.")]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert r.usage.completion_tokens == 0
    for ids, choice in zip(prompts, sorted(r.choices, key=lambda c: c.index)):
        lp = choice.logprobs
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = reference_logprobs(hf_dir, ids)
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4)
        for token_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert len(top) <= 2 and max(top.values()) >= token_lp - 1e-6
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    # Generating after the prompt: the prompt's scores come first, then the generated tokens'.
    ids = prompts[0]
    g = client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True, logprobs=1, temperature=0)
    lp = g.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 3 and lp.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:len(ids)]), reference_logprobs(hf_dir, ids), atol=1e-4)
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=3, logprobs=1, temperature=0)
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[len(ids):]
    assert g.choices[0].text == tokenizer.decode(ids) + plain.choices[0].text

    # Streaming: the prompt and its scores arrive first.
    chunks = list(client.completions.create(model="tiny", prompt=ids, max_tokens=2, echo=True, logprobs=1,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].text == tokenizer.decode(ids)
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(ids)]


def test_max_tokens_zero_needs_echo(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 0, "echo": True},
                   timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello" and r.json()["choices"][0]["logprobs"] is None


def test_impossible_tokens_report_minus_9999():
    from scribelm.serve.responses import finite_logprob

    assert finite_logprob(-math.inf) == -9999.0 and finite_logprob(-1.5) == -1.5 and finite_logprob(None) is None


# ----------------------------------------------------------------------------- lm-eval against `scribe serve`

QUESTIONS = [
    ("It was the best of", ["times", "dog", "wisdom"], 0),
    ("In the beginning God created the", ["heaven", "fox", "emoji"], 0),
    ("Call me", ["Ishmael", "brown", "café"], 0),
    ("The quick brown fox jumps over the lazy", ["dog", "earth", "times"], 0),
    ("Some years ago, never mind how long", ["precisely", "naïve", "heaven"], 0),
    ("it was the age of", ["wisdom", "math", "money"], 0),
]


def write_task(root) -> str:
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return str(root)


def per_sample_loglikelihoods(results) -> list[list[float]]:
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def test_lm_eval_local_completions_against_scribe_serve_equals_hf_backend(tmp_path, hf_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=write_task(tmp_path))
    common = dict(tasks=["tiny_mc"], task_manager=tasks, log_samples=True, num_fewshot=0, random_seed=0,
                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
                                 batch_size=4, **common)
    with ServeProcess(f"tiny={hf_dir}") as served:
        api = lm_eval.simple_evaluate(
            model="local-completions", batch_size=4,
            model_args=f"model=tiny,base_url={served.url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={hf_dir},num_concurrent=1,max_retries=1,tokenized_requests=True",
            **common)
    expected, got = per_sample_loglikelihoods(hf), per_sample_loglikelihoods(api)
    assert len(got) == len(QUESTIONS) and all(len(g) == 3 for g in got)
    assert all(x != 0.0 for row in got for x in row)  # real scores, not the zeros of an unscored prompt
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert api["results"]["tiny_mc"][metric] == hf["results"]["tiny_mc"][metric]
