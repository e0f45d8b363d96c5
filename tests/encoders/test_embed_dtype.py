"""Embedding in bfloat16: on a CPU with native bfloat16 the real MiniLM's vectors stay within
a cosine of 0.999 of float32 on real text (short verses and ~200-token passages) and agree
on the nearest neighbours; "auto" chooses by what the CPU has; the weights are not touched."""

import pytest
import torch

import scribelm
from scribelm.embed import native_bfloat16_cpu, resolve_embed_dtype
from scribelm.errors import ScribeError
from tests.trained_tiny import kjv_verses

needs_bf16 = pytest.mark.skipif(not native_bfloat16_cpu(),
                                reason="this CPU has no native bfloat16 (AMX or AVX512-BF16); float32 is used there")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return scribelm.load(minilm_dir)


@needs_bf16
def test_bfloat16_embeddings_stay_within_the_cosine_bound_of_float32(minilm):
    verses = kjv_verses()
    texts = verses[:96:3] + [" ".join(verses[i:i + 8]) for i in range(400, 560, 8)]  # verses and ~200-token passages
    before = [t.clone() for t in minilm.model.state_dict().values()]
    full = minilm.embed(texts, batch_size=16, dtype="float32")
    half = minilm.embed(texts, batch_size=16, dtype="bfloat16")
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert (full * half).sum(-1).min() >= 0.999
    # the same nearest neighbour for each passage among the others
    def neighbours(v):
        return (v @ v.T).fill_diagonal_(-2).argmax(-1)
    assert (neighbours(full) == neighbours(half)).float().mean() >= 0.95
    assert torch.equal(minilm.embed(texts, batch_size=16, dtype="auto"), half)  # auto is bfloat16 here
    assert all(torch.equal(a, b) for a, b in zip(before, minilm.model.state_dict().values()))
    assert next(minilm.model.parameters()).dtype == torch.float32


def test_auto_dtype_follows_the_cpu_and_bad_names_are_refused(minilm):
    assert resolve_embed_dtype("auto", minilm.model) == (torch.bfloat16 if native_bfloat16_cpu() else torch.float32)
    assert resolve_embed_dtype(None, minilm.model) == torch.float32
    assert resolve_embed_dtype(torch.bfloat16, minilm.model) == torch.bfloat16
    with pytest.raises(ScribeError, match="unknown embedding dtype 'float8'"):
        minilm.embed("light", dtype="float8")


def test_the_bfloat16_copy_follows_changed_weights(minilm):
    texts = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light"]
    first = minilm.embed(texts, dtype="bfloat16")
    name, tensor = next((n, t) for n, t in minilm.model.state_dict().items() if t.dim() == 2)
    saved = tensor.clone()
    try:
        with torch.no_grad():
            tensor.mul_(0.5)  # an in-place update, as an optimizer makes
        changed = minilm.embed(texts, dtype="bfloat16")
        assert not torch.allclose(first, changed, atol=1e-3), name
    finally:
        with torch.no_grad():
            tensor.copy_(saved)
    assert torch.allclose(minilm.embed(texts, dtype="bfloat16"), first)
