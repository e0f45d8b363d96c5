"""GGUF files run in scribelm, checked against llama.cpp (llama-cpp-python, in a child process
via tests/llama_peer.py) on the very same files: logits, tokenization, files written by
llama.cpp's own quantizer, round trips through our exporter, and files that are truncated
or lie about their contents."""

import json
import struct

import numpy as np
import pytest
import torch

import scribelm
from scribelm.config import ModelConfig
from scribelm.interop.gguf import LLAMA3_REGEX, QWEN2_REGEX, export_gguf
from scribelm.interop.gguf_load import describe_gguf, unpermute_interleaved_rope
from scribelm.interop.gguf_reader import GGUFError, read_gguf
from scribelm.accel.quantized import QuantizedLinear
from tests import llama_peer
from tests.conftest import tiny_config
from tests.interop.test_gguf import STRINGS, byte_level_tokenizer, sentencepiece_style_tokenizer
from tests.trained_tiny import config, corpus, tokenizer, trained_lm

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = STRINGS + ["hello   world\n\n\nnext", "Ωmega ψ ऄ — “quotes” ½ ß", "I'LL DO IT, you're 123456 ok", "a\r\nb"]


def logits_of(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids]))[0].float().numpy()  # (T, V)


def held_out_ids(lm, n=64):
    return lm.tokenizer.encode(corpus()[1])[:n]


@pytest.fixture(scope="module")
def llama_lm():
    return trained_lm("llama")


@pytest.fixture(scope="module")
def exports(llama_lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-load")
    return {t: export_gguf(llama_lm, folder / f"tiny-{t}.gguf", type=t) for t in ("f32", "f16", "q8_0")}


# --------------------------------------------------------------------------- against llama.cpp


def test_f32_and_f16_files_match_llama_cpp(exports, llama_lm):
    ids = held_out_ids(llama_lm)
    loaded = {t: scribelm.load(exports[t]) for t in ("f32", "f16")}
    tok = loaded["f32"].tokenizer
    tokens, texts, f32_logits, f16_logits = llama_peer.run([
        llama_peer.tokenize(exports["f32"], TEXTS, vocab_only=True),
        llama_peer.detokenize(exports["f32"], [tok.encode(t) for t in TEXTS], vocab_only=True),
        llama_peer.logits(exports["f32"], ids), llama_peer.logits(exports["f16"], ids),
    ])
    for text, theirs, their_text in zip(TEXTS, tokens, texts, strict=True):
        assert tok.encode(text) == theirs, text
        assert tok.decode(tok.encode(text)) == their_text
    assert np.abs(f32_logits).max() > 1  # a trained model: logits with something to compare
    np.testing.assert_allclose(logits_of(loaded["f32"], ids), f32_logits, atol=1e-3, rtol=0)
    # llama.cpp multiplies F16 weights by activations rounded to float16 too; we keep them float32.
    ours = logits_of(loaded["f16"], ids)
    assert np.linalg.norm(ours - f16_logits) / np.linalg.norm(f16_logits) < 1e-3
    np.testing.assert_allclose(ours, f16_logits, atol=5e-3, rtol=0)
    assert loaded["f32"].tokenizer.chat_template == llama_lm.tokenizer.chat_template
    assert loaded["f32"].chat([{"role": "user", "content": "Hi"}], max_new_tokens=3, temperature=0) is not None


def test_sentencepiece_and_llama3_vocabularies_tokenize_like_llama_cpp(tmp_path):
    files = {}
    for name, tok in (("spm", sentencepiece_style_tokenizer()), ("llama3", byte_level_tokenizer(LLAMA3_REGEX)),
                      ("qwen2", byte_level_tokenizer(QWEN2_REGEX))):
        lm = scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=600)), tok)
        files[name] = export_gguf(lm, tmp_path / f"{name}.gguf")
    texts = TEXTS + ["<s> typed </s>", " leading", "x  ", "日本語のテキスト", "\u200b zero width"]
    jobs = [llama_peer.tokenize(path, texts, vocab_only=True) for path in files.values()]
    for (name, path), theirs in zip(files.items(), llama_peer.run(jobs), strict=True):
        tok = scribelm.load(path).tokenizer
        assert tok.id_to_token(0) is not None
        for text, their_ids in zip(texts, theirs, strict=True):
            assert tok.encode(text) == their_ids, (name, text)
    assert not scribelm.load(files["llama3"]).generation_config["add_bos_token"]  # as the file says
    spm = scribelm.load(files["spm"]).tokenizer
    assert any(spm.id_to_token(i).startswith("<0x") for i in spm.encode("ऄ"))  # byte fallback was exercised
    assert spm.decode(spm.encode("Ωmega ψ ऄ")) == "Ωmega ψ ऄ"


