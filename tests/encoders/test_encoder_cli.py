"""The command line with an encoder: `scribe embed` prints JSON lines that equal `LM.embed`;
`scribe generate` with an encoder says in one line that it cannot, and suggests embed."""

import json

import pytest
import torch

import scribelm
from scribelm.cli import main
from scribelm.errors import ScribeError
from tests.encoders.conftest import save_tiny_hf_bert


def test_scribe_embed_prints_the_library_vectors(minilm_dir, capsys):
    texts = ["a cat sits on the mat", "stock markets fell"]
    assert main(["embed", minilm_dir, *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    expected = scribelm.load(minilm_dir).embed(texts)
    assert torch.allclose(torch.tensor([r["embedding"] for r in rows]), expected, atol=1e-6)


def test_an_encoder_handed_to_generate_says_to_embed(tmp_path, capsys):
    save_tiny_hf_bert(tmp_path, masked_lm=True)
    lm = scribelm.load(tmp_path)
    capsys.readouterr()  # transformers' progress bars while saving
    with pytest.raises(ScribeError, match=r"encoder .* cannot generate text; .*lm\.embed"):
        lm.generate([5, 6, 7], max_new_tokens=3)
    assert main(["generate", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "embed" in err and len(err.strip().splitlines()) == 1


def test_the_server_refuses_an_encoder_with_the_reason(minilm_dir):
    from scribelm.serve.engine import Engine

    with pytest.raises(ScribeError, match="encoder with bidirectional attention and cannot generate"):
        Engine(scribelm.load(minilm_dir), name="minilm")
