"""Hugging Face interop against the real `transformers`: random-initialised models of every
supported family are saved with `save_pretrained`, loaded by scribelm and compared
number for number; scribelm models are exported and loaded back by `transformers`."""

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

import scribelm  # noqa: E402
from scribelm.cache import KVCache  # noqa: E402
from scribelm.cli import main  # noqa: E402
from scribelm.errors import ScribeError  # noqa: E402
from scribelm.lm import LM  # noqa: E402
from scribelm.model import Transformer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB = 96

# Small configs that cover what differs between real checkpoints: grouped-query and odd head
# counts, tied and untied embeddings, Llama-3 and linear RoPE scaling, explicit head_dim,
# attention/MLP biases, Qwen2's q/k/v biases.
FAMILY_CONFIGS = {
    "llama3_gqa_tied": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(hidden_size=60, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
             tie_word_embeddings=True, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 16}),
    ),
    "llama2_bias_linear_rope": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
             rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "mistral_gqa": (
        "MistralConfig", "MistralForCausalLM",
        dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
             sliding_window=None, tie_word_embeddings=False, rope_theta=1e6),
    ),
    "qwen2_qkv_bias_tied": (
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
             tie_word_embeddings=True),
    ),
    "gpt2_tied": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(n_embd=48, n_layer=2, n_head=3, n_positions=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1),
    ),
    "gpt2_untied_relu": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=80, activation_function="relu",
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
    ),
}


def make_hf_model(kind: str, seed: int = 0, **overrides):
    config_class, model_class, kwargs = FAMILY_CONFIGS[kind]
    defaults = dict(vocab_size=VOCAB, initializer_range=0.2)
    if config_class != "GPT2Config":
        defaults.update(max_position_embeddings=64, rms_norm_eps=1e-5)
    config = getattr(transformers, config_class)(**{**defaults, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers starts norms at one and biases at zero; make them count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (save_hf_model(make_hf_model(kind), root / kind)) for kind in FAMILY_CONFIGS}


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(ids).logits


def greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding with the KV cache: prefill the prompt, then one token per step."""
    cache = KVCache(model.config, prompt.shape[0], prompt.shape[1] + steps, dtype=next(model.parameters()).dtype)
    out = []
    with torch.no_grad():
        logits = model(prompt, cache=cache)  # (1, T, V)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            out.append(int(token))
            logits = model(token, cache=cache)
    return out


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", list(FAMILY_CONFIGS))
def test_logits_match_transformers(hf_dirs, kind):
    path = hf_dirs[kind]
    lm = scribelm.load(path)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lm.model(ids)
    reference = hf_logits(path, ids)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4
    assert lm.model.token_embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", list(FAMILY_CONFIGS))
def test_greedy_generation_matches_transformers(hf_dirs, kind):
    path = hf_dirs[kind]
    lm = scribelm.load(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    reference.generation_config.eos_token_id = None  # generate all 32 tokens
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert len(expected) == 32
    assert lm.generation_config["temperature"] == 0.0  # no do_sample in generation_config.json: greedy, as transformers
    completion = lm.generate(prompt[0].tolist(), max_new_tokens=32, stop_token_ids=[], return_details=True)
    assert completion.token_ids == expected
    assert greedy(lm.model, prompt, 32) == expected  # and the bare model + KV cache loop agrees


def test_config_mapping_is_exact_and_named(hf_dirs):
    llama = scribelm.load(hf_dirs["llama3_gqa_tied"]).config
    assert (llama.n_heads, llama.n_kv_heads, llama.head_dim, llama.tie_embeddings) == (5, 1, 12, True)
    assert llama.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_context_length": 16}
    assert llama.rope_theta == 500000.0
    qwen = scribelm.load(hf_dirs["qwen2_qkv_bias_tied"]).config
    assert (qwen.qkv_bias, qwen.attn_out_bias, qwen.mlp_bias, qwen.name) == (True, False, False, "qwen2")
    gpt2 = scribelm.load(hf_dirs["gpt2_untied_relu"]).config
    assert (gpt2.activation, gpt2.position, gpt2.norm, gpt2.d_mlp, gpt2.tie_embeddings) == ("relu", "learned", "layernorm", 80, False)


def test_original_gpt2_layout_loads(hf_dirs, tmp_path):
    """OpenAI's GPT-2 files name tensors without the 'transformer.' prefix and carry each
    layer's causal-mask buffer ('h.{i}.attn.bias'), which holds no weights."""
    from safetensors.torch import save_file

    source = hf_dirs["gpt2_tied"]
    path = tmp_path / "gpt2-original"
    path.mkdir()
    (path / "config.json").write_text((source / "config.json").read_text())
    tensors = {k.removeprefix("transformer."): v for k, v in read_safetensors_dir(source).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert (scribelm.load(path).model(ids) - hf_logits(source, ids)).abs().max().item() <= 1e-4


# config.json files as published (written by transformers 4: rope_theta + rope_scaling, torch_dtype)
REAL_CONFIGS = {
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
    },
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
    },
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
        "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": 50257,
    },
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_published_configs_map_tensor_for_tensor(tmp_path, name):
    """The published shapes, built on the meta device by both: every tensor transformers
    has, scribelm's export produces under the same name with the same shape."""
    from scribelm.interop.hf import config_from_hf, family_for, hf_state_dict

    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[name]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_from_hf(REAL_CONFIGS[name])
    assert not caught  # nothing adapted: Mistral's sliding window is computed for real
    assert config.sliding_window == (4096 if name == "Mistral-7B-v0.1" else None)
    with torch.device("meta"):
        ours = Transformer(config)
        reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()
                if not (config.tie_embeddings and k == "lm_head.weight") and not k.endswith(".attn.bias")}
    exported = {k: tuple(v.shape) for k, v in hf_state_dict(ours, family_for(config)).items()}
    assert exported == expected
    assert ours.num_parameters() == reference.num_parameters()


