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
def sae_dir(model_dir, corpus, tmp_path_factory):
    """A small top-k SAE on layer 1's MLP, written by `scribe explain sae`."""
    root = tmp_path_factory.mktemp("sae")
    (root / "text.txt").write_text("\n\n".join(corpus), encoding="utf-8")
    assert main(["explain", "sae", str(model_dir[0]), "--data", str(root / "text.txt"), "--layer", "1", "--features", "128",
                 "--k", "4", "--steps", "30", "--batch-tokens", "128", "--sequence-length", "16", "-o", str(root / "sae")]) == 0
    return root / "sae"


@pytest.fixture(scope="module")
def page_dir(model_dir, sae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "page"
    assert main(["explain", str(model_dir[0]), TEXT, "-o", str(out), "--layer", "0", "--head", "1", "--sae", str(sae_dir)]) == 0
    return out


def test_the_sae_features_of_the_text(model_dir, sae_dir, page_dir, tokenizer):
    from scribelm.inspect.sae import SparseAutoencoder
    from scribelm.inspect.sae_train import activations

    _, lm = model_dir
    shown = json.loads((page_dir / "data.json").read_text())["sae"]
    sae = SparseAutoencoder.load(sae_dir / "sae.safetensors")
    ids = torch.tensor([tokenizer.encode(TEXT)])
    features = sae.encode(activations(lm.model, ids, 1, "mlp"))[0]  # (T, F)
    assert shown["hook"] == "blocks.1.mlp.hook_post" and shown["n_features"] == 128
    assert len(shown["per_token"]) == ids.shape[1]
    for position, listed in enumerate(shown["per_token"]):
        assert 0 < len(listed) <= 4  # top-k 4: at most four features fire on a token
        assert [f["feature"] for f in listed] == features[position].topk(len(listed)).indices.tolist()
    everywhere = {str(f["feature"]) for row in shown["per_token"] for f in row}
    assert set(shown["activations"]) == set(shown["contexts"]) == everywhere
    report = json.loads((sae_dir / "features.json").read_text())["contexts"]
    assert any(shown["contexts"][f] for f in everywhere)
    for f in everywhere:
        assert shown["contexts"][f] == report.get(f, [])
        torch.testing.assert_close(torch.tensor(shown["activations"][f]), features[:, int(f)], atol=1e-4, rtol=0)


def test_an_sae_that_does_not_fit_the_model_is_one_clear_error(model_dir, sae_dir, tmp_path, capsys):
    import shutil as sh

    path = str(model_dir[0])
    moved = tmp_path / "moved"
    sh.copytree(sae_dir, moved)
    report = json.loads((moved / "report.json").read_text())
    (moved / "report.json").write_text(json.dumps({**report, "layer": 5}))
    other = tmp_path / "other"
    sh.copytree(sae_dir, other)
    (other / "report.json").write_text(json.dumps({**report, "site": "resid"}))  # 32 wide, not the MLP's 64
    for argv, message in [
        (["--sae", str(tmp_path)], "holds no sae.safetensors"),
        (["--sae", str(moved)], "reads blocks.5.mlp.hook_post, which this model (2 layers) does not have"),
        (["--sae", str(other)], "reads 64 numbers but this model's blocks.1.hook_resid_post has 32"),
    ]:
        assert main(["explain", path, "the best", "--json", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


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
            kept_at_one = page.locator("#next-token td.keep-p").all_inner_texts().count("kept")
            assert page.inner_text("#temperature-value") == "1.00"
            page.eval_on_selector("#temperature", "e => { e.value = '3'; e.dispatchEvent(new Event('input')); }")
            assert page.inner_text("#temperature-value") == "0.20"
            cold = [float(x) for x in page.locator("#next-token td.prob").all_inner_texts()]
            assert cold != at_one and cold[0] > at_one[0]
            # what top-p 0.9 keeps follows the probabilities shown: fewer tokens when colder
            kept = page.locator("#next-token td.keep-p").all_inner_texts()
            n = kept.count("kept")
            assert n <= kept_at_one and kept[:n] == ["kept"] * n and sum(cold[:n - 1]) < 0.9 and (n == len(cold) or sum(cold[:n]) >= 0.9 - 1e-3)
            assert page.locator("#next-token td.keep-k").all_inner_texts().count("kept") == 5
            # the SAE's features: per token, clickable; a click shows where the feature fires and its top contexts
            sae = json.loads((page_dir / "data.json").read_text())["sae"]
            assert page.is_visible("#sae-section")
            assert page.locator(".sae-feature").count() == sum(len(row) for row in sae["per_token"])
            feature = next(f for f in sae["contexts"] if sae["contexts"][f] and
                           f != page.get_attribute(".sae-feature.selected", "data-feature"))
            page.click(f".sae-feature[data-feature='{feature}'] >> nth=0")
            assert page.inner_text("#sae-feature-title") == f"feature {feature}"
            assert page.locator(".sae-feature.selected").count() == sum(
                1 for row in sae["per_token"] for f in row if str(f["feature"]) == feature)
            contexts = sae["contexts"][feature]
            assert page.locator("#sae-contexts .sae-context").count() == len(contexts)
            assert page.locator("#sae-contexts mark").all_inner_texts() == [c["token"].replace("\n", "⏎") for c in contexts]
            fired = sum(1 for a in sae["activations"][feature] if a > 0)
            assert page.locator("#sae-text mark").count() == fired > 0
        finally:
            context.close()
    assert problems == []


def test_a_post_norm_model_and_a_single_token(tokenizer):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tokenizer.vocab_size, norm_position="post", position="sinusoidal", norm="layernorm",
                         activation="gelu", n_kv_heads=4)
    lm = LM(model=Transformer(config).eval(), tokenizer=tokenizer)
    data = explain_data(lm, "the best of")
    assert data["attribution"] is None  # no final norm to split the stream by
    with torch.no_grad():
        ids = torch.tensor([tokenizer.encode("the best of")])
        assert data["logit_lens"]["top_ids"][-1] == lm.model(ids)[0].argmax(-1).tolist()
    one = explain_data(lm, [int(ids[0, 0])])
    assert one["embedding_pca"] == [[0.0, 0.0]] and len(one["attention"][0][0]) == 1


def test_sub_verbs_and_the_page_share_the_verb(model_dir, capsys):
    from scribelm.cli.explain import sub_verb_parser

    _, names = sub_verb_parser()
    for name in sorted(names):  # each sub-verb module present answers under `scribe explain NAME`
        with pytest.raises(SystemExit) as exit_:
            main(["explain", name, "--help"])
        assert exit_.value.code == 0 and f"usage: scribe explain {name}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # anything else is a MODEL for the page
        main(["explain", str(model_dir[0]), "--help"])
    assert exit_.value.code == 0 and "--layer" in capsys.readouterr().out
