"""Chat templates for models without one: built-ins that render as transformers renders them,
Jinja files, the sandbox, and what the server and the CLI say about them."""

from __future__ import annotations

import copy
import io

import httpx
import openai
import pytest
import torch

from scribelm.chat_templates import BUILTIN_TEMPLATES, resolve_chat_template
from scribelm.cli import main
from scribelm.errors import ScribeError
from scribelm.lm import LM
from scribelm.model import Transformer
from scribelm.serve.api import create_app
from scribelm.serve.engine import ModelPool
from tests.conftest import tiny_config
from tests.serving import ServerThread, run_scribe_serve

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Call me Ishmael."}]


@pytest.fixture(scope="module")
def bare_tokenizer(tokenizer):
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    return bare


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, bare_tokenizer):
    """`plain`: no chat template (saved in Hugging Face format, as a base model is); `own`: its tokenizer's template."""
    root = tmp_path_factory.mktemp("templates")
    torch.manual_seed(3)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=256)).eval()
    plain = LM(model=model, tokenizer=bare_tokenizer).save(root / "plain", format="hf")
    own = LM(model=model, tokenizer=tokenizer).save(root / "own")
    return {"plain": str(plain), "own": str(own)}


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_builtin_templates_render_as_transformers_does(models, bare_tokenizer, name):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(models["plain"])
    expected = hf.apply_chat_template(CONVERSATION, chat_template=BUILTIN_TEMPLATES[name].text, tokenize=False,
                                      add_generation_prompt=True)
    tok = copy.copy(bare_tokenizer)
    tok.chat_template = BUILTIN_TEMPLATES[name].text
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True) == expected
    assert "Call me Ishmael." in expected and "Be brief." in expected


def test_served_chat_uses_the_chosen_template_only_when_the_model_has_none(models, tmp_path, bare_tokenizer):
    without = ServerThread(create_app(ModelPool(models, max_batch=4)))
    with without:
        r = httpx.post(without.url + "/v1/chat/completions", json={"model": "plain", "messages": CONVERSATION}, timeout=30)
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]

    escape = tmp_path / "escape.jinja"  # compiles, but reaches for Python internals when rendered
    escape.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    pool = ModelPool({**models, "escaping": models["plain"]}, max_batch=4, chat_template=resolve_chat_template("chatml"))
    with ServerThread(create_app(pool)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="plain", messages=CONVERSATION, max_tokens=4, temperature=0)
        chatml = copy.copy(bare_tokenizer)
        chatml.chat_template = BUILTIN_TEMPLATES["chatml"].text
        assert r.usage.prompt_tokens == len(chatml.encode_chat(CONVERSATION))
        client.chat.completions.create(model="own", messages=CONVERSATION, max_tokens=2)
        cards = {m.id: m.model_extra for m in client.models.list().data}
        assert cards["plain"]["chat_template"] == "chatml" and cards["own"]["chat_template"] == "model"

        pool.chat_template = resolve_chat_template(str(escape))
        bad = httpx.post(server.url + "/v1/chat/completions", json={"model": "escaping", "messages": CONVERSATION}, timeout=30)
        assert bad.status_code == 400 and "unsafe" in bad.json()["error"]["message"]
        assert client.completions.create(model="escaping", prompt="Call me", max_tokens=2).choices[0].text is not None
        assert httpx.get(server.url + "/health").status_code == 200


def test_template_files_are_checked_when_chosen(tmp_path, models):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ScribeError, match=r"broken.jinja: chat template syntax error on line 2"):
        resolve_chat_template(str(broken))
    with pytest.raises(ScribeError, match="neither a built-in template"):
        resolve_chat_template("no-such-template")
    done = run_scribe_serve(models["plain"], "--chat-template", str(broken), "--port", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"error: {broken}: chat template syntax error on line 2: unexpected '}}'"]


def test_scribe_chat_takes_a_template(models, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", models["plain"], "--temperature", "0", "--max-new-tokens", "3"]) == 2
    assert "no chat template" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", models["plain"], "--chat-template", "llama3", "--temperature", "0", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "error" not in err and len(out.strip().splitlines()) <= 1
