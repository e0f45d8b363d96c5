"""Sliding-window attention against the real `transformers`: each query sees only the last W keys,
in one forward pass, in decoding with the full cache and with a rolling cache of W positions."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import scribelm  # noqa: E402
from scribelm.cache import KVCache, RollingKVCache  # noqa: E402
from scribelm.errors import ConfigError, ScribeError  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.interop.test_hf import greedy, make_hf_model, read_safetensors_dir, save_hf_model  # noqa: E402

VOCAB = 96
WINDOW = 8


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    model = make_hf_model("mistral_gqa", sliding_window=WINDOW)
    path = save_hf_model(model, tmp_path_factory.mktemp("swa") / "mistral")
    return model, path


def greedy_rolling(model, prompt, steps, chunk=None):
    """Greedy decoding through a rolling cache, the prompt prefilled `chunk` tokens at a time."""
    cache = RollingKVCache(model.config, prompt.shape[0])
    out = []
    with torch.no_grad():
        for piece in prompt.split(chunk or prompt.shape[1], dim=1):
            logits = model(piece, cache=cache)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(int(token))
            logits = model(token, cache=cache)
    assert cache.keys.shape[3] == WINDOW  # W positions held, however long the sequence grew
    return out


def test_logits_past_the_window_match_transformers(mistral):
    reference, path = mistral
    lm = scribelm.load(path)
    assert lm.config.sliding_window == WINDOW and lm.config.context_length == 64
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = lm.model(ids), reference(ids).logits
        full = lm.model.__class__(lm.config.replace(sliding_window=None))
        full.load_state_dict(lm.model.state_dict())
        assert (full(ids) - theirs).abs().max() > 1e-2  # the window really changes the numbers
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers_with_full_and_rolling_cache(mistral):
    reference, path = mistral
    lm = scribelm.load(path)
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert greedy(lm.model, prompt, 32) == theirs
    assert greedy_rolling(lm.model, prompt, 32) == theirs
    assert greedy_rolling(lm.model, prompt, 32, chunk=5) == theirs  # chunked prefill through the rolling cache


def test_chunked_prefill_through_a_rolling_cache_equals_one_pass(mistral):
    _, path = mistral
    model = scribelm.load(path).model
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = RollingKVCache(model.config, 2)
    with torch.no_grad():
        whole = model(ids)
        pieces = torch.cat([model(piece, cache=cache) for piece in ids.split(7, dim=1)], dim=1)
    assert (pieces - whole).abs().max().item() <= 1e-5
    assert cache.length == 30


def test_left_padded_batch_matches_transformers(mistral):
    reference, path = mistral
    lm = scribelm.load(path)
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)
        theirs = reference(ids, attention_mask=mask).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() <= 1e-4


def test_qwen2_with_every_layer_sliding(tmp_path):
    reference = make_hf_model("qwen2_qkv_bias_tied", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)
    path = save_hf_model(reference, tmp_path / "qwen2")
    lm = scribelm.load(path)
    assert lm.config.sliding_window == WINDOW
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (lm.model(ids) - reference(ids).logits).abs().max().item() <= 1e-4


def test_export_keeps_the_window(mistral, tmp_path):
    reference, path = mistral
    out = scribelm.load(path).save(tmp_path / "exported", format="hf")
    original, exported = read_safetensors_dir(path), read_safetensors_dir(out)
    assert all(torch.equal(t, exported[n]) for n, t in original.items())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.sliding_window == WINDOW
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, reference(ids).logits)


def test_bad_window_and_cache_use_are_refused():
    with pytest.raises(ConfigError, match="sliding_window must be a positive number"):
        tiny_config(sliding_window=0)
    with pytest.raises(ScribeError, match="rolling cache is for sliding-window models"):
        RollingKVCache(tiny_config(), 1)
    model = scribelm.model.Transformer(tiny_config(sliding_window=4)).eval()
    with pytest.raises(ScribeError, match="takes no attention mask"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=RollingKVCache(model.config, 1),
              attention_mask=torch.ones(1, 3))
    assert KVCache(model.config, 1).keys.shape[3] == model.config.context_length  # the full cache still works