@pytest.mark.parametrize("preset", sorted(scribelm.PRESETS))
def test_every_preset_exports_to_a_family_transformers_builds(preset):
    from scribelm.config import ModelConfig
    from scribelm.interop.hf import family_for

    config = ModelConfig.from_preset(preset)
    family = family_for(config)
    hf = transformers.AutoConfig.for_model(**family.to_hf(config, family))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf)
        ours = Transformer(config)
    assert type(reference).__name__ == family.architecture
    assert reference.num_parameters() == ours.num_parameters()
    expected_family = {"gpt": "GPT2LMHeadModel", "mis": "MistralForCausalLM", "qwe": "Qwen2ForCausalLM", "mix": "MixtralForCausalLM"}
    assert family.architecture == expected_family.get(preset[:3], "LlamaForCausalLM")


def test_sliding_window_caps_context_exactly(tmp_path, capsys):
    # a Qwen2 whose later layers slide and earlier ones do not: capped where both agree
    model = make_hf_model("qwen2_qkv_bias_tied", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    path = save_hf_model(model, tmp_path / "qwen2-window")
    with pytest.warns(UserWarning, match="sliding-window"):
        lm = scribelm.load(path)
    assert lm.config.context_length == 16 and lm.config.sliding_window is None
    assert main(["convert", str(path), str(tmp_path / "native"), "--to", "scribe"]) == 0
    assert "warning: this Qwen2 model uses sliding-window attention (16 tokens)" in capsys.readouterr().err
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (lm.model(ids) - model(ids).logits).abs().max().item() <= 1e-4
        with pytest.raises(ScribeError, match="exceed the model's context"):
            lm.model(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["llama3_gqa_tied", "llama2_bias_linear_rope", "mistral_gqa", "qwen2_qkv_bias_tied", "gpt2_tied", "gpt2_untied_relu"])
def test_round_trip_hf_scribelm_hf_is_identical(hf_dirs, tmp_path, kind):
    source = hf_dirs[kind]
    out = scribelm.load(source).save(tmp_path / "exported", format="hf")
    original, exported = read_safetensors_dir(source), read_safetensors_dir(out)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
    src_config = json.loads((source / "config.json").read_text())
    out_config = json.loads((out / "config.json").read_text())
    assert out_config["architectures"] == src_config["architectures"]
    # transformers reads the export back and computes the same numbers
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(hf_logits(out, ids), hf_logits(source, ids))


SCRIBE_CONFIGS = {
    "tiny_llama": (dict(), "LlamaForCausalLM"),
    "geglu_head_dim_biases": (dict(activation="geglu", head_dim=16, qkv_bias=True, attn_out_bias=True, mlp_bias=True),
                              "LlamaForCausalLM"),
    "llama3_untied": (dict(tie_embeddings=False, rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}),
        "LlamaForCausalLM"),
    "qwen2_style": (dict(qkv_bias=True, name="custom"), "Qwen2ForCausalLM"),
    "mistral_named": (dict(name="mistral-tiny", tie_embeddings=False), "MistralForCausalLM"),
    "gpt2_style": (dict(activation="gelu_tanh", norm="layernorm", position="learned", n_kv_heads=4, qkv_bias=True,
                        attn_out_bias=True, mlp_bias=True, d_mlp=128), "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("kind", list(SCRIBE_CONFIGS))
def test_round_trip_scribelm_hf_scribelm_is_identical(tmp_path, tokenizer, kind):
    overrides, architecture = SCRIBE_CONFIGS[kind]
    torch.manual_seed(5)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    lm = LM(model=model, tokenizer=tokenizer, generation_config={"stop_token_ids": [tokenizer.eos_id], "temperature": 0.7})
    out = lm.save(tmp_path / "hf", format="hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]

    back = scribelm.load(out)
    original, restored = model.state_dict(), back.model.state_dict()
    assert sorted(original) == sorted(restored)
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert back.config.tie_embeddings == model.config.tie_embeddings
    assert back.generation_config == {"stop_token_ids": [tokenizer.eos_id], "temperature": 0.7, "top_k": 0, "top_p": 1.0,
                                      "add_bos_token": False}

    ids = torch.randint(0, tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (hf_logits(out, ids) - model(ids)).abs().max().item() <= 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "It was the best of times, café 你好"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_unmappable_config_is_refused_with_reason(tmp_path):
    lm = LM(model=Transformer(tiny_config(norm_position="post")), tokenizer=None)
    with pytest.raises(ScribeError, match="maps onto no Hugging Face family.*pre-norm"):
        lm.save(tmp_path / "x", format="hf")
    lm = LM(model=Transformer(tiny_config(position="sinusoidal", activation="gelu", norm="layernorm")), tokenizer=None)
    with pytest.raises(ScribeError, match="learned positions"):
        lm.save(tmp_path / "x", format="hf")
    with pytest.raises(ScribeError, match="cannot be exported as GPT2LMHeadModel"):
        LM(model=Transformer(tiny_config()), tokenizer=None).save(tmp_path / "x", format="hf", architecture="GPT2LMHeadModel")
    model = Transformer(tiny_config())
    model.blocks[0].attention.q.register_parameter("lora_a", torch.nn.Parameter(torch.zeros(2, 32)))
    with pytest.raises(ScribeError, match="no place for: blocks.0.attention.q.lora_a"):
        LM(model=model, tokenizer=None).save(tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- shards, dtypes


def test_sharded_checkpoint_loads(tmp_path):
    model = make_hf_model("llama3_gqa_tied", seed=7)
    path = save_hf_model(model, tmp_path / "sharded", max_shard_size="30KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    lm = scribelm.load(path)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert (lm.model(ids) - model(ids).logits).abs().max().item() <= 1e-4
    # and our own sharded export loads in transformers and back in scribelm
    out = lm.save(tmp_path / "resharded", format="hf", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(hf_logits(out, ids), hf_logits(path, ids))
    assert torch.equal(scribelm.load(out).model.token_embedding.weight, lm.model.token_embedding.weight)


def test_bf16_checkpoint_loads_and_runs(tmp_path):
    model = make_hf_model("qwen2_qkv_bias_tied", seed=9).to(torch.bfloat16)
    path = save_hf_model(model, tmp_path / "bf16")
    lm = scribelm.load(path)
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ours, reference = lm.model(ids).float(), model(ids).logits.float()
    assert torch.isfinite(ours).all()
    assert (ours - reference).abs().max().item() < 0.1 * reference.abs().max().item()
    assert greedy(lm.model, ids[:, :4], 8)  # decodes with a bf16 cache
    as_fp32 = scribelm.load(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_fp32.model.parameters())
    exported = read_safetensors_dir(lm.save(tmp_path / "bf16-out", format="hf"))
    assert all(t.dtype == torch.bfloat16 for t in exported.values())


def test_weights_are_memory_mapped_not_copied(hf_dirs):
    lm = scribelm.load(hf_dirs["mistral_gqa"])
    file = hf_dirs["mistral_gqa"] / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        fresh_down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        fresh_up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    down = lm.model.blocks[0].mlp.down.weight
    assert torch.equal(down, fresh_down)
    # safe_open maps the file: the parameter's storage is exactly the tensor's bytes, not a copy of a bigger buffer
    assert down.untyped_storage().nbytes() == down.numel() * down.element_size()
    # q/k/v and gate/up are the exception: copied once into one buffer per group (kernels.pack_linears)
    gate, up = lm.model.blocks[0].mlp.gate.weight, lm.model.blocks[0].mlp.up.weight
    assert torch.equal(up, fresh_up)
    assert up.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- tokenizer and generation defaults


# Uses what real templates use: tools test, loop controls, tojson, strftime_now, a trailing newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools is not none %}[tools]{% endif %}"
    "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
    "{{ {'year': strftime_now('%Y') | length, 'text': '<é>'} | tojson }}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}\n"
)


def write_tokenizer(path: Path, corpus: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|end_of_text|>", "<|start|>", "<|eot|>"]
    # as Llama 3: encoding with special tokens puts BOS in front
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B", special_tokens=[("<|begin|>", 0)]),
    ])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 4 + 300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|end_of_text|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 64,
    }))
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 0, "eos_token_id": [1, 3], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
        "transformers_version": transformers.__version__,
    }))


