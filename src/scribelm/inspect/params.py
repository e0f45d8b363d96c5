"""Where the parameters are: the textbook breakdown, computed from a config.

The model is built on PyTorch's meta device (shapes only, no memory), so
even GPT-3 175B is counted in milliseconds, and every row comes from the
real module tree: the table cannot drift from the model code.

Rows, in the textbook's order: token embedding; per-layer query, key, value
and output projections; MLP up (and gate, for SwiGLU/GeGLU) and down;
unembedding. Then what textbooks leave out: biases, norm weights, learned
positions. Totals: weight matrices, everything (a tied unembedding counted
once).

Training compute per token follows Kaplan et al./PaLM: 6·N for the matrix
multiplies (N = parameters used in matmuls: everything but embedding
look-ups) plus 12·L·H·hd·T for attention scores and their weighted sum over
a context of T tokens.

A mixture of experts adds rows for the router, the experts (all of them) and a
shared expert; "active" counts what one token uses: every parameter but the
experts it is not routed to, total − (E − k)/E · experts (Mixtral 8x7B: 46.7B
total, 12.9B active). Training FLOPs follow the active parameters.

JSON keys (stable): "rows" (list of {"name", "count", "per_layer"}),
"weight_matrices", "total", "active", "non_embedding", "per_layer", "matmul_params",
"train_flops_per_token" ({"6n", "attention", "total"}),
"weights_bytes" ({"fp32", "bf16", "int8", "int4"}),
"kv_cache_bytes_per_token" ({"fp32", "bf16"}), "config".
"""

from __future__ import annotations

from typing import Any

import torch

from scribelm.config import ModelConfig
from scribelm.model import Transformer

# (row name, parameter-name suffix inside a block) in textbook order.
_BLOCK_MATRICES = [
    ("query", "attention.q.weight"),
    ("key", "attention.k.weight"),
    ("value", "attention.v.weight"),
    ("output", "attention.o.weight"),
    ("mlp up", "mlp.up.weight"),
    ("mlp gate", "mlp.gate.weight"),
    ("mlp down", "mlp.down.weight"),
    ("router", "mlp.router.weight"),
    ("shared expert gate", "mlp.shared_expert_gate.weight"),
]


def parameter_breakdown(config: ModelConfig) -> dict[str, Any]:
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(model.named_parameters())  # a tied unembedding appears once, under token_embedding
    L = config.n_layers

    def total(pred) -> int:
        return sum(p.numel() for n, p in params.items() if pred(n))

    rows: list[dict[str, Any]] = []

    def add(name: str, count: int, per_layer: int | None = None, matrix: bool = False) -> None:
        rows.append({"name": name, "count": count, "per_layer": per_layer, "weight_matrix": matrix})

    add("token embedding", params["token_embedding.weight"].numel(), matrix=True)
    for label, suffix in _BLOCK_MATRICES:
        count = total(lambda n: n.startswith("blocks.") and n.endswith(suffix))
        if count:
            add(label, count, count // L, matrix=True)
    expert_weights = total(lambda n: ".mlp.experts." in n and n.endswith(".weight"))
    if expert_weights:
        add(f"experts ({config.n_experts} × {'gate, up, down' if config.gated_mlp else 'up, down'})",
            expert_weights, expert_weights // L, matrix=True)
    shared_weights = total(lambda n: ".mlp.shared_expert." in n and n.endswith(".weight"))
    if shared_weights:
        add("shared expert", shared_weights, shared_weights // L, matrix=True)
    unembedding = config.d_model * config.vocab_size
    add("unembedding" + (" (tied: shares the token embedding)" if config.tie_embeddings else ""),
        0 if config.tie_embeddings else unembedding, matrix=True)
    weight_matrices = sum(r["count"] for r in rows)

    biases = total(lambda n: n.startswith("blocks.") and n.endswith(".bias") and "norm" not in n)
    if biases:
        add("biases", biases, biases // L)
    norms = total(lambda n: "norm" in n)
    if norms:
        add("norms", norms, total(lambda n: n.startswith("blocks.0.") and "norm" in n))
    if model.position_embedding is not None:
        add("learned positions", params["position_embedding.weight"].numel())

    grand_total = sum(p.numel() for p in params.values())
    embeddings = params["token_embedding.weight"].numel() + (
        params["position_embedding.weight"].numel() if model.position_embedding is not None else 0
    )
    per_layer = total(lambda n: n.startswith("blocks.0."))
    # Parameters that take part in a matrix multiply: the unembedding does (tied or not); look-ups do not.
    matmul_params = grand_total - embeddings + unembedding - total(lambda n: "norm" in n or n.endswith(".bias"))
    # A token runs k of the E experts: the other experts' parameters are held but not used for it.
    unused_fraction = (config.n_experts - config.experts_per_token) / config.n_experts if config.n_experts else 0.0
    inactive = round(unused_fraction * total(lambda n: ".mlp.experts." in n))
    inactive_matmul = round(unused_fraction * expert_weights)
    matmul_params -= inactive_matmul
    attention_flops = 12 * L * config.n_heads * config.head_dim * config.context_length
    kv_per_token = 2 * L * config.n_kv_heads * config.head_dim
    return {
        "config": config.to_dict(),
        "rows": rows,
        "weight_matrices": weight_matrices,
        "total": grand_total,
        "active": grand_total - inactive,
        "non_embedding": grand_total - embeddings,
        "per_layer": per_layer,
        "matmul_params": matmul_params,
        "train_flops_per_token": {
            "6n": 6 * matmul_params,
            "attention": attention_flops,
            "total": 6 * matmul_params + attention_flops,
        },
        "weights_bytes": {"fp32": 4 * grand_total, "bf16": 2 * grand_total, "int8": grand_total, "int4": grand_total // 2},
        "kv_cache_bytes_per_token": {"fp32": 4 * kv_per_token, "bf16": 2 * kv_per_token},
    }


def flops_per_token(config: ModelConfig, sequence_length: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token, for MFU estimates."""
    breakdown = parameter_breakdown(config)
    T = sequence_length or config.context_length
    return breakdown["train_flops_per_token"]["6n"] + 12 * config.n_layers * config.n_heads * config.head_dim * T
