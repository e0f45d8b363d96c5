"""Total versus active parameters of a mixture of experts."""

import pytest

from scribelm.cli import main
from scribelm.config import ModelConfig
from scribelm.inspect.params import parameter_breakdown
from scribelm.model import Transformer


def test_mixtral_8x7b_total_and_active():
    b = parameter_breakdown(ModelConfig.from_preset("mixtral-8x7b"))
    assert round(b["total"] / 1e9, 1) == 46.7
    assert round(b["active"] / 1e9, 1) == 12.9
    assert b["train_flops_per_token"]["6n"] == 6 * b["matmul_params"]
    assert abs(b["matmul_params"] - b["active"]) < 0.01 * b["active"]  # FLOPs follow the active parameters


def test_active_counts_k_of_e_experts_from_the_module_tree():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_mlp=48, activation="swiglu",
                         norm="rmsnorm", position="rope", n_experts=6, experts_per_token=2, d_expert=16,
                         d_shared_expert=24, mlp_bias=True)
    model = Transformer(config)
    b = parameter_breakdown(config)
    params = dict(model.named_parameters())
    one_expert = sum(p.numel() for n, p in params.items() if n.startswith("blocks.0.mlp.experts.0."))
    assert b["total"] == sum(p.numel() for p in params.values())
    assert b["active"] == b["total"] - config.n_layers * (6 - 2) * one_expert
    names = [r["name"] for r in b["rows"]]
    assert "router" in names and "shared expert" in names and "shared expert gate" in names
    dense = parameter_breakdown(config.replace(n_experts=0))
    assert dense["active"] == dense["total"]


def test_cli_shows_active_parameters(capsys):
    assert main(["params", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "active per token: 12.88B of 46.70B (2 of 8 experts)" in out


def test_cli_refuses_too_many_experts_per_token(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(ModelConfig.from_preset("mixtral-8x7b").replace(n_experts=0).to_json()
                   .replace('"n_experts": 0', '"n_experts": 2').replace('"experts_per_token": 2', '"experts_per_token": 3'))
    assert main(["params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "experts_per_token=3 must be between 1 and n_experts=2" in err and "Traceback" not in err