def test_tokenizer_chat_template_and_eos_carry_over(tmp_path, corpus):
    from tokenizers import Tokenizer as RawTokenizer

    path = tmp_path / "with-tokenizer"
    write_tokenizer(tmp_path, corpus)  # learn the vocabulary size first
    vocab = RawTokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    save_hf_model(make_hf_model("llama3_gqa_tied", vocab_size=vocab), path)
    write_tokenizer(path, corpus)

    lm = scribelm.load(path)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    for text in corpus[:5] + ["  leading spaces and\ttabs\n", "emoji 🎉 and ∑ math"]:
        assert lm.tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
        assert reference.encode(text) == [0] + lm.tokenizer.encode(text)
        assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text
    messages = [{"role": "user", "content": "Call me Ishmael."}, {"role": "assistant", "content": "Aye."},
                {"role": "user", "content": "<b>x</b>"}, {"role": "assistant", "content": "dropped by break"}]
    assert lm.tokenizer.apply_chat_template(messages) == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (lm.tokenizer.bos_id, lm.tokenizer.eos_id) == (reference.bos_token_id, reference.eos_token_id) == (0, 1)
    # transformers' defaults made explicit: both eos ids stop, top_k=50 when sampling, BOS added
    assert lm.generation_config == {"stop_token_ids": [1, 3], "temperature": 0.6, "top_k": 50, "top_p": 0.9, "add_bos_token": True}
    from scribelm.generate import encode_prompt, resolve_settings, stop_ids_for

    assert encode_prompt(lm, corpus[0]) == reference.encode(corpus[0])
    assert stop_ids_for(lm.tokenizer, resolve_settings(lm)) == {1, 3}

    # a chat turn, greedy, stops where transformers stops (at either eos id) with the same text
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = reference(reference.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False, return_tensors="pt").input_ids
    budget = lm.config.context_length - prompt.shape[1]  # transformers runs past the context; scribelm stops there
    assert budget >= 12
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=budget, do_sample=False)[0, prompt.shape[1]:].tolist()
    if expected and expected[-1] in (1, 3):
        expected = expected[:-1]  # scribelm does not return the stop token
    reply = lm.chat(messages[:1], max_new_tokens=budget, temperature=0, return_details=True)
    assert reply.token_ids == expected
    assert reply.text == reference.decode(expected, skip_special_tokens=True)

    out = lm.save(tmp_path / "exported", format="hf")
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.do_sample, generation.temperature, generation.top_k, generation.top_p) == (
        [1, 3], True, 0.6, 50, 0.9)
    assert scribelm.load(out).generation_config == lm.generation_config
    exported = transformers.AutoTokenizer.from_pretrained(out)
    assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == lm.tokenizer.apply_chat_template(messages)
    assert exported.encode(corpus[0], add_special_tokens=False) == lm.tokenizer.encode(corpus[0])

    # transformers >= 4.43 may keep the template in chat_template.jinja instead
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "chat_template.jinja").write_text(config.pop("chat_template"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert scribelm.load(path).tokenizer.apply_chat_template(messages) == transformers.AutoTokenizer.from_pretrained(
        path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_gpt2_vocab_and_merges_tokenizer_matches_transformers(hf_dirs, tmp_path, corpus):
    """Older GPT-2 directories carry vocab.json + merges.txt instead of tokenizer.json."""
    import shutil

    from tokenizers import ByteLevelBPETokenizer

    path = Path(shutil.copytree(hf_dirs["gpt2_tied"], tmp_path / "gpt2-files"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(path))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False,
    }))
    lm = scribelm.load(path)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    for text in corpus[:5] + ["  two spaces, tab\t and newline\n"]:
        assert lm.tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
        assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == reference.decode(reference.encode(text))
    assert lm.tokenizer.eos_id == reference.eos_token_id == 0
    assert lm.tokenizer.encode("<|endoftext|>", allow_special=True) == reference.encode("<|endoftext|>")
    out = lm.save(tmp_path / "exported", format="hf")  # written as tokenizer.json from here on
    assert transformers.AutoTokenizer.from_pretrained(out).encode(corpus[3]) == reference.encode(corpus[3])


# --------------------------------------------------------------------------- bad input


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ScribeError, match="no config.json"):
        scribelm.load(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, "architecture Qwen3ForCausalLM is not supported; supported: GPT2LMHeadModel"),
    ({"model_type": "bert"}, "model_type 'bert' is not supported"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
      "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_scaling type 'dynamic'"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
      "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
     "rope_scaling type 'yarn'"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
      "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10, "hidden_act": "relu"}, "hidden_act='relu'"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 32, "num_attention_heads": 4,
      "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10, "quantization_config": {"quant_method": "gptq"}},
     r"quantization_config \(gptq\)"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 10,
      "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 4}, "has no 'hidden_size'"),
])
def test_unsupported_architecture_or_option_is_refused(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScribeError, match=message):
        scribelm.load(tmp_path)