def test_sentencepiece_scores_decide_the_merges_as_in_llama_cpp(tmp_path, monkeypatch):
    """Scores unrelated to the merge order (as SentencePiece's log-probabilities are): llama.cpp's
    highest-score-first merging and ours still agree token for token."""
    scores = np.random.default_rng(0).normal(size=600)
    write_scores = gguf.GGUFWriter.add_token_scores
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_scores", lambda self, _: write_scores(self, scores.tolist()))
    tok = sentencepiece_style_tokenizer()
    path = export_gguf(scribelm.LM(scribelm.Transformer(tiny_config(vocab_size=600)), tok), tmp_path / "spm.gguf")
    texts = TEXTS + corpus()[1].splitlines()
    theirs = llama_peer.run([llama_peer.tokenize(path, texts, vocab_only=True)])[0]
    ours = scribelm.load(path).tokenizer
    for text, their_ids in zip(texts, theirs, strict=True):
        assert ours.encode(text) == their_ids, text
    assert sum(ours.encode(t) != tok.encode(t) for t in texts) > len(texts) // 2  # the scores did reorder merges


@pytest.fixture(scope="module")
def llama_cpp_quantized(tmp_path_factory):
    """llama.cpp's quantizer applied to our F32 export of a model whose rows hold 256 values
    (K-quant blocks), and llama.cpp's logits on every file it wrote."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, context_length=128, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_mlp=256, activation="swiglu", norm="rmsnorm", position="rope", qkv_bias=False,
                      attn_out_bias=False, mlp_bias=False, tie_embeddings=False, init_std=0.05)
    lm = scribelm.LM(scribelm.Transformer(cfg).eval(), tokenizer())
    folder = tmp_path_factory.mktemp("llama-quantized")
    source = export_gguf(lm, folder / "f32.gguf")
    ftypes = dict(F16=1, BF16=32, Q8_0=7, Q4_0=2, Q4_1=3, Q5_0=8, Q5_1=9, Q4_K_M=15, Q5_K_M=17, Q6_K=18, Q2_K=10)
    files = {name: folder / f"{name}.gguf" for name in ftypes}
    ids = tokenizer().encode(corpus()[1])[:40]
    runnable = ["F32"] + [name for name in ftypes if name != "Q2_K"]
    files["F32"] = source
    jobs = [llama_peer.quantize(source, files[name], ftype) for name, ftype in ftypes.items()]
    jobs += [llama_peer.logits(files[name], ids) for name in runnable]
    answers = llama_peer.run(jobs)[len(ftypes):]
    return files, ids, dict(zip(runnable, answers))


EXPECTED_TYPES = {"F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
                  "Q5_1": "Q5_1", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}


@pytest.mark.parametrize("name", list(EXPECTED_TYPES))
def test_files_quantized_by_llama_cpp_load_and_match_it(llama_cpp_quantized, name):
    files, ids, theirs = llama_cpp_quantized
    described = describe_gguf(files[name])
    assert EXPECTED_TYPES[name] in described["weights_stored"]
    lm = scribelm.load(files[name])
    ours = logits_of(lm, ids)
    error = np.abs(ours - theirs[name]).max()
    own_quantization_error = np.abs(theirs[name] - theirs["F32"]).max()  # llama.cpp: this file vs the F32 one
    print(f"{name}: max |ours - llama.cpp| = {error:.4f}; llama.cpp's {name} vs F32: {own_quantization_error:.4f}")
    if name == "F16":
        assert error < 1e-2
    elif name == "BF16":  # llama.cpp rounds activations to bfloat16 as well
        assert error < 0.05
    else:  # llama.cpp rounds activations to 8 bits per block; we multiply with float activations
        assert error < 0.15
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"):
        # We compute with the file's quantized weights, not something near the F32 original.
        assert error < 0.5 * own_quantization_error
    quantized = [m for m in lm.model.modules() if isinstance(m, QuantizedLinear)]
    if name == "Q8_0":
        assert described["weights"] == "Q8_0 -> int8 per channel" and quantized and lm.model.quantization["bits"] == 8
    elif name in ("Q4_0", "Q4_1"):  # kept at 4 bits, value for value
        assert described["weights"] == f"{name} -> int4, groups of 32" and lm.model.quantization["bits"] == 4
        f = read_gguf(files[name])
        for layer, tensor in ((lm.model.blocks[0].attention.q, "blk.0.attn_q.weight"),
                              (lm.model.blocks[1].mlp.down, "blk.1.ffn_down.weight")):
            stored = f.float_tensor(tensor)  # the gguf package's dequantizer
            if tensor.endswith("attn_q.weight"):
                stored = unpermute_interleaved_rope(stored, lm.config.n_heads)
            assert torch.equal(layer.dequantized_weight(), stored)
    else:
        assert not quantized and "float32" in described["weights"]


def test_unsupported_type_is_refused_by_name(llama_cpp_quantized):
    files, _, _ = llama_cpp_quantized
    with pytest.raises(GGUFError, match=r"is Q2_K, a type scribelm does not load"):
        scribelm.load(files["Q2_K"])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("type", ["f32", "f16", "q8_0"])
def test_round_trip_gives_the_same_tokens(exports, llama_lm, type):
    lm = scribelm.load(exports[type])
    prompt = "And God said, Let there be"
    assert lm.generate(prompt, max_new_tokens=20, temperature=0) == llama_lm.generate(prompt, max_new_tokens=20, temperature=0)
    ids = held_out_ids(llama_lm)
    error = np.abs(logits_of(lm, ids) - logits_of(llama_lm, ids)).max()
    assert error <= {"f32": 0.0, "f16": 2e-3, "q8_0": 0.1}[type]
    assert lm.config.to_dict() == llama_lm.config.to_dict()


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "moe", "qwen2moe"])
def test_other_architectures_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    experts = dict(n_experts=4, experts_per_token=2, name=f"tiny-{kind}")
    cfg = {"moe": config("llama").replace(**experts),
           "qwen2moe": config("qwen2").replace(**experts, d_expert=64, d_shared_expert=96, normalize_top_k=False)
           }.get(kind) or config(kind)
    original = scribelm.LM(scribelm.Transformer(cfg.replace(init_std=0.1)).eval(), tokenizer())
    ids = tokenizer().encode("In the beginning God created the heaven and the earth.")
    for type, bound in (("f32", 0.0), ("f16", 5e-3), ("q8_0", 0.1)):
        lm = scribelm.load(export_gguf(original, tmp_path / f"{kind}-{type}.gguf", type=type))
        unused = ("init_std", "d_mlp") if cfg.n_experts else ("init_std",)  # d_mlp: no dense MLP to size
        assert {k: v for k, v in lm.config.to_dict().items() if k not in unused} == \
            {k: v for k, v in original.config.to_dict().items() if k not in unused}
        assert np.abs(logits_of(lm, ids) - logits_of(original, ids)).max() <= bound, type
        if type != "q8_0":
            assert lm.generate("In the", max_new_tokens=8, temperature=0) == original.generate("In the", max_new_tokens=8, temperature=0)


def test_llama3_rope_scaling_comes_back_from_rope_freqs(tmp_path):
    torch.manual_seed(0)
    scaling = dict(type="llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=6.0, original_context_length=200)
    cfg = tiny_config(vocab_size=512, d_model=128, n_heads=2, n_kv_heads=1, context_length=512,
                      rope_theta=500000.0, rope_scaling=scaling)
    original = scribelm.LM(scribelm.Transformer(cfg).eval(), tokenizer())
    path = export_gguf(original, tmp_path / "llama31.gguf")
    lm = scribelm.load(path)
    # the same frequencies: low 1, high 3, context 100 is the same scaling as low 2, high 6, context 200
    assert lm.config.rope_scaling == dict(scaling, low_freq_factor=1.0, high_freq_factor=3.0, original_context_length=100)
    ids = list(range(300))  # beyond the original context, where the scaling matters
    np.testing.assert_allclose(logits_of(lm, ids), logits_of(original, ids), atol=1e-5, rtol=0)
    # divisors that no Llama 3 scaling gives are refused, not approximated
    data = bytearray(path.read_bytes())
    at = read_gguf(path).tensors["rope_freqs.weight"].offset
    data[at: at + 4 * 32] = np.linspace(1, 9, 32, dtype=np.float32)[::-1].tobytes()
    (tmp_path / "odd.gguf").write_bytes(bytes(data))
    _refused(tmp_path / "odd.gguf", "are not Llama 3.1's scaling")


# --------------------------------------------------------------------------- bad files


def _tensor_dims_at(data: bytes, name: str) -> int:
    """Byte offset of the first dimension of tensor `name` in the header's tensor table."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    return at + 4  # past n_dims (u32)


