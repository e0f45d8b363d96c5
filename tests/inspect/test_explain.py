"""`scribe explain`: the page's numbers, its files, its mistakes, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from scribelm.cli import main
from scribelm.inspect.explain import SLIDER_TEMPERATURES, explain_data
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config

TEXT = "It was the best of times, it was"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    lm = LM(model=Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=24, init_std=0.2)).eval(),
            tokenizer=tokenizer)
    return lm.save(tmp_path_factory.mktemp("explain") / "model"), lm


@pytest.fixture(scope="module")
def page_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "page"
    assert main(["explain", str(model_dir[0]), TEXT, "-o", str(out), "--layer", "0", "--head", "1"]) == 0
    return out


def test_the_data_agrees_with_the_model(model_dir, tokenizer):
    _, lm = model_dir
    data = explain_data(lm, TEXT)
    ids = tokenizer.encode(TEXT)
    assert [t["id"] for t in data["tokens"]] == ids
    assert "".join(t["text"] for t in data["tokens"]) == TEXT
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))[0, -1]
    probs = logits.softmax(-1)
    candidates = [c["id"] for c in data["next_token"]["candidates"]]
    assert candidates == probs.topk(len(candidates)).indices.tolist()
    at_one = data["next_token"]["probs"][SLIDER_TEMPERATURES.index(1.0)]
    torch.testing.assert_close(torch.tensor(at_one), probs[candidates], atol=1e-5, rtol=0)
    lens = data["logit_lens"]
    assert lens["top_ids"][-1] == lm.model(torch.tensor([ids]))[0].argmax(-1).tolist()  # last layer: the model's own
    assert lens["target"] == candidates[0]
    pattern = torch.tensor(data["attention"][1][2])
    torch.testing.assert_close(pattern.sum(-1), torch.ones(len(ids)), atol=1e-3, rtol=0)
    assert data["selected"] == {"layer": 1, "head": 0}
    assert len(data["mlp_neurons"]) == 2 and len(data["mlp_neurons"][0]) == len(ids)


def test_the_page_and_its_figures(page_dir, capsys):
    names = sorted(p.name for p in page_dir.iterdir())
    assert names == [".scribelm-output.json", "attention.png", "data.json", "embeddings.png", "index.html",
                     "logit_lens.png", "next_token.png", "residual_norm.png"]
    for png in page_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (page_dir / "index.html").read_text(encoding="utf-8")
    # self-contained: nothing fetched, no external script, style or image
    assert not re.search(r"<(script|link|img)[^>]*\s(src|href)=", html)
    assert "https://" not in html
    data = json.loads((page_dir / "data.json").read_text())
    assert data["selected"] == {"layer": 0, "head": 1}


def test_json_and_mistakes(model_dir, page_dir, capsys):
    path = str(model_dir[0])
    assert main(["explain", path, "the best", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"tokens", "attention", "logit_lens", "next_token", "mlp_neurons", "residual_norms"}
    for argv, message in [
        ([path, "the best", "--layer", "2"], "layer 2 is out of range: the model has 2 layers (0-1)"),
        ([path, "the best", "--head", "4"], "head 4 is out of range: the model has 4 heads per layer (0-3)"),
        ([path, "the best of times " * 10], "more than the model's context of 24"),
        ([path, "the best", "-o", str(page_dir)], "already exists"),
    ]:
        assert main(["explain", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


CHROMIUM = os.environ.get("SCRIBE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="the browser test needs Debian's chromium (apt-get install chromium)")
def test_the_page_in_chromium(page_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
    problems = []
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: problems.append(f"request {r.url}") if not r.url.startswith("file:") else None)
            page.goto((page_dir / "index.html").as_uri())
            page.wait_for_selector("#next-token td.prob")
            # the tokens, the attention grid (2 layers x 4 heads) and the lens table are drawn
            assert page.locator(".token").count() == len(json.loads((page_dir / "data.json").read_text())["tokens"])
            assert page.locator(".head-thumb").count() == 8
            assert page.locator("#logit-lens tr").count() == 1 + 3
            # the head asked for on the command line is shown first
            assert page.inner_text("#head-title") == "layer 0, head 1"
            first_map = page.eval_on_selector("#head-map", "c => c.toDataURL()")
            page.click(".head-thumb[data-layer='1'][data-head='2']")
            assert page.inner_text("#head-title") == "layer 1, head 2"
            assert page.locator(".head-thumb.selected").count() == 1
            assert page.eval_on_selector("#head-map", "c => c.toDataURL()") != first_map
            # the temperature slider changes the probabilities: colder puts more on the top token
            at_one = [float(x) for x in page.locator("#next-token td.prob").all_inner_texts()]
            assert page.inner_text("#temperature-value") == "1.00"
            page.eval_on_selector("#temperature", "e => { e.value = '3'; e.dispatchEvent(new Event('input')); }")
            assert page.inner_text("#temperature-value") == "0.20"
            cold = [float(x) for x in page.locator("#next-token td.prob").all_inner_texts()]
            assert cold != at_one and cold[0] > at_one[0]
        finally:
            context.close()
    assert problems == []
