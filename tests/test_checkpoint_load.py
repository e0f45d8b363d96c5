"""Loading refuses what it cannot trust, in one line, before building anything from it:
config numbers checked against the weights' header, side files checked for shape and type."""

import json
import shutil
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

import scribelm
from scribelm.cli import main
from scribelm.errors import ScribeError
from scribelm.model import Transformer
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m"
    scribelm.LM(Transformer(tiny_config()).eval(), tokenizer, {"temperature": 0.7}).save(path)
    return path


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "m")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def refused(path, message):
    with pytest.raises(ScribeError, match=message) as err:
        scribelm.load(path)
    assert "\n" not in str(err.value)
    return err.value


@pytest.mark.parametrize("changes, message", [
    (dict(format_version="x"), "\"format_version\" must be an integer, got 'x'"),
    (dict(format_version=None), "\"format_version\" must be an integer"),
    (dict(d_model=1e9), "'d_model' must be int, got float 1000000000.0"),
    (dict(n_layers=10**9), "'n_layers' is 1000000000, above the limit of 4096"),
    (dict(n_layers=30000), "'n_layers' is 30000, above the limit"),
    (dict(n_layers=3), r"says n_layers=3 but model.safetensors holds layers 0\.\.1"),
    (dict(d_model=64), r"token_embedding.weight .* has shape \(400, 32\) but config.json implies \(400, 64\) \(from vocab_size, d_model\)"),
    (dict(d_mlp=65), r"mlp\.\w+\.weight .* config.json implies .* \(from d_mlp, d_model\)"),
    (dict(rope_theta="big"), "'rope_theta' must be float"),
])
def test_config_numbers_are_refused_with_the_field_named(copy, changes, message):
    edit_config(copy, **changes)
    refused(copy, message)


def test_layer_count_is_checked_against_the_weights_before_building(copy):
    # Within the limit but far beyond the two layers the file holds: refused from the header,
    # before a model of 4000 layers is built (which takes seconds and hundreds of MB even on meta).
    edit_config(copy, n_layers=4000)
    tracemalloc.start()
    try:
        refused(copy, "says n_layers=4000 but model.safetensors holds layers 0..1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_layers_with_tiny_weights_are_refused_from_the_header(copy):
    # a weights file with the right names and absurdly small tensors: shapes name the field
    save_file({"token_embedding.weight": torch.zeros(1, 1)}, str(copy / "model.safetensors"))
    refused(copy, r"holds no layers")
    edit_config(copy, n_layers=1)
    save_file({"token_embedding.weight": torch.zeros(1, 1), "blocks.0.attention.q.weight": torch.zeros(1, 1)},
              str(copy / "model.safetensors"))
    refused(copy, r"token_embedding.weight .* has shape \(1, 1\) but config.json implies .* \(from vocab_size, d_model\)")


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "tokenizer_config.json must hold a JSON object, got a list"),
    (b'{"eos_token": "\xff"}', "tokenizer_config.json is not valid JSON .*utf-8"),
    (b'{"chat_template": 5}', "'chat_template' must be a string"),
    (b'{"eos_token": 7}', "'eos_token' must be a token string, got int 7"),
])
def test_bad_tokenizer_config_is_refused(copy, content, message):
    (copy / "tokenizer_config.json").write_bytes(content)
    refused(copy, message)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "generation.json must hold a JSON object"),
    ('{"temperature": "hot"}', "generation.json: temperature must be a number, got str 'hot'"),
    ('{"stop": 5}', "generation.json: 'stop' has a value of the wrong type"),
    ('{"top_p": 7}', r"generation.json: top_p must be in \(0, 1\]"),
    ('{"add_bos_token": "yes"}', "generation.json: 'add_bos_token' must be true or false"),
    ("{not json", "generation.json is not valid JSON"),
])
def test_bad_generation_file_is_refused_naming_the_field(copy, content, message):
    (copy / "generation.json").write_text(content)
    refused(copy, message)


def test_other_generation_keys_are_kept(copy):
    (copy / "generation.json").write_text(json.dumps({"temperature": 0.5, "chat_tuned": True, "note": "x"}))
    assert scribelm.load(copy).generation_config == {"temperature": 0.5, "chat_tuned": True, "note": "x"}


def test_cli_prints_one_line_for_a_bad_checkpoint(copy, capsys):
    edit_config(copy, format_version="x")
    assert main(["generate", str(copy), "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format_version" in err and "Traceback" not in err


# --------------------------------------------------------------------------- Hugging Face directories


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                      intermediate_size=64, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def hf_copy(hf_saved, tmp_path):
    return shutil.copytree(hf_saved, tmp_path / "hf")


def test_hf_layer_count_is_checked_before_building(hf_copy):
    edit_config(hf_copy, num_hidden_layers=4000)
    tracemalloc.start()
    try:
        refused(hf_copy, "says num_hidden_layers=4000 but the weights hold layers 0..1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=32.5), "'hidden_size' must be a positive whole number, got 32.5"),
    (dict(num_attention_heads=0), "'num_attention_heads' must be a positive whole number, got 0"),
    (dict(intermediate_size="64"), "'intermediate_size' must be a positive whole number, got '64'"),
    (dict(hidden_size=1e9), "'hidden_size' is 1000000000, above the limit of 131072"),
    (dict(num_hidden_layers=10**9), "'num_hidden_layers' is 1000000000, above the limit of 4096"),
])
def test_hf_config_numbers_are_refused_with_the_key_named(hf_copy, changes, message):
    edit_config(hf_copy, **changes)
    refused(hf_copy, message)


@pytest.mark.parametrize("generation, message", [
    ({"do_sample": True, "temperature": "hot"}, "'temperature' must be a number, got 'hot'"),
    ({"eos_token_id": ["x"]}, "'eos_token_id' must be a token id or a list of them"),
    ({"do_sample": True, "top_p": 5.0}, r"top_p must be in \(0, 1\]"),
])
def test_hf_bad_generation_config_is_refused(hf_copy, generation, message):
    (hf_copy / "generation_config.json").write_text(json.dumps(generation))
    refused(hf_copy, message)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "generation.json"])
def test_deeply_nested_json_is_refused_in_one_line(copy, name):
    (copy / name).write_text("[" * 100_000 + "]" * 100_000)
    refused(copy, name)
