import pytest

from scribelm.config import PRESETS, ModelConfig
from scribelm.errors import ConfigError, ScribeError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.name == name
    assert cfg.n_heads % cfg.n_kv_heads == 0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_gpt3_shape():
    cfg = ModelConfig.from_preset("gpt3-175b")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_mlp) == (96, 12288, 96, 128, 49152)
    assert (cfg.vocab_size, cfg.context_length, cfg.position, cfg.tie_embeddings) == (50257, 2048, "learned", False)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*tiny"):
        ModelConfig.from_preset("gpt5")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(d_model=100, n_heads=3), "n_heads=3 does not divide d_model=100"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
        (dict(d_model="768"), "'d_model' must be int, got str"),
        (dict(n_layers=2.5), "'n_layers' must be int"),
        (dict(tie_embeddings="yes"), "'tie_embeddings' must be bool"),
        (dict(n_layers=True), "'n_layers' must be int"),
        (dict(activation="tanh"), "'activation' must be one of"),
        (dict(norm="batchnorm"), "'norm' must be one of"),
        (dict(position="alibi"), "'position' must be one of"),
        (dict(n_layers=0), "'n_layers' must be positive"),
        (dict(dropout=1.5), "dropout must be in"),
        (dict(rope_scaling={"type": "ntk-by-parts"}), "rope_scaling type 'ntk-by-parts'"),
        (dict(n_layers=10**9), "'n_layers' is 1000000000, above the limit of 4096"),
        (dict(d_model=1e9), "'d_model' must be int, got float"),
        (dict(vocab_size=2**40), "'vocab_size' is 1099511627776, above the limit"),
        (dict(rope_theta=-1.0), "'rope_theta' must be a positive number"),
        (dict(position="rope", rope_scaling={"type": "linear", "factor": "2"}), "rope_scaling 'factor' must be a positive number"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_unknown_field():
    with pytest.raises(ConfigError, match="unknown config field.*n_layer\\b"):
        ModelConfig.from_dict({"n_layer": 3})


def test_config_error_is_a_scribe_error():
    assert issubclass(ConfigError, ScribeError)


def test_int_accepted_for_float_fields():
    cfg = ModelConfig(rope_theta=500000)
    assert isinstance(cfg.rope_theta, float)
