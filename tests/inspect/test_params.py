import json
import subprocess
import sys

import pytest

from scribelm.config import PRESETS, ModelConfig
from scribelm.inspect.params import parameter_breakdown
from scribelm.model import Transformer
from tests.conftest import tiny_config


def test_gpt3_textbook_numbers():
    b = parameter_breakdown(ModelConfig.from_preset("gpt3-175b"))
    rows = {r["name"]: r["count"] for r in b["rows"]}
    assert rows["token embedding"] == 617_558_016
    for name in ("query", "key", "value", "output"):
        assert rows[name] == 14_495_514_624
    assert rows["mlp up"] == rows["mlp down"] == 57_982_058_496
    assert rows["unembedding"] == 617_558_016
    assert b["weight_matrices"] == 175_181_291_520
    assert b["total"] == 175_221_817_344
    assert rows["learned positions"] == 2048 * 12288
    assert rows["biases"] == 96 * (3 * 12288 + 12288 + 49152 + 12288)
    assert rows["norms"] == 96 * 2 * 2 * 12288 + 2 * 12288
    assert b["per_layer"] * 96 + 2 * 617_558_016 + 2048 * 12288 + 2 * 12288 == b["total"]
    assert b["kv_cache_bytes_per_token"]["bf16"] == 2 * 96 * 12288 * 2
    assert b["weights_bytes"]["bf16"] == 2 * b["total"]


@pytest.mark.parametrize(
    "config",
    [tiny_config(), tiny_config(tie_embeddings=False, position="learned", qkv_bias=True, mlp_bias=True, norm="layernorm"),
     tiny_config(activation="gelu", n_kv_heads=1)],
    ids=["tied-swiglu", "untied-biases", "gelu-mqa"],
)
def test_breakdown_matches_the_real_model(config):
    b = parameter_breakdown(config)
    model = Transformer(config)
    assert b["total"] == model.num_parameters()
    assert b["non_embedding"] == model.num_parameters(exclude_embeddings=True)
    assert sum(r["count"] for r in b["rows"]) == b["total"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_counts(name):
    b = parameter_breakdown(ModelConfig.from_preset(name))
    assert b["total"] > 0
    embeddings = b["total"] - b["non_embedding"]
    assert b["train_flops_per_token"]["total"] > 6 * (b["active"] - embeddings)  # a token uses its active parameters


def test_known_sizes():
    assert parameter_breakdown(ModelConfig.from_preset("gpt2-124m"))["total"] == 124_439_808
    assert parameter_breakdown(ModelConfig.from_preset("llama2-7b"))["total"] == 6_738_415_616
    assert parameter_breakdown(ModelConfig.from_preset("mistral-7b"))["total"] == 7_241_732_096
    assert parameter_breakdown(ModelConfig.from_preset("qwen2-0.5b"))["total"] == 494_032_768


def test_cli_json_has_stable_keys():
    out = subprocess.run([sys.executable, "-m", "scribelm.cli", "params", "gpt3-175b", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert set(data) >= {"rows", "weight_matrices", "total", "non_embedding", "per_layer", "matmul_params",
                         "train_flops_per_token", "weights_bytes", "kv_cache_bytes_per_token", "config"}
    assert data["total"] == 175_221_817_344


def test_cli_table():
    out = subprocess.run([sys.executable, "-m", "scribelm.cli", "params", "gpt3-175b"],
                         capture_output=True, text=True, check=True).stdout
    for number in ("617,558,016", "14,495,514,624", "57,982,058,496", "175,181,291,520", "175,221,817,344"):
        assert number in out
