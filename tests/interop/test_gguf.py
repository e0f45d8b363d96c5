"""GGUF export checked against llama.cpp itself (llama-cpp-python): tokenization, logits,
greedy completion, and the q8_0 / f16 encodings. llama.cpp runs in a child process
(tests/llama_peer.py), so a crash of it is judged and reported, never fatal to the run."""

import copy

import numpy as np
import pytest
import torch

import scribelm
from scribelm.interop.gguf import GGUFExportError, export_gguf, permute_for_interleaved_rope
from scribelm.quant import quantize_model
from tests import llama_peer
from tests.conftest import tiny_config
from tests.trained_tiny import corpus, tokenizer, trained_lm

gguf = pytest.importorskip("gguf")

STRINGS = [
    "In the beginning God created the heaven and the earth.",
    "And Moses said unto the LORD, I'm not eloquent; they've gone, we'll see.",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "numbers 1234567 and 3.14159, 10,000 cubits",
    "Ünïcödé café naïve 你好世界 こんにちは 🎉🚀 ∑∫√",
    "<|bos|> special tokens typed as text <|end|><|assistant|>",
    "",
    "a",
    "!!!???...---",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def llama_tokenizes(path, texts):
    """llama.cpp's ids for each text (the vocabulary alone is loaded)."""
    __tracebackhide__ = True  # a skip or failure is reported at the test's line
    return llama_peer.run([llama_peer.tokenize(path, texts, vocab_only=True)])[0]


def llama_logits(path, ids):
    __tracebackhide__ = True
    return llama_peer.run([llama_peer.logits(path, ids)])[0]  # (T, V)


def our_logits(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids]))[0].float().numpy()  # (T, V)


def held_out_ids(lm, n=100):
    return lm.tokenizer.encode(corpus()[1])[:n]


@pytest.fixture(scope="module")
def llama_lm():
    return trained_lm("llama")


@pytest.fixture(scope="module")
def llama_f32(llama_lm, tmp_path_factory):
    return export_gguf(llama_lm, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", type="f32")


GREEDY_PROMPT = "And the LORD spake unto Moses, saying,"


@pytest.fixture(scope="module")
def llama_f32_answers(llama_f32, llama_lm):
    """llama.cpp's tokenization, logits and greedy completion of the f32 file, in one child process."""
    tok = llama_lm.tokenizer
    jobs = [llama_peer.tokenize(llama_f32, STRINGS, vocab_only=True),
            llama_peer.detokenize(llama_f32, [tok.encode(text) for text in STRINGS], vocab_only=True)]
    jobs += [llama_peer.logits(llama_f32, held_out_ids(llama_lm, n)) for n in (1, 17, 100)]
    jobs += [llama_peer.greedy(llama_f32, tok.encode(GREEDY_PROMPT), 32)]
    tokens, texts, *logits, completion = llama_peer.run(jobs)
    return dict(tokens=tokens, texts=texts, logits=logits, completion=completion)


def test_metadata_and_tokenizer_in_the_file(llama_f32, llama_lm):
    reader = gguf.GGUFReader(str(llama_f32))
    field = lambda key: reader.fields[key]
    text = lambda key: bytes(field(key).parts[field(key).data[0]]).decode()
    number = lambda key: field(key).parts[field(key).data[0]][0]
    assert text("general.architecture") == "llama"
    assert text("tokenizer.ggml.model") == "gpt2" and text("tokenizer.ggml.pre") == "gpt-2"
    assert text("tokenizer.chat_template") == llama_lm.tokenizer.chat_template
    assert number("llama.block_count") == 2 and number("llama.attention.head_count_kv") == 2
    assert number("tokenizer.ggml.eos_token_id") == llama_lm.tokenizer.eos_id
    assert len(field("tokenizer.ggml.tokens").data) == llama_lm.config.vocab_size
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    assert types[llama_lm.tokenizer.bos_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    names = {t.name for t in reader.tensors}
    assert "blk.1.ffn_gate.weight" in names and "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert not list(llama_f32.parent.glob(".*tmp*"))  # written atomically


def test_llama_cpp_tokenizes_like_scribelm(llama_f32_answers, llama_lm):
    for text, theirs, their_text in zip(STRINGS, llama_f32_answers["tokens"], llama_f32_answers["texts"], strict=True):
        assert theirs == llama_lm.tokenizer.encode(text), text
        assert their_text == llama_lm.tokenizer.decode(llama_lm.tokenizer.encode(text))


def byte_level_tokenizer(split_regex):
    """A byte-level BPE tokenizer whose text split is `split_regex` (as Llama 3's and Qwen2's are)."""
    from tokenizers import Regex, decoders, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    texts = corpus()[0].splitlines()[:800] + STRINGS * 3
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2))
    return scribelm.Tokenizer(backend)


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen2_pre_tokenizers_match_llama_cpp(tmp_path, name):
    from scribelm.interop.gguf import LLAMA3_REGEX, QWEN2_REGEX

    tok = byte_level_tokenizer(LLAMA3_REGEX if name == "llama-bpe" else QWEN2_REGEX)
    path = export_gguf(scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=512)), tok), tmp_path / "t.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].parts[-1].tobytes().decode() == name
    texts = STRINGS + ["hello   world\n\n\nnext", "I'LL DO IT, you're 123456 ok", "a\r\nb"]
    for text, theirs in zip(texts, llama_tokenizes(path, texts), strict=True):
        assert theirs == tok.encode(text), text