def test_missing_shard_is_refused(tmp_path):
    path = save_hf_model(make_hf_model("mistral_gqa"), tmp_path / "m", max_shard_size="30KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ScribeError, match=f"missing 1 weight shard.*{shard.name}"):
        scribelm.load(path)


def test_shapes_that_disagree_with_config_are_refused(hf_dirs, tmp_path):
    import shutil

    path = Path(shutil.copytree(hf_dirs["mistral_gqa"], tmp_path / "m"))
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 65
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScribeError, match=r"has shape \(64, 48\) but config.json implies \(65, 48\)"):
        scribelm.load(path)
    config["intermediate_size"], config["num_hidden_layers"] = 64, 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScribeError, match=r"says num_hidden_layers=3 but the weights hold layers 0\.\.1"):
        scribelm.load(path)
    config["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScribeError, match=r"says num_hidden_layers=1 but the weights hold layers 0\.\.1"):
        scribelm.load(path)


class _Sentinel:
    """Unpickling this writes a file: proof that a pickle was opened."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "unpickled"))


def test_pickle_checkpoint_is_refused_without_unpickling(hf_dirs, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text((hf_dirs["mistral_gqa"] / "config.json").read_text())
    sentinel = tmp_path / "was-unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Sentinel(str(sentinel))))
    with pytest.raises(ScribeError, match="pickle.*convert them to safetensors"):
        scribelm.load(path)
    assert not sentinel.exists()
    assert main(["convert", str(path), str(tmp_path / "out"), "--to", "scribe"]) == 2
    assert not sentinel.exists()


def test_corrupt_weights_are_refused(hf_dirs, tmp_path):
    import shutil

    path = Path(shutil.copytree(hf_dirs["gpt2_tied"], tmp_path / "g"))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ScribeError, match="corrupt or truncated"):
        scribelm.load(path)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("kind", ["qwen2_qkv_bias_tied", "gpt2_untied_relu"])
def test_cli_convert_round_trip(hf_dirs, tmp_path, capsys, kind):
    source = hf_dirs[kind]
    native, back = tmp_path / "native", tmp_path / "back"
    assert main(["convert", str(source), str(native), "--to", "scribe"]) == 0
    assert json.loads((native / "config.json").read_text())["format"] == "scribelm"
    assert main(["convert", str(native), str(back), "--to", "hf", "--max-shard-size", "40KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    original, exported = read_safetensors_dir(source), read_safetensors_dir(back)
    assert sorted(original) == sorted(exported) and all(torch.equal(original[k], exported[k]) for k in original)

    assert main(["convert", str(native), str(back), "--to", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(native), str(back), "--to", "hf", "--force", "--dtype", "bfloat16"]) == 0
    assert all(t.dtype == torch.bfloat16 for t in read_safetensors_dir(back).values())
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--to", "hf"]) == 2
    assert "error: no model at" in capsys.readouterr().err


def test_cli_params_reads_hf_directory(hf_dirs, capsys):
    path = hf_dirs["llama3_gqa_tied"]
    assert main(["params", str(path), "--json"]) == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert json.loads(capsys.readouterr().out)["total"] == reference.num_parameters()


def test_cli_convert_to_gguf_and_onnx_dispatch(tmp_path, tokenizer, capsys):
    import importlib.util

    source = LM(model=Transformer(tiny_config(vocab_size=tokenizer.vocab_size)).eval(), tokenizer=tokenizer).save(tmp_path / "m")
    for fmt in ("gguf", "onnx"):
        target = tmp_path / f"model.{fmt}"
        code = main(["convert", str(source), str(target), "--to", fmt])
        if importlib.util.find_spec(f"scribelm.interop.{fmt}") is None:
            assert code == 2
            assert f"{fmt.upper()} export is not available" in capsys.readouterr().err
        else:
            assert code == 0 and target.is_file() and target.stat().st_size > 0


def test_save_rejects_unknown_format(tmp_path):
    lm = LM(model=Transformer(tiny_config()), tokenizer=None)
    with pytest.raises(ScribeError, match="supported: 'scribe', 'hf'"):
        lm.save(tmp_path / "x", format="pickle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scribelm.load(lm.save(tmp_path / "x")).config == lm.config


# --------------------------------------------------------------------------- both RoPE spellings in one config

_ROPE_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
              "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10}


def test_legacy_dynamic_rope_scaling_beside_rope_parameters_is_refused(tmp_path):
    # transformers runs this config with dynamic NTK scaling: the legacy entry wins
    config = dict(_ROPE_BASE, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  rope_scaling={"type": "dynamic", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "dynamic"
    with pytest.raises(ScribeError, match="rope_scaling type 'dynamic'"):
        scribelm.load(tmp_path)


@pytest.mark.parametrize("extra", [{}, {"rope_theta": 20000.0}])
def test_rope_parameters_and_rope_scaling_read_as_transformers_reads_them(tmp_path, extra):
    from scribelm.interop.hf import config_from_hf

    config = dict(_ROPE_BASE, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  rope_scaling={"type": "linear", "factor": 2.0}, **extra)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    ours = config_from_hf(config)
    assert ours.rope_scaling == {"type": reference["rope_type"], "factor": reference["factor"]}
    assert ours.rope_theta == reference["rope_theta"]