def _refused(path, *needles):
    with pytest.raises(GGUFError) as caught:
        scribelm.load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


def test_truncated_files_are_refused(exports, tmp_path):
    data = exports["q8_0"].read_bytes()
    header_end = data.index(b"output_norm.weight") + 40  # inside the tensor table
    for cut in (2, 20, 40, 1000, header_end, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        if cut < 4:  # not even the magic bytes: no longer a GGUF file, refused as any other file
            with pytest.raises(scribelm.ScribeError, match="is a file"):
                scribelm.load(path)
            continue
        _refused(path)


def test_files_that_lie_are_refused(exports, tmp_path):
    data = bytearray(exports["f32"].read_bytes())

    def variant(name, change):
        copy = bytearray(data)
        change(copy)
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bytes(copy))
        return path

    # a tensor that claims more rows than the file holds
    at = _tensor_dims_at(data, "blk.1.ffn_down.weight")
    huge = variant("rows", lambda d: d.__setitem__(slice(at + 8, at + 16), struct.pack("<Q", 1 << 40)))
    _refused(huge, "blk.1.ffn_down.weight", "lies about its tensors")
    # a tensor whose size fits the file but not the metadata
    narrow = variant("narrow", lambda d: d.__setitem__(slice(at + 8, at + 16), struct.pack("<Q", 32)))
    _refused(narrow, "blk.1.ffn_down.weight", "has shape [32, 128]")
    # an embedding with fewer rows than the vocabulary has tokens
    embd = _tensor_dims_at(data, "token_embd.weight")
    rows = variant("vocab", lambda d: d.__setitem__(slice(embd + 8, embd + 16), struct.pack("<Q", 256)))
    _refused(rows, "the tokenizer has 512 tokens but token_embd.weight only 256 rows")
    # a vocabulary that claims 2**40 tokens
    key = b"tokenizer.ggml.tokens"
    count_at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4
    tokens = variant("tokens", lambda d: d.__setitem__(slice(count_at, count_at + 8), struct.pack("<Q", 1 << 40)))
    _refused(tokens, "tokenizer.ggml.tokens", "more than the rest of the file can hold")
    # a tensor count beyond anything the file could hold
    many = variant("many", lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 1 << 50)))
    _refused(many, "more than fit in the file")
    # metadata arrays nested a hundred thousand deep (a recursive reader would overflow its stack)
    nested = tmp_path / "nested.gguf"
    nested.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
                       + struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0))
    _refused(nested, "nests arrays more than")
    # an architecture scribelm does not run, named
    arch = variant("arch", lambda d: d.__setitem__(slice(d.index(b"llama"), d.index(b"llama") + 5), b"gemma"))
    _refused(arch, "architecture 'gemma' is not supported")