def sentencepiece_style_tokenizer():
    """A Llama 2 / Mistral style tokenizer: BPE over "▁"-joined text with byte fallback."""
    import json

    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    backend = Backend(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(corpus()[0].splitlines()[:800] + STRINGS * 3,
                                trainers.BpeTrainer(vocab_size=600, special_tokens=specials, min_frequency=2))
    spec = json.loads(backend.to_str())
    spec["pre_tokenizer"] = None  # the split was for training only, as in Llama 2's tokenizer.json
    return scribelm.Tokenizer(Backend.from_str(json.dumps(spec)))


def test_sentencepiece_style_tokenizer_matches_llama_cpp(tmp_path):
    tok = sentencepiece_style_tokenizer()
    path = export_gguf(scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=600)), tok), tmp_path / "spm.gguf")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"].parts[-1].tobytes().decode() == "llama"
    texts = STRINGS + ["<s> typed </s>", "hello   world\n\n\nnext", "Ωmega ψ ऄ"]  # the last ones need byte fallback
    for text, theirs in zip(texts, llama_tokenizes(path, texts), strict=True):
        assert theirs == tok.encode(text), text
    assert any(tok.id_to_token(i).startswith("<0x") for i in tok.encode("ऄ"))


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    tok = byte_level_tokenizer(r"\s+|\S+")
    with pytest.raises(GGUFExportError, match="pre-tokenizer is not one llama.cpp knows"):
        export_gguf(scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=512)), tok), tmp_path / "t.gguf")


def test_llama_cpp_logits_match_f32(llama_f32_answers, llama_lm):
    for n, theirs in zip((1, 17, 100), llama_f32_answers["logits"], strict=True):
        ours = our_logits(llama_lm, held_out_ids(llama_lm, n))
        assert ours.shape == theirs.shape
        assert np.abs(ours).max() > 5  # a trained model's logits, not near-zero noise
        np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)


def test_llama_cpp_greedy_completion_matches(llama_f32_answers, llama_lm):
    prompt = llama_lm.tokenizer.encode(GREEDY_PROMPT)
    ours = list(prompt)
    cache = scribelm.KVCache(llama_lm.config, 1, len(prompt) + 32)
    with torch.no_grad():
        logits = llama_lm.model(torch.tensor([prompt]), cache=cache)
        for _ in range(32):
            ours.append(int(logits[0, -1].argmax()))
            logits = llama_lm.model(torch.tensor([[ours[-1]]]), cache=cache)
    assert llama_f32_answers["completion"] == ours[len(prompt):]
    assert len(set(ours[len(prompt):])) > 3  # a real continuation, not one token repeated


@pytest.mark.parametrize("type, bound", [("f16", 0.01), ("q8_0", 0.05)])
def test_f16_and_q8_0_load_and_stay_close(llama_lm, tmp_path, type, bound):
    path = export_gguf(llama_lm, tmp_path / f"tiny-{type}.gguf", type=type)
    ids = held_out_ids(llama_lm)
    ours, theirs = our_logits(llama_lm, ids), llama_logits(path, ids)
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert 1e-6 < rel < bound  # encoded (not silently f32), and close
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9


def test_qwen2_and_gpt2_match_llama_cpp(tmp_path):
    kinds, jobs, expected = ("qwen2", "gpt2"), [], []
    for kind in kinds:
        lm = trained_lm(kind)
        path = export_gguf(lm, tmp_path / f"{kind}.gguf")
        assert gguf.GGUFReader(str(path)).fields["general.architecture"].parts[-1].tobytes().decode() == kind
        ids = held_out_ids(lm, 60)
        jobs.append(llama_peer.logits(path, ids))
        expected.append(our_logits(lm, ids))
    for kind, theirs, ours in zip(kinds, llama_peer.run(jobs), expected, strict=True):
        np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0, err_msg=kind)


