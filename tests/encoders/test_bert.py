"""BERT imported from transformers matches it: hidden states, pooler and masked-LM logits
within 1e-5 on random-init configs with padding and token types; export reads back bit for bit."""

import pytest
import torch
from safetensors.torch import load_file

import scribelm
from scribelm.config import ModelConfig
from scribelm.errors import ScribeError
from scribelm.model import Transformer
from tests.encoders.conftest import save_tiny_hf_bert


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    token_types = torch.randint(0, 2, (3, 12), generator=g)
    return ids, mask, token_types


def test_bert_model_hidden_states_and_pooler_match_transformers(tmp_path):
    ref = save_tiny_hf_bert(tmp_path, masked_lm=False)
    lm = scribelm.load(tmp_path)
    assert not lm.config.causal and lm.config.pooler and lm.config.name == "bert-encoder"
    ids, mask, token_types = _batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        hidden = lm.model.hidden_states(ids, attention_mask=mask, token_types=token_types)
        real = mask.bool()  # padded positions are not outputs of either model
        assert (hidden - expected.last_hidden_state)[real].abs().max() < 1e-5
        assert (lm.model.pooled(hidden) - expected.pooler_output).abs().max() < 1e-5
        unpadded = lm.model.hidden_states(ids[:1])  # no mask at all: full bidirectional attention
        assert (unpadded - ref(input_ids=ids[:1]).last_hidden_state).abs().max() < 1e-5


def test_bert_masked_lm_logits_match_transformers(tmp_path):
    ref = save_tiny_hf_bert(tmp_path, masked_lm=True)
    lm = scribelm.load(tmp_path)
    assert lm.config.mlm_head and lm.config.unembedding_bias and lm.config.tie_embeddings
    ids, mask, token_types = _batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        logits = lm.model(ids, attention_mask=mask, token_types=token_types)
    assert (logits - expected)[mask.bool()].abs().max() < 1e-5


@pytest.mark.parametrize("masked_lm", [False, True])
def test_bert_export_reads_back_bit_for_bit(tmp_path, masked_lm):
    save_tiny_hf_bert(tmp_path / "in", masked_lm=masked_lm)
    lm = scribelm.load(tmp_path / "in")
    lm.save(tmp_path / "out", format="hf")
    written, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "in" / "model.safetensors")
    for name, tensor in written.items():
        assert torch.equal(tensor, original[name]), name
    from transformers import AutoModel, AutoModelForMaskedLM

    loader = AutoModelForMaskedLM if masked_lm else AutoModel
    peer = loader.from_pretrained(tmp_path / "out").eval()
    ids, mask, token_types = _batch()
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask, token_types=token_types) if masked_lm else lm.model.hidden_states(
            ids, attention_mask=mask, token_types=token_types)
        theirs = peer(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        theirs = theirs.logits if masked_lm else theirs.last_hidden_state
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-5


def test_bert_base_preset_has_the_published_parameter_count():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("bert-base"))
    assert model.num_parameters() == 109_482_240  # transformers' BertModel(bert-base-uncased)


def test_unsupported_bert_variant_is_refused_in_one_line(tmp_path):
    save_tiny_hf_bert(tmp_path, masked_lm=False, position_embedding_type="relative_key")
    with pytest.raises(ScribeError, match="position_embedding_type='relative_key'"):
        scribelm.load(tmp_path)


def test_an_encoder_is_not_exported_as_a_decoder_family(tmp_path):
    save_tiny_hf_bert(tmp_path / "in", masked_lm=True)
    lm = scribelm.load(tmp_path / "in")
    with pytest.raises(ScribeError, match="causal attention"):
        lm.save(tmp_path / "out", format="hf", architecture="GPT2LMHeadModel")
