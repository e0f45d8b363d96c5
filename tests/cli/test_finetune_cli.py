import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from scribelm.adapters import LoRAConfig
from scribelm.finetune.run import FinetuneOptions, finetune_sft
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config, save_tiny_hf_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def scribe(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "scribelm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


CHAT = [{"instruction": f"say {w}", "output": f"{w} {w}"} for w in
        ["best", "times", "worst", "wisdom", "earth", "heaven", "money", "fox", "dog", "lazy", "quick", "brown"]]
PREFS = [{"prompt": f"say {w}", "chosen": w, "rejected": "no"} for w in
         ["best", "times", "worst", "wisdom", "earth", "heaven", "money", "fox", "dog", "lazy", "quick", "brown"]]


@pytest.fixture
def workspace(tmp_path, tokenizer):
    torch.manual_seed(0)
    base = LM(Transformer(tiny_config()), tokenizer, {}).save(tmp_path / "base")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in CHAT))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in PREFS))
    return tmp_path, base, chat, prefs


def test_cli_lora_and_dpo_runs_write_adapters_and_report(workspace, capsys):
    from scribelm.cli import main

    tmp, base, chat, prefs = workspace
    code = main(["finetune", "lora", str(base), "--data", str(chat), "-o", str(tmp / "lora"), "--max-steps", "3",
                 "--batch-size", "4", "--targets", "attention", "--rank", "4", "--quantize", "nf4", "--group-size", "32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "12 examples used of 12 records (0 truncated, 0 skipped" in out
    assert "frozen weights take" in out and "adapter" in out
    meta = json.loads((tmp / "lora" / "adapter" / "adapter_config.json").read_text())
    assert meta["rank"] == 4 and meta["method"] == "qlora" and meta["base_model"] == str(base)
    assert set(load_file(str(tmp / "lora" / "adapter" / "adapter_model.safetensors"))) == {
        f"blocks.{i}.attention.{p}.lora_{x}" for i in range(2) for p in "qkvo" for x in "AB"}
    assert (tmp / "lora" / "metrics.jsonl").is_file() and (tmp / "lora" / "loss.png").is_file()

    code = main(["finetune", "dpo", str(base), "--data", str(prefs), "-o", str(tmp / "dpo"), "--max-steps", "4",
                 "--batch-size", "4", "--lora", "--lr", "5e-3", "--beta", "0.5", "--val-fraction", "0.25"])
    out = capsys.readouterr().out
    assert code == 0
    assert "held-out pairs (3): reward margin +0.0000 ->" in out and "accuracy 0.0% ->" in out
    assert (tmp / "dpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_help_lists_the_methods():
    result = scribe("finetune", "--help")
    assert result.returncode == 0 and all(m in result.stdout for m in ("sft", "lora", "dpo"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["lora", "--targets", "attn.c_attn"], "LoRA target 'attn.c_attn' matches no linear layer"),
        (["sft", "--max-length", "4096"], "exceeds the model's context of 64"),
        (["sft", "--data-line", '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}'], "bad.jsonl:2: chat template: unknown role robot"),
        (["sft", "--data-line", '{"instruction": "hi", "output": ""}'], "bad.jsonl:2: message 1 is an empty assistant turn"),
        (["dpo", "--data-line", '{"prompt": "hi", "chosen": "a"}'], "bad.jsonl:2: a preference record needs"),
        (["sft", "--data-line", "not json"], "bad.jsonl:2: not valid JSON"),
    ],
)
def test_cli_errors_are_one_line(workspace, capsys, args, message):
    from scribelm.cli import main

    tmp, base, chat, prefs = workspace
    data = chat
    if "--data-line" in args:
        i = args.index("--data-line")
        first = json.dumps(PREFS[0] if args[0] == "dpo" else CHAT[0])
        data = tmp / "bad.jsonl"
        data.write_text(first + "\n" + args[i + 1] + "\n")
        args = args[:i] + args[i + 2:]
    code = main(["finetune", args[0], str(base), "--data", str(data), "-o", str(tmp / "out"), *args[1:],
                 "--max-steps", "1"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert stderr.startswith("error: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_an_adapter_run_resumes_exactly(workspace):
    tmp, base, chat, _ = workspace
    import scribelm

    class Interrupted(Exception):
        pass

    def stop_after_step_4(event, info):
        if event == "checkpoint" and info["step"] == 4:
            raise Interrupted

    def run(out, resume=False, progress=None):
        # dropout 0: the Trainer measures peak FLOPs with torch.randn after restoring the RNG on resume
        options = FinetuneOptions(method="lora", lora=LoRAConfig(rank=4, dropout=0.0), max_steps=6, batch_size=4,
                                  lr=1e-2, warmup_steps=1, checkpoint_every=2, val_fraction=0.0, device="cpu",
                                  resume=resume)
        return finetune_sft(scribelm.load(base), chat, out, options, progress=progress)

    straight = run(tmp / "straight")
    with pytest.raises(Interrupted):
        run(tmp / "split", progress=stop_after_step_4)
    # the interrupted run's checkpoints hold only adapters and training state
    step4 = tmp / "split" / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in step4.iterdir() if p.name != ".scribelm-output.json") == ["adapter_config.json", "adapter_model.safetensors",
                                                       "run_config.json", "training_state.pt"]
    assert not (tmp / "split" / "adapter").exists()
    resumed = run(tmp / "split", resume=True)
    assert resumed.steps == 6
    a = load_file(str(straight.output / "adapter_model.safetensors"))
    b = load_file(str(resumed.output / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attention.q.lora_B"], load_file(str(step4 / "adapter_model.safetensors"))[
        "blocks.0.attention.q.lora_B"])


def test_lora_on_an_imported_hf_base_merges_and_exports_to_hf(tmp_path, tokenizer, capsys):
    """Adapters trained on a Hugging Face directory merge (scribe convert --merge-lora) into a model that
    transformers loads and that computes what base + adapters computed."""
    import scribelm
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from scribelm.cli import main
    from scribelm.finetune.run import load_with_adapters

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False))
    hf_dir = tmp_path / "hf-base"
    hf.save_pretrained(hf_dir)
    tokenizer.save(hf_dir)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in CHAT))
    options = FinetuneOptions(method="lora", lora=LoRAConfig(rank=4, targets="all-linear"), max_steps=3,
                              batch_size=4, lr=1e-2, val_fraction=0.0, device="cpu")
    result = finetune_sft(scribelm.load(hf_dir), chat, tmp_path / "run", options, base_name=str(hf_dir))
    adapter = result.output

    ids = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": "say fox"}])])
    with torch.no_grad():
        adapted = load_with_adapters(hf_dir, adapter, merge=False).model(ids)
        assert not torch.allclose(adapted, hf(ids).logits, atol=1e-4)  # the adapters changed the model
    assert main(["convert", str(hf_dir), str(tmp_path / "merged-hf"), "--to", "hf", "--merge-lora", str(adapter)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-hf")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-4)
    capsys.readouterr()
    # adapters for another base are refused in one line
    other = tmp_path / "other"
    LM(Transformer(tiny_config(d_model=64)), tokenizer, {}).save(other)
    assert main(["convert", str(other), str(tmp_path / "x"), "--to", "scribe", "--merge-lora", str(adapter)]) == 2
    assert "load it onto the base model it was trained on" in capsys.readouterr().err


def test_adapters_export_to_peft_and_load_onto_the_transformers_model(tmp_path, tokenizer):
    """The real peer: peft reads our adapters onto the Hugging Face model and computes the same logits."""
    peft = pytest.importorskip("peft")
    import scribelm
    from transformers import LlamaForCausalLM

    from scribelm.adapters import apply_lora
    from scribelm.adapters.lora import LoRALinear
    from scribelm.adapters.peft_format import save_peft_adapters

    torch.manual_seed(0)
    save_tiny_hf_llama(tmp_path / "hf", tokenizer.vocab_size)
    lm = scribelm.load(tmp_path / "hf")
    apply_lora(lm.model, LoRAConfig(rank=4, alpha=8, targets="q,v,down"))
    with torch.no_grad():
        for m in lm.model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    out = save_peft_adapters(lm.model, tmp_path / "peft-adapter", base_model=str(tmp_path / "hf"))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    hf = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), out).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, lm.model.eval()(ids), atol=1e-5, rtol=1e-4)
    # GPT-2 fuses q, k, v: refused with the way out
    from scribelm.adapters import AdapterError

    gpt2_like = Transformer(tiny_config(activation="gelu", norm="layernorm", position="learned", qkv_bias=True,
                                        attn_out_bias=True, mlp_bias=True, n_kv_heads=4))
    apply_lora(gpt2_like, LoRAConfig(rank=2))
    with pytest.raises(AdapterError, match="merge-lora"):
        save_peft_adapters(gpt2_like, tmp_path / "x", architecture="GPT2LMHeadModel")


