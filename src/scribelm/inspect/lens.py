"""The logit lens and direct logit attribution: reading the residual stream as predictions.

Logit lens. Every block adds to one residual stream, and only the last one is
unembedded. Sending the stream as it stands after each block through the final
norm and the unembedding shows what the model "would say" at that depth; the
last layer's reading is the model's own logits.

    layer_logits(lm, ids)            (n_layers + 1, B, T, V): after the embeddings, after each block
    logit_lens(lm, text, target=id)  per layer and position: top tokens, probability of `target`

Direct logit attribution. The final residual stream is a sum: embeddings, each
attention head's write (z_h · W_O[h]), each attention output bias, each MLP's
output. The final norm divides it by one scale per position (LayerNorm first
centres it), so with that scale held as it was, each term's share of a token's
logit is  norm(term) · W_U[:, token]; the shares plus the norm's bias add up to the logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scribelm.errors import ScribeError
from scribelm.inspect.hooks import _transformer, as_ids, run_with_cache


def _stream_names(n_layers: int) -> list[str]:
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{L}.hook_resid_post" for L in range(n_layers)]


def layer_labels(n_layers: int) -> list[str]:
    return ["embeddings"] + [f"block {L}" for L in range(n_layers)]


@torch.no_grad()
def unembed(model: nn.Module, stream: torch.Tensor) -> torch.Tensor:
    """A residual stream (..., C) through the final norm (pre-norm models) and the unembedding -> (..., V)."""
    x = model.final_norm(stream) if model.final_norm is not None else stream
    return model.unembedding(x)


@torch.no_grad()
def layer_logits(lm, text_or_ids) -> torch.Tensor:
    """The logit lens: (n_layers + 1, B, T, V), the residual stream after the embeddings and
    after each block, read through the final norm and the unembedding. The last is the model's logits."""
    model = _transformer(lm)
    names = _stream_names(len(model.blocks))
    _, cache = run_with_cache(lm, text_or_ids, names=names)
    return torch.stack([unembed(model, cache[name]) for name in names])


@dataclass
class LensReading:
    layers: list[str]  # "embeddings", "block 0", ...
    tokens: list[int]  # the input ids (first row)
    top_ids: list[list[list[int]]]  # [layer][position][rank]
    top_probs: list[list[list[float]]]
    target: int | None  # the token whose probability is followed
    target_probs: list[list[float]] | None  # [layer][position]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def logit_lens(lm, text_or_ids, *, top_k: int = 5, target: int | None = None) -> LensReading:
    """Top tokens at every layer and position of the first row, and the probability of
    `target` (default: the model's own top prediction at the last position)."""
    ids = as_ids(lm, text_or_ids)[:1]
    probs = layer_logits(lm, ids)[:, 0].float().softmax(-1)  # (L + 1, T, V)
    if target is None:
        target = int(probs[-1, -1].argmax())
    if not 0 <= target < probs.shape[-1]:
        raise ScribeError(f"token id {target} is outside the vocabulary (0-{probs.shape[-1] - 1})")
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return LensReading(
        layers=layer_labels(probs.shape[0] - 1),
        tokens=ids[0].tolist(),
        top_ids=top.indices.tolist(),
        top_probs=top.values.tolist(),
        target=target,
        target_probs=probs[..., target].tolist(),
    )


# --------------------------------------------------------------------------- direct logit attribution


@dataclass
class Attribution:
    """Each part's direct share of one logit (or logit difference) at one position."""

    heads: torch.Tensor  # (n_layers, n_heads)
    mlps: torch.Tensor  # (n_layers,)
    attention_biases: torch.Tensor  # (n_layers,): the output projection's bias (0 without one)
    embeddings: float  # token (and position) embeddings
    norm_bias: float  # the final norm's bias through the unembedding
    logit: float  # what the shares add up to: the model's logit (difference)

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}


@torch.no_grad()
def direct_logit_attribution(lm, text_or_ids, token: int, *, versus: int | None = None, position: int = -1) -> Attribution:
    """How much each head, MLP and the embeddings write directly into the logit of `token`
    (minus the logit of `versus`, if given) at `position` of the first row."""
    model = _transformer(lm)
    config = model.config
    if model.final_norm is None:
        raise ScribeError("direct logit attribution needs a pre-norm model (its final norm is what splits the stream)")
    for t in (token, versus):
        if t is not None and not 0 <= t < config.vocab_size:
            raise ScribeError(f"token id {t} is outside the vocabulary (0-{config.vocab_size - 1})")
    ids = as_ids(lm, text_or_ids)[:1]
    if not -ids.shape[1] <= position < ids.shape[1]:
        raise ScribeError(f"position {position} is outside the input's {ids.shape[1]} tokens")
    L = len(model.blocks)
    names = ["blocks.0.hook_resid_pre", f"blocks.{L - 1}.hook_resid_post"]
    names += [f"blocks.{i}.attn.hook_z" for i in range(L)] + [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    logits, cache = run_with_cache(lm, ids, names=names)

    norm = model.final_norm
    final = cache[f"blocks.{L - 1}.hook_resid_post"][0, position]  # (C,)
    centred = isinstance(norm, nn.LayerNorm)
    mean_square = final.float().var(unbiased=False) if centred else final.float().pow(2).mean()
    scale = torch.sqrt(mean_square + norm.eps)
    gain = norm.weight if norm.weight is not None else torch.ones_like(final)
    dtype = final.dtype

    def through_unembedding(x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (...): the logit (difference)
        logits = model.unembedding(x.to(dtype))  # any linear kind: plain, quantized, adapted
        return (logits[..., token] - (logits[..., versus] if versus is not None else 0)).float()

    def share(part: torch.Tensor) -> torch.Tensor:  # (..., C) -> (...)
        part = part.float()
        if centred:
            part = part - part.mean(-1, keepdim=True)
        return through_unembedding(part / scale * gain.float())

    H, hd = config.n_heads, config.head_dim
    heads = torch.zeros(L, H)
    mlps = torch.zeros(L)
    biases = torch.zeros(L)
    for i, block in enumerate(model.blocks):
        o = block.attention.o
        z = cache[f"blocks.{i}.attn.hook_z"][0, position]  # (H, hd)
        # each head alone through the output projection: row h holds head h's z, zeros elsewhere
        alone = torch.zeros(H, H, hd, dtype=z.dtype, device=z.device)
        alone[torch.arange(H), torch.arange(H)] = z
        bias = o(torch.zeros(1, H * hd, dtype=z.dtype, device=z.device))[0]  # (C,): o's bias, or zeros
        heads[i] = share(o(alone.view(H, H * hd)) - bias)  # (H,)
        biases[i] = share(bias)
        mlps[i] = share(cache[f"blocks.{i}.hook_mlp_out"][0, position])
    embeddings = share(cache["blocks.0.hook_resid_pre"][0, position])
    norm_bias = float(through_unembedding(norm.bias)) if getattr(norm, "bias", None) is not None else 0.0
    logit = logits[0, position, token] - (logits[0, position, versus] if versus is not None else 0)
    return Attribution(heads=heads, mlps=mlps, attention_biases=biases, embeddings=float(embeddings),
                       norm_bias=norm_bias, logit=float(logit))
