"""`explain`: one text through one model, every step of the textbook picture made visible.

    data = explain_data(lm, "The cat sat on the")   # JSON-able: what the page shows
    write_explain_page(data, "explain-out")          # index.html (self-contained) + PNGs + data.json

The steps, in the order the model takes them:

    tokens and ids          the tokenizer's pieces of the text
    embedding vectors       each token's row of the embedding matrix (a heat strip), and a
                            2-D PCA of them: tokens used alike lie near each other
    attention               each layer's and head's pattern: which earlier token each position reads
    residual stream         its size after the embeddings and after each block
    logit lens              what the stream would predict after each block
    MLP neurons             the most active hidden units at each position
    next token              the last position's distribution, under a temperature slider
    direct attribution      which heads and MLPs push the predicted token directly
    SAE features            with `sae=DIR` (a `scribe explain sae` result): the sparse
                            autoencoder's most active features per token, and each one's
                            top-activating contexts (scribelm.inspect.sae_explain)
"""

from __future__ import annotations

import torch

from scribelm.errors import ScribeError
from scribelm.inspect.hooks import transformer_of, as_ids, run_with_cache
from scribelm.inspect.lens import direct_logit_attribution, layer_labels, unembed

#: the slider's temperatures: probabilities are precomputed for each, so the page needs no vocabulary
SLIDER_TEMPERATURES = [round(0.05 * i, 2) for i in range(1, 41)]  # 0.05 ... 2.0
TOP_CANDIDATES = 15
TOP_NEURONS = 5
STRIP_FEATURES = 64  # embedding features drawn in the heat strip


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"#{token_id}"
    return tokenizer.decode([token_id])


def _round(values, digits: int = 5):
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    return round(float(values), digits)


def check_layer_head(lm, layer: int | None, head: int | None) -> tuple[int, int]:
    """The layer and head to show first (default: the last layer, head 0), or a one-line error."""
    config = transformer_of(lm).config
    layer = config.n_layers - 1 if layer is None else layer
    head = 0 if head is None else head
    if not 0 <= layer < config.n_layers:
        raise ScribeError(f"layer {layer} is out of range: the model has {config.n_layers} layers (0-{config.n_layers - 1})")
    if not 0 <= head < config.n_heads:
        raise ScribeError(f"head {head} is out of range: the model has {config.n_heads} heads per layer (0-{config.n_heads - 1})")
    return layer, head


@torch.no_grad()
def explain_data(lm, text_or_ids, *, layer: int | None = None, head: int | None = None, sae=None) -> dict:
    """Everything the explain page shows, as plain numbers and strings (`sae`: a directory
    written by `scribe explain sae`, whose features the page then shows too)."""
    model = transformer_of(lm)
    config = model.config
    layer, head = check_layer_head(lm, layer, head)
    ids = as_ids(lm, text_or_ids)[:1]
    tokenizer = getattr(lm, "tokenizer", None)
    T, L = ids.shape[1], config.n_layers
    streams = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
    wanted = set(streams) | {"hook_embed"}
    wanted |= {f"blocks.{i}.attn.hook_pattern" for i in range(L)} | {f"blocks.{i}.mlp.hook_post" for i in range(L)}
    logits, cache = run_with_cache(lm, ids, names=lambda name: name in wanted)
    token_ids = ids[0].tolist()

    embeddings = cache["hook_embed"][0].float()  # (T, C): the token embeddings alone
    centred = embeddings - embeddings.mean(0, keepdim=True)
    if T >= 2:
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        pca = centred @ v[:2].T  # (T, 2)
        if pca.shape[1] < 2:
            pca = torch.cat([pca, torch.zeros(T, 2 - pca.shape[1], device=pca.device)], dim=1)
    else:
        pca = torch.zeros(T, 2)

    lens_probs = torch.stack([unembed(model, cache[name][0]) for name in streams]).float().softmax(-1)  # (L+1, T, V)
    predicted = int(logits[0, -1].argmax())
    lens_top = lens_probs.max(-1)

    neurons = []
    for i in range(L):
        if f"blocks.{i}.mlp.hook_post" not in cache:  # a feed-forward without one hidden layer (mixture of experts)
            neurons.append([[] for _ in range(T)])
            continue
        post = cache[f"blocks.{i}.mlp.hook_post"][0].float()  # (T, d_mlp)
        top = post.topk(min(TOP_NEURONS, post.shape[-1]), dim=-1)
        neurons.append([[{"neuron": int(n), "value": round(float(a), 4)} for n, a in zip(idx, val)]
                        for idx, val in zip(top.indices, top.values)])

    last = logits[0, -1].float()  # (V,)
    candidates = last.topk(min(TOP_CANDIDATES, last.shape[-1])).indices
    slider = [(last / t).softmax(-1)[candidates].tolist() for t in SLIDER_TEMPERATURES]

    attribution = None
    if model.final_norm is not None:
        a = direct_logit_attribution(lm, ids, predicted)
        attribution = {"token": predicted, "heads": _round(a.heads.tolist(), 4), "mlps": _round(a.mlps.tolist(), 4),
                       "embeddings": round(a.embeddings, 4), "logit": round(a.logit, 4)}

    data = {
        "model": config.name,
        "config": {"n_layers": L, "n_heads": config.n_heads, "d_model": config.d_model, "d_mlp": config.d_mlp,
                   "vocab_size": config.vocab_size, "context_length": config.context_length},
        "tokens": [{"id": t, "text": _token_text(tokenizer, t)} for t in token_ids],
        "embedding_strip": _round(embeddings[:, :STRIP_FEATURES].tolist(), 4),
        "embedding_pca": _round(pca.tolist(), 4),
        "attention": _round([cache[f"blocks.{i}.attn.hook_pattern"][0].float().tolist() for i in range(L)], 4),
        "selected": {"layer": layer, "head": head},
        "residual_norms": {
            "layers": layer_labels(L),
            "per_position": _round([cache[name][0].float().norm(dim=-1).tolist() for name in streams], 4),
        },
        "logit_lens": {
            "layers": layer_labels(L),
            "top_ids": lens_top.indices.tolist(),
            "top_tokens": [[_token_text(tokenizer, int(t)) for t in row] for row in lens_top.indices],
            "top_probs": _round(lens_top.values.tolist(), 4),
            "target": predicted,
            "target_token": _token_text(tokenizer, predicted),
            "target_probs": _round(lens_probs[..., predicted].tolist(), 4),
        },
        "mlp_neurons": neurons,
        "next_token": {
            "candidates": [{"id": int(c), "token": _token_text(tokenizer, int(c)), "logit": round(float(last[c]), 4)}
                           for c in candidates],
            "temperatures": SLIDER_TEMPERATURES,
            "probs": _round(slider, 5),
        },
        "attribution": attribution,
    }
    if sae is not None:
        from scribelm.inspect.sae_explain import sae_features_data

        data["sae"] = sae_features_data(lm, ids, sae)
    return data
