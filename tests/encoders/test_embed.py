"""`LM.embed` with the real all-MiniLM-L6-v2 weights matches sentence-transformers on a few
hundred sentences; pooling follows modules.json; decoders embed too, batched or not alike."""

import pytest
import torch

import scribelm
from scribelm.embed import read_sentence_config
from scribelm.errors import ScribeError
from scribelm.lm import LM
from scribelm.model import Transformer
from tests.conftest import tiny_config
from tests.trained_tiny import kjv_verses


def test_minilm_embeddings_match_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    # a few hundred verses of the bundled corpus, short and long (some past the 256-token limit)
    verses = kjv_verses()
    texts = verses[:240:2] + [" ".join(verses[i:i + 30]) for i in range(300, 330)] + ["", "a", "Don't PANIC!  ünïcode"]
    lm = scribelm.load(minilm_dir)
    assert lm.sentence_config == {"pooling": "mean", "normalize": True, "max_length": 256}
    ours = lm.embed(texts, batch_size=16)
    reference = SentenceTransformer(minilm_dir, device="cpu").encode(texts, normalize_embeddings=True, batch_size=16)
    cosine = (ours * torch.from_numpy(reference)).sum(-1)
    assert ours.shape == (len(texts), 384) and ours.dtype == torch.float32
    assert cosine.min() >= 0.99999
    assert lm.embed(texts[0]).shape == (1, 384)


def test_pooling_follows_the_sentence_transformers_config(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert read_sentence_config(tmp_path) == {"pooling": "cls", "normalize": False}
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_sqrt_len_tokens": true}')
    with pytest.raises(ScribeError, match="exactly one of"):
        read_sentence_config(tmp_path)


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "cls"])
def test_decoder_embeddings_are_the_same_batched_or_alone(tokenizer, pooling):
    torch.manual_seed(0)
    lm = LM(Transformer(tiny_config()).eval(), tokenizer)
    texts = ["In the beginning", "God created the heaven and the earth, and the earth was without form", "light"]
    together = lm.embed(texts, pooling=pooling, batch_size=3)
    alone = torch.cat([lm.embed(t, pooling=pooling) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(3), atol=1e-5)
    if pooling == "last":  # the last token's final hidden state, normalized
        ids = torch.tensor([tokenizer.encode(texts[1])])
        hidden = lm.model.hidden_states(ids)[0, -1]
        assert torch.allclose(together[1], hidden / hidden.norm(), atol=1e-5)
    assert lm.embed(texts, pooling=pooling, normalize=False).norm(dim=-1).max() > 0


def test_embed_refuses_bad_input(tokenizer):
    lm = LM(Transformer(tiny_config()).eval(), tokenizer)
    with pytest.raises(ScribeError, match="unknown pooling"):
        lm.embed("x", pooling="median")
    with pytest.raises(ScribeError, match="list of strings"):
        lm.embed([1, 2])
    with pytest.raises(ScribeError, match="batch_size"):
        lm.embed("x", batch_size=0)


def test_minilm_exported_loads_in_sentence_transformers_with_its_pooling(minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    lm = scribelm.load(minilm_dir)
    lm.save(tmp_path / "out", format="hf")
    texts = ["In the beginning God created the heaven and the earth.", "a cat", "Hello World, [SEP] typed"]
    exported = SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(texts, normalize_embeddings=True)
    assert (lm.embed(texts) * torch.from_numpy(exported)).sum(-1).min() >= 0.99999
    assert scribelm.load(tmp_path / "out").sentence_config == lm.sentence_config
