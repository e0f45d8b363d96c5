import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "In the beginning God created the heaven and the earth.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money.",
    "The quick brown fox jumps over the lazy dog; 12345 + 67890 = 80235.",
    "Ünïcödé text: café, naïve, 你好世界, こんにちは, emoji 🎉🚀, math ∑∫√.",
] * 20


@pytest.fixture(scope="session")
def corpus():
    return list(CORPUS)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from scribelm.tokenizer import Tokenizer

    return Tokenizer.train(corpus, vocab_size=400, min_frequency=2)


def tiny_config(**overrides):
    from scribelm.config import ModelConfig

    base = dict(
        vocab_size=400, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64,
        activation="swiglu", norm="rmsnorm", position="rope", qkv_bias=False, attn_out_bias=False,
        mlp_bias=False, tie_embeddings=True,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which costs dearly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_hf_llama(path, vocab_size: int):
    """A random-init transformers Llama (2 layers, width 32, grouped-query), saved at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
