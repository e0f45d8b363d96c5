"""T5 imported from transformers matches it: the relative position buckets pair by pair,
encoder states and decoder logits (v1.0 ReLU with scaled tied head, v1.1 gated-GELU),
greedy generation token for token with the cache, export back bit for bit; presets count
the published parameters; other variants are refused in one line."""

import pytest
import torch
from safetensors.torch import load_file

import scribelm
from scribelm.config import ModelConfig
from scribelm.errors import ScribeError
from scribelm.relative_position import relative_position_bucket
from scribelm.seq2seq import build_model, greedy_generate


def save_tiny_hf_t5(path, feed_forward: str, scale: bool, seed: int = 0):
    """A random transformers T5 (3 encoder, 2 decoder layers, width 32) with every weight drawn anew,
    so no norm or bias keeps a trivial init. `scale`: T5 v1.0's scaled head (transformers 5 spells
    an unscaled v1.1 head tie_word_embeddings=False)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj=feed_forward, relative_attention_num_buckets=8,
                      relative_attention_max_distance=20, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                      **({} if scale else {"tie_word_embeddings": False}))
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(path)
    return model


VARIANTS = [("relu", True), ("gated-gelu", False)]  # v1.0, v1.1


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_function_equals_transformers_on_every_pair(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    positions = torch.arange(513)
    relative = positions[None, :] - positions[:, None]  # (513, 513): every (query, key) pair up to 512 apart
    for buckets, distance in [(32, 128), (8, 20)]:
        ours = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
        theirs = T5Attention._relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=buckets,
                                                       max_distance=distance)
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("feed_forward, scale", VARIANTS)
def test_t5_encoder_states_and_logits_match_transformers(tmp_path, feed_forward, scale):
    ref = save_tiny_hf_t5(tmp_path, feed_forward, scale)
    lm = scribelm.load(tmp_path)
    assert lm.config.encoder_layers == 3 and lm.config.n_layers == 2 and lm.config.scale_decoder_output == scale
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    decoder_ids = torch.randint(2, 99, (2, 25), generator=g)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        memory = lm.model.encode(ids, mask)
        logits = lm.model.decode(decoder_ids, memory)
    assert (memory.states - expected.encoder_last_hidden_state)[mask.bool()].abs().max() < 1e-4
    assert (logits - expected.logits).abs().max() < 1e-4


@pytest.mark.parametrize("feed_forward, scale", VARIANTS)
def test_t5_greedy_and_beam_generation_are_token_identical_for_32_tokens(tmp_path, feed_forward, scale):
    ref = save_tiny_hf_t5(tmp_path, feed_forward, scale, seed=3)
    lm = scribelm.load(tmp_path)
    for prompt in ([5, 17, 42, 8, 9, 60, 33, 2, 71], [88, 14]):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, num_beams=1)[0, 1:].tolist()
        new, _ = greedy_generate(lm.model, prompt, max_new_tokens=32, stop_ids=[1])
        assert new == expected
        # the library entry point: the prompt goes to the encoder
        assert lm.generate(prompt, max_new_tokens=32, temperature=0, return_details=True).token_ids == expected
        beams = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, num_beams=4)[0, 1:].tolist()
        ours = lm.generate(prompt, max_new_tokens=32, temperature=0, num_beams=4, return_details=True)
        assert ours.token_ids == beams


def test_cross_attention_keys_and_values_are_computed_once_per_prompt(tmp_path):
    save_tiny_hf_t5(tmp_path, "relu", True)
    lm = scribelm.load(tmp_path)
    calls = []
    handle = lm.model.decoder.blocks[0].cross_attention.k.register_forward_hook(lambda *a: calls.append(1))
    new, _ = greedy_generate(lm.model, [5, 6, 7], max_new_tokens=10)
    handle.remove()
    assert len(new) == 10 and len(calls) == 1


@pytest.mark.parametrize("feed_forward, scale", VARIANTS)
def test_t5_export_reads_back_bit_for_bit(tmp_path, feed_forward, scale):
    ref = save_tiny_hf_t5(tmp_path / "in", feed_forward, scale)
    lm = scribelm.load(tmp_path / "in")
    lm.save(tmp_path / "out", format="hf")
    written, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "in" / "model.safetensors")
    assert set(written) == set(original)
    for name, tensor in written.items():
        assert torch.equal(tensor, original[name]), name
    from transformers import T5ForConditionalGeneration

    again = T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[5, 17, 42, 8]])
    decoder_ids = torch.tensor([[0, 3, 9]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, decoder_input_ids=decoder_ids).logits,
                           ref(input_ids=ids, decoder_input_ids=decoder_ids).logits)


@pytest.mark.parametrize("preset, published", [("t5-small", 60_506_624), ("t5-base", 222_903_552)])
def test_t5_presets_have_the_published_parameter_counts(preset, published):
    with torch.device("meta"):
        model = build_model(ModelConfig.from_preset(preset))
    assert model.num_parameters() == published  # transformers' T5ForConditionalGeneration


def test_unsupported_t5_variants_are_refused_in_one_line(tmp_path):
    import json

    save_tiny_hf_t5(tmp_path, "relu", True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(ScribeError, match="feed_forward_proj='gated-tanh'"):
        scribelm.load(tmp_path)
    # UMT5: a relative bias of its own in every layer, another attention scheme
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["UMT5ForConditionalGeneration"],
                                                      "model_type": "umt5"}))
    with pytest.raises(ScribeError, match="architecture UMT5ForConditionalGeneration is not supported"):
        scribelm.load(tmp_path)


def test_t5_through_the_command_line(tmp_path, capsys):
    from scribelm.cli import main

    ref = save_tiny_hf_t5(tmp_path / "in", "relu", True, seed=3)
    expected = ref.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=8, do_sample=False)[0, 1:].tolist()
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--to", "hf"]) == 0
    lm = scribelm.load(tmp_path / "out")
    assert lm.generate([5, 17, 42], max_new_tokens=8, temperature=0, return_details=True).token_ids == expected
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "native"), "--to", "scribe"]) == 0
    native = scribelm.load(tmp_path / "native")  # the native checkpoint stores the shared embedding once
    assert native.generate([5, 17, 42], max_new_tokens=8, temperature=0, return_details=True).token_ids == expected


def test_scribe_params_counts_encoder_decoder_and_cross_attention_apart(capsys):
    import json

    from scribelm.cli import main

    assert main(["params", "t5-small", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r["count"] for r in table["rows"]}
    assert table["total"] == 60_506_624 == sum(rows.values())
    attention = 4 * 512 * 512  # q, k, v, o per layer
    assert rows["encoder self-attention"] == rows["decoder self-attention"] == rows["decoder cross-attention"] == 6 * attention
    assert rows["shared token embedding"] == 32128 * 512


def test_t5_text_prompts_get_the_tokenizers_closing_token_and_embed_uses_the_encoder(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    from scribelm.tokenizer import Tokenizer

    ref = save_tiny_hf_t5(tmp_path, "relu", True, seed=3)
    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 99)}}
    backend = Backend(models.WordLevel(vocab, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    backend.add_special_tokens(["<pad>", "</s>"])
    Tokenizer(backend, eos_token="</s>", pad_token="<pad>").save(tmp_path)
    lm = scribelm.load(tmp_path)
    text = "w5 w17 w42 w8"
    expected = ref.generate(torch.tensor([[5, 17, 42, 8, 1]]), max_new_tokens=12, do_sample=False)[0, 1:].tolist()
    ids = lm.generate(text, max_new_tokens=12, temperature=0, return_details=True).token_ids
    assert ids == expected[: len(ids)] and len(ids) >= 1
    with torch.no_grad():
        states = ref.encoder(input_ids=torch.tensor([[5, 17, 42, 8, 1]])).last_hidden_state.mean(1)
    assert torch.allclose(lm.embed(text, normalize=False), states, atol=1e-4)
