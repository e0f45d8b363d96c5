"""YaRN and dynamic-NTK RoPE against the real `transformers`, below and far beyond the original context."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import scribelm  # noqa: E402
from scribelm.errors import ConfigError  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.interop.test_hf import greedy, make_hf_model, save_hf_model  # noqa: E402

VOCAB = 96
ORIGINAL = 32  # the original context; sequences go to 4× it

SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_betas_attention_factor": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL,
                                    "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


@pytest.fixture(scope="module")
def scaled_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    out = {}
    for kind, scaling in SCALINGS.items():
        model = make_hf_model("llama2_bias_linear_rope", rope_scaling=scaling, max_position_embeddings=ORIGINAL,
                              rope_theta=100.0)  # a small base: the low frequencies turn within the short context
        out[kind] = save_hf_model(model, root / kind)
    return out


def fresh_reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("length", [20, 4 * ORIGINAL])
def test_logits_match_transformers_below_and_beyond_the_original_context(scaled_dirs, kind, length):
    lm = scribelm.load(scaled_dirs[kind])
    assert lm.config.rope_scaling["type"] == kind.split("_")[0] and lm.config.context_length >= 4 * ORIGINAL
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours, theirs = lm.model(ids), fresh_reference(scaled_dirs[kind])(ids).logits
        plain = lm.model.__class__(lm.config.replace(rope_scaling=None))
        plain.load_state_dict(lm.model.state_dict())
        if length > ORIGINAL or kind.startswith("yarn"):  # the scaling really changes the numbers there
            assert (plain(ids) - theirs).abs().max() > 1e-3
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_greedy_generation_past_the_original_context_matches_transformers(scaled_dirs, kind):
    lm = scribelm.load(scaled_dirs[kind])
    prompt = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7))
    reference = fresh_reference(scaled_dirs[kind])
    reference.generation_config.eos_token_id = None  # all 32 tokens, as greedy() makes
    with torch.no_grad():  # 24 + 32 tokens: decoding crosses the original context of 32
        theirs = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 24:].tolist()
    assert greedy(lm.model, prompt, 32) == theirs


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_export_keeps_the_scaling(scaled_dirs, tmp_path, kind):
    out = scribelm.load(scaled_dirs[kind]).save(tmp_path / "exported", format="hf")
    ids = torch.randint(0, VOCAB, (1, 3 * ORIGINAL), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(fresh_reference(out)(ids).logits, fresh_reference(scaled_dirs[kind])(ids).logits)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == kind.split("_")[0]


def test_unknown_rope_type_is_refused_in_one_line(scaled_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"rope_scaling type 'ntk-by-parts' is not supported; supported: 'llama3'"):
        tiny_config(rope_scaling={"type": "ntk-by-parts", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_scaling of type 'yarn' needs the key 'original_context_length'"):
        tiny_config(rope_scaling={"type": "yarn", "factor": 2.0})
    hf = json.loads((scaled_dirs["yarn"] / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key):
            hf[key]["rope_type"] = "fancy"
    (tmp_path / "m").mkdir()
    for f in scaled_dirs["yarn"].iterdir():
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError) as err:
        scribelm.load(tmp_path / "m")
    assert "rope_scaling type 'fancy'" in str(err.value) and "\n" not in str(err.value)