def test_corrupted_headers_are_refused_in_one_line_or_load(exports, tmp_path):
    """Bytes of the header replaced at random: every outcome is a model or one ScribeError line."""
    import random

    data = exports["q8_0"].read_bytes()
    header_end = data.index(b"output_norm.weight") + 60
    rng, path, refused = random.Random(0), tmp_path / "corrupt.gguf", 0
    for _ in range(60):
        corrupt = bytearray(data)
        for _ in range(rng.choice([1, 2, 4])):
            corrupt[rng.randrange(header_end)] = rng.randrange(256)
        path.write_bytes(bytes(corrupt))
        try:
            scribelm.load(path)
        except scribelm.ScribeError as err:
            assert "\n" not in str(err)
            refused += 1
    assert refused > 30


def test_cli_reports_a_bad_file_in_one_line(exports, tmp_path, capsys):
    from scribelm.cli import main

    path = tmp_path / "short.gguf"
    path.write_bytes(exports["f32"].read_bytes()[:5000])
    assert main(["generate", str(path), "hello", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "short.gguf" in err


# --------------------------------------------------------------------------- the model store


def test_models_add_show_and_load_a_gguf_file(exports, llama_lm, tmp_path, monkeypatch, capsys):
    from scribelm.cli import main

    monkeypatch.setenv("SCRIBE_MODELS_DIR", str(tmp_path / "store"))
    assert main(["models", "add", "tiny-q8", str(exports["q8_0"])]) == 0
    assert main(["models", "add", "tiny-f16", str(exports["f16"]), "--link"]) == 0
    capsys.readouterr()
    assert main(["models", "show", "tiny-q8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["format"] == "gguf" and shown["quantization"] == "Q8_0 -> int8 per channel"
    assert shown["config"]["architecture"] == "llama" and shown["chat_template"] == llama_lm.tokenizer.chat_template
    assert main(["models", "show", "tiny-f16", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["linked"] and shown["path"] == str(exports["f16"].resolve()) and shown["quantization"] == "F16 -> float32"
    prompt = "And God said"
    assert scribelm.load("tiny-f16").generate(prompt, max_new_tokens=8, temperature=0) == \
        llama_lm.generate(prompt, max_new_tokens=8, temperature=0)
    assert main(["generate", "tiny-q8", prompt, "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["models", "rm", "tiny-f16"]) == 0
    assert exports["f16"].is_file()  # the linked file stays
    moved = tmp_path / "moved.gguf"
    moved.write_bytes(exports["f16"].read_bytes())
    assert main(["models", "add", "gone", str(moved), "--link"]) == 0
    moved.unlink()
    capsys.readouterr()
    assert main(["generate", "gone", "x"]) == 2
    assert "which no longer exists" in capsys.readouterr().err
    assert main(["models", "add", "junk", str(tmp_path / "store" / ".lock")]) == 2  # not a GGUF file


def test_scribe_serve_runs_a_gguf_file(exports, llama_lm):
    openai = pytest.importorskip("openai")
    from scribelm.cli.serve import served_models
    from scribelm.serve.api import create_app
    from scribelm.serve.engine import ModelPool
    from scribelm.serve.preflight import check_model_files
    from tests.serving import ServerThread

    models, _ = served_models([str(exports["q8_0"])])
    assert list(models) == ["tiny-q8_0"]
    assert check_model_files("tiny-q8_0", models["tiny-q8_0"]).quantization == "Q8_0 -> int8 per channel"
    with ServerThread(create_app(ModelPool(models))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        prompt = "And God said"
        reply = client.completions.create(model="tiny-q8_0", prompt=prompt, max_tokens=8, temperature=0)
        expected = scribelm.load(exports["q8_0"]).generate(prompt, max_new_tokens=8, temperature=0)
        assert reply.choices[0].text == expected


def test_scribe_convert_from_gguf(exports, tmp_path):
    from scribelm.cli import main

    assert main(["convert", str(exports["q8_0"]), str(tmp_path / "int8"), "--to", "scribe"]) == 0
    assert main(["convert", str(exports["f16"]), str(tmp_path / "hf"), "--to", "hf"]) == 0
    prompt = "And the earth was"
    for converted, source in (("int8", "q8_0"), ("hf", "f16")):
        assert scribelm.load(tmp_path / converted).generate(prompt, max_new_tokens=8, temperature=0) == \
            scribelm.load(exports[source]).generate(prompt, max_new_tokens=8, temperature=0)
    assert scribelm.load(tmp_path / "int8").model.quantization["bits"] == 8
