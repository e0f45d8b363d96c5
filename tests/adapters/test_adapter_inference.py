"""LoRA adapters used for inference without merging: scribelm.load(adapter=...), LM.apply_adapter,
`scribe generate/chat --adapter`, `scribe serve NAME=MODEL+ADAPTER`; scribelm's format and peft's."""

import io
import json
import shutil

import pytest
import torch

import scribelm
from scribelm.adapters import AdapterError, LoRAConfig, apply_lora, save_adapters
from scribelm.adapters.lora import LoRALinear
from scribelm.cli import main
from scribelm.finetune.run import load_with_adapters
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config, save_tiny_hf_llama

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "It was the best"


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, tokenizer):
    """A random tiny base and adapters on all its linear layers whose B is not zero (so they change the output)."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    base = LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size)).eval(), tokenizer, {}).save(root / "base")
    lm = scribelm.load(base)
    apply_lora(lm.model, LoRAConfig(rank=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for module in lm.model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.5)
    adapter = save_adapters(lm.model, root / "run" / "adapter", base_model=str(base), extra={"chat_tuned": True})
    return base, adapter


def test_load_with_an_adapter_computes_what_the_merged_model_does(base_and_adapter):
    base, adapter = base_and_adapter
    weights_before = (base / "model.safetensors").read_bytes()
    tuned = scribelm.load(base, adapter=adapter)
    assert any(isinstance(m, LoRALinear) for m in tuned.model.modules())  # unmerged
    merged = load_with_adapters(base, adapter)
    plain = scribelm.load(base)
    ids = torch.randint(0, tuned.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(ids), merged.model(ids), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(tuned.model(ids), plain.model(ids), atol=1e-2)
    greedy = dict(max_new_tokens=12, temperature=0)
    assert tuned.generate(PROMPT, **greedy) == merged.generate(PROMPT, **greedy) != plain.generate(PROMPT, **greedy)
    assert tuned.chat_tuned and not plain.chat_tuned
    assert (base / "model.safetensors").read_bytes() == weights_before  # nothing merged on disk


def test_cli_generate_and_chat_take_an_adapter(base_and_adapter, monkeypatch, capsys):
    base, adapter = base_and_adapter
    merged = load_with_adapters(base, adapter)
    assert main(["generate", str(base), PROMPT, "--adapter", str(adapter), "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == merged.generate(PROMPT, max_new_tokens=12, temperature=0) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(base), "--adapter", str(adapter), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    expected = merged.chat([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=6).lstrip("\r\n")
    assert out == expected + "\n"
    assert "not fine-tuned" not in err  # the adapters were trained on conversations


def test_bad_adapters_are_one_line_errors(base_and_adapter, tmp_path, tokenizer, capsys):
    base, adapter = base_and_adapter
    other = LM(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, d_model=64)), tokenizer, {}).save(tmp_path / "o")
    cases = [
        (other, adapter, "load it onto the base model it was trained on"),
        (base, tmp_path / "missing", "no adapter directory at"),
        (base, adapter.parent, f"did you mean {adapter}?"),  # the run directory instead of its adapter/
        (base, base, "has no adapter_config.json"),  # a model directory, not adapters
        (base, tmp_path / "foreign", "is not a scribelm LoRA adapter config"),
    ]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "adapter_config.json").write_text('{"rank": 4}')
    for model, adapter_dir, message in cases:
        assert main(["generate", str(model), "x", "--adapter", str(adapter_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    lm = scribelm.load(base, adapter=adapter)
    with pytest.raises(AdapterError, match="already carries LoRA adapters"):
        lm.apply_adapter(adapter)
    with pytest.raises(AdapterError):  # a refused adapter leaves the model as it was
        scribelm.load(other).apply_adapter(adapter)


def test_a_peft_adapter_loads_and_computes_what_peft_does(tmp_path, tokenizer):
    """The real peer: an adapter made and saved by peft itself, on a transformers Llama."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    save_tiny_hf_llama(tmp_path / "hf", tokenizer.vocab_size)
    for rslora in (False, True):
        hf = peft.get_peft_model(
            LlamaForCausalLM.from_pretrained(tmp_path / "hf"),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                            lora_dropout=0.0),
        )
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        out = tmp_path / f"peft-{rslora}"
        hf.save_pretrained(out)
        ours = scribelm.load(tmp_path / "hf", adapter=out)
        ids = torch.randint(0, tokenizer.vocab_size, (2, 10))
        with torch.no_grad():
            torch.testing.assert_close(ours.model(ids), hf.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="DoRA"):
        scribelm.load(tmp_path / "hf", adapter=out)


def test_serve_spec_with_an_adapter(base_and_adapter, tmp_path):
    from scribelm.cli.serve import served_models
    from scribelm.errors import ScribeError
    from scribelm.store import ModelStore

    base, adapter = base_and_adapter
    store = ModelStore(tmp_path / "store")
    models, adapters = served_models([f"tuned={base}+{adapter}", str(base), f"{base}+{adapter}"], store)
    assert models == {"tuned": str(base), "base": str(base), "base-run": str(base)}
    assert adapters == {"tuned": str(adapter), "base-run": str(adapter)}
    with pytest.raises(ScribeError, match="no adapter directory"):
        served_models([f"x={base}+{tmp_path / 'nothing'}"], store)
    with pytest.raises(ScribeError, match="MODEL\\+ADAPTER with both parts"):
        served_models([f"x={base}+"], store)
    # a model directory whose name holds '+' is still a model
    plus = tmp_path / "a+b"
    shutil.copytree(base, plus)
    assert served_models([f"p={plus}"], store) == ({"p": str(plus)}, {})


def test_server_answers_with_the_adapter(base_and_adapter):
    pytest.importorskip("fastapi")
    import httpx

    from scribelm.serve.api import create_app
    from scribelm.serve.engine import ModelPool
    from tests.serving import ServerThread

    base, adapter = base_and_adapter
    pool = ModelPool({"plain": str(base), "tuned": str(base)}, adapters={"tuned": str(adapter)})
    merged, plain = load_with_adapters(base, adapter), scribelm.load(base)
    with ServerThread(create_app(pool)) as server:
        for name, lm in (("tuned", merged), ("plain", plain)):
            reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                               json={"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
            assert reply["choices"][0]["text"] == lm.generate(PROMPT, max_new_tokens=8, temperature=0)


def test_merging_keeps_the_chat_tuned_mark(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    assert main(["convert", str(base), str(tmp_path / "merged"), "--to", "scribe", "--merge-lora", str(adapter)]) == 0
    assert json.loads((tmp_path / "merged" / "generation.json").read_text())["chat_tuned"] is True
    merged = scribelm.load(tmp_path / "merged")
    assert merged.chat_tuned and not any(isinstance(m, LoRALinear) for m in merged.model.modules())
    assert load_with_adapters(base, adapter).chat_tuned