def test_cli_shows_the_loss_the_split_and_warns_of_a_run_too_short(workspace, capsys):
    from scribelm.cli import main

    tmp, base, chat, _ = workspace
    assert main(["finetune", "lora", str(base), "--data", str(chat), "-o", str(tmp / "short"), "--batch-size", "4"]) == 0
    out, err = capsys.readouterr()
    result = json.loads((tmp / "short" / "finetune_result.json").read_text())
    steps = result["steps"]
    assert steps < 20
    assert f"warning: only {steps} optimizer step" in err and "--epochs " in err
    epochs = int(err.split("--epochs ")[1].split(",")[0])
    assert "validation: none: 12 examples are too few to hold some out (at least 20); give a separate file with --val-data" in out
    assert [line for line in out.splitlines() if line.startswith("step ")] == [
        line for line in out.splitlines() if line.startswith("step ") and ": loss " in line]
    assert sum(line.startswith("step ") for line in out.splitlines()) == steps  # a short run: every step
    assert "training loss " in out and "loss.png" in out
    assert not out.startswith("\n") and "\n\n" not in out  # no stray blank lines
    # the suggested epochs give at least 20 steps
    assert main(["finetune", "lora", str(base), "--data", str(chat), "-o", str(tmp / "longer"), "--batch-size", "4",
                 "--epochs", str(epochs)]) == 0
    out, err = capsys.readouterr()
    assert json.loads((tmp / "longer" / "finetune_result.json").read_text())["steps"] >= 20
    assert "only" not in err
    assert 9 <= sum(line.startswith("step ") and ": loss " in line for line in out.splitlines()) <= 12  # about ten
    # enough records: some are held out, and said so
    many = tmp / "many.jsonl"
    many.write_text("\n".join(json.dumps({**r, "instruction": r["instruction"] + f" {i}"}) for i in range(2) for r in CHAT))
    assert main(["finetune", "sft", str(base), "--data", str(many), "-o", str(tmp / "full"), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "validation: 1 of the 24 examples held out (5%)" in out
    assert "step 2: validation loss" in out
    # what fine-tuning on conversations wrote says so: `scribe chat` gives no "not chat-tuned" note
    assert json.loads((tmp / "full" / "model" / "generation.json").read_text())["chat_tuned"] is True
    assert json.loads((tmp / "short" / "adapter" / "adapter_config.json").read_text())["chat_tuned"] is True