def test_llama3_rope_scaling_and_quantized_models_export(tmp_path):
    torch.manual_seed(0)
    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context_length": 16}
    config = tiny_config(vocab_size=512, d_model=64, d_mlp=128, context_length=128, rope_scaling=scaling, init_std=0.1)
    lm = scribelm.LM(scribelm.Transformer(config).eval(), tokenizer())
    ids = held_out_ids(lm, 80)
    scaled = export_gguf(lm, tmp_path / "scaled.gguf")
    # A weight-only int8 model exports its dequantized weights.
    quantized = scribelm.LM(quantize_model(copy.deepcopy(trained_lm("llama").model), 8), tokenizer())
    from_int8 = export_gguf(quantized, tmp_path / "from-int8.gguf")
    int8_ids = held_out_ids(quantized, 40)
    from scribelm.quant import set_kernel

    set_kernel(quantized.model, "reference")
    theirs = llama_peer.run([llama_peer.logits(scaled, ids), llama_peer.logits(from_int8, int8_ids)])
    np.testing.assert_allclose(theirs[0], our_logits(lm, ids), atol=1e-3, rtol=0)
    np.testing.assert_allclose(theirs[1], our_logits(quantized, int8_ids), atol=1e-3, rtol=0)


def test_permutation_interleaves_rotate_half_pairs():
    hd, heads = 8, 2
    rows = torch.arange(heads * hd).float()[:, None]  # row r holds r
    permuted = permute_for_interleaved_rope(rows, heads)[:, 0].long().tolist()
    # within a head, feature i (first half) and i + hd/2 (second half) become neighbours
    assert permuted[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and permuted[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_position="post"), "post-norm blocks"),
        (dict(activation="gelu"), "RoPE with a gelu MLP"),
        (dict(mlp_bias=True), "biases on the attention output or MLP"),
        (dict(position="sinusoidal"), "sinusoidal positions"),
        (dict(position="learned", norm="layernorm", activation="gelu"), "tanh approximation of GELU"),
    ],
)
def test_architectures_gguf_cannot_express(tmp_path, overrides, message):
    lm = scribelm.LM(scribelm.Transformer(tiny_config(**overrides)), tokenizer())
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(lm, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_export_requests(tmp_path):
    lm = scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=512)), tokenizer())
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q4_k'"):
        export_gguf(lm, tmp_path / "x.gguf", type="q4_k")
    with pytest.raises(GGUFExportError, match="q8_0 blocks of 32 do not divide"):
        export_gguf(scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=512, d_model=48, n_heads=4)), tokenizer()),
                    tmp_path / "x.gguf", type="q8_0")
    with pytest.raises(GGUFExportError, match="has none"):
        export_gguf(scribelm.LM(lm.model, None), tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="512 tokens but the model only 400"):
        export_gguf(scribelm.LM(scribelm.Transformer(tiny_config()), tokenizer()), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


HF_FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False, max_position_embeddings=128)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
}


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_imported_hugging_face_models_run_in_llama_cpp(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    config_class, model_class, options = HF_FAMILIES[family]
    if family != "gpt2":
        options = dict(options, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=512, initializer_range=0.1, **options)
    hf = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # initialised biases are zero; make them count so a dropped one would show
        for name, param in hf.named_parameters():
            if name.endswith("bias") and "ln" not in name and "norm" not in name:
                param.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer().save(tmp_path / "hf")
    lm = scribelm.load(tmp_path / "hf")
    path = export_gguf(lm, tmp_path / f"{family}.gguf")
    ids = held_out_ids(lm, 64)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(expected).max() > 1
    np.testing.assert_allclose(llama_logits(path, ids), expected, atol=1e-3, rtol=0)


def test_scribe_convert_to_gguf(tmp_path, llama_lm, capsys):
    from scribelm.cli import main

    llama_lm.save(tmp_path / "model")
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "model.gguf"), "--to", "gguf", "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    # A quantized checkpoint converts too (its weights dequantized).
    scribelm.LM(quantize_model(copy.deepcopy(llama_lm.model), 8), llama_lm.tokenizer).save(tmp_path / "int8")
    assert main(["convert", str(tmp_path / "int8"), str(tmp_path / "int8.gguf"), "--to", "gguf"]) == 0
    # Bad requests are one line each.
    scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=512, norm_position="post")), tokenizer()).save(tmp_path / "post")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "post"), str(tmp_path / "post.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "post-norm blocks" in err and len(err.strip().splitlines()) == 1
    assert main(["convert", str(tmp_path / "model"), str(tmp_path / "x.gguf"), "--to", "gguf", "--type", "q4_k"]) == 2
    assert "unknown GGUF type 'q4_k'" in capsys.readouterr().err
    assert not (tmp_path / "post.gguf").exists() and not (tmp_path / "x.gguf").exists()
    # llama.cpp reads the converted file (last: a llama.cpp that cannot run q8_0 on this CPU skips only this).
    ids = held_out_ids(llama_lm, 50)
    theirs, ours = llama_logits(tmp_path / "model.gguf", ids), our_logits(llama_lm, ids)
    assert 1e-6 < np.linalg.norm(theirs - ours) / np.linalg.norm(ours) < 0.05  # q8_0, and close
