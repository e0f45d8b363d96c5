"""The next-token distribution, and what temperature, top-k and top-p do to it.

The model's last position gives logits z over the vocabulary; sampling draws from

    p_i = exp(z_i / T) / Σ_j exp(z_j / T)

Low temperature T sharpens it toward the argmax, high T flattens it. Top-k keeps
the k most likely tokens, top-p the fewest whose probability reaches p; both
renormalise what they keep. `next_token_view` shows all of it on the real
distribution, computed by the same functions the sampler uses (scribelm.sampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scribelm.errors import ScribeError
from scribelm.inspect.hooks import _transformer, as_ids
from scribelm.sampling import apply_temperature, apply_top_k, apply_top_p

TEMPERATURES = (0.2, 0.7, 1.0, 1.5)


def _kept(logits: torch.Tensor) -> list[dict]:
    """The tokens a filtered (V,) logits row keeps, most likely first, with renormalised probabilities."""
    probs = logits.float().softmax(-1)
    kept = torch.isfinite(logits).nonzero().flatten()
    order = probs[kept].argsort(descending=True)
    return [{"id": int(kept[i]), "prob": float(probs[kept[i]])} for i in order]


@torch.no_grad()
def next_token_view(lm, text_or_ids, *, temperatures: Sequence[float] = TEMPERATURES, top: int = 10,
                    top_k: int = 5, top_p: float = 0.9) -> dict:
    """The last position's distribution: raw logits of the `top` candidates (by logit), their
    probability at each temperature, and at each temperature what top-k and top-p keep."""
    if any(t <= 0 for t in temperatures):
        raise ScribeError("temperatures must be above 0 (0 is greedy: the first candidate)")
    if top_k < 1 or not 0 < top_p <= 1:
        raise ScribeError("top_k must be at least 1 and top_p in (0, 1]")
    model = _transformer(lm)
    ids = as_ids(lm, text_or_ids)[:1]
    logits = model(ids, last_only=True)[0, -1].float()  # (V,)
    tokenizer = getattr(lm, "tokenizer", None)
    candidates = logits.topk(min(top, logits.shape[-1])).indices
    rows = []
    for t in temperatures:
        scaled = apply_temperature(logits[None], torch.tensor([float(t)]))  # (1, V)
        probs = scaled.softmax(-1)[0]
        rows.append({
            "temperature": float(t),
            "probs": [float(probs[i]) for i in candidates],
            "top_k": _kept(apply_top_k(scaled, torch.tensor([top_k]))[0]),
            "top_p": _kept(apply_top_p(scaled, torch.tensor([float(top_p)]))[0]),
        })
    return {
        "candidates": [
            {"id": int(i), "token": tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i)),
             "logit": float(logits[i])}
            for i in candidates
        ],
        "temperatures": rows,
        "top_k": top_k,
        "top_p": top_p,
    }
