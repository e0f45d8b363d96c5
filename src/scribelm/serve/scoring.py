"""Log-probabilities of a prompt's own tokens: what makes the server an evaluation backend.

OpenAI's legacy completions API, asked for `echo: true` with `logprobs: k`,
returns a log-probability for every token of the prompt as well as for the
generated ones (the first prompt token has none: nothing predicts it, so it
is `null`). Evaluation harnesses (lm-eval's `local-completions`) score a
multiple-choice answer exactly that way: they send context + continuation
with `max_tokens: 0` (or 1) and sum the continuation's log-probabilities.

The prompt is prefilled as usual, but every position's hidden state is kept:

    hidden (k, P, C) = model.hidden_states(prompts, cache=rows)     one pass, keys/values cached
    position t of row j predicts token t+1:
        log_softmax(unembedding(hidden[j, t]))[prompt[t+1]]          in chunks of CHUNK positions,
                                                                     so (P, V) is never whole in memory
    the last real position's logits start generation, as `decode.prefill`'s do

These are the model's raw log-probabilities (no temperature or penalties), as
for generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scribelm.cache import KVCache

__all__ = ["PromptLogprobsEvent", "prefill_scored"]

CHUNK = 256  # positions unembedded at once: bounds the (CHUNK, V) logits of a long prompt


@dataclass
class PromptLogprobsEvent:
    """The prompt's tokens and their log-probabilities, for one choice; comes before its first token."""

    index: int
    token_ids: list[int]
    logprobs: list[float | None]  # logprobs[0] is None: nothing predicts the first token
    top_logprobs: list[list[tuple[int, float]] | None] | None  # per token (id, logprob) best first; [0] is None


def prefill_scored(
    model, cache: KVCache, first: int, prompts: Sequence[Sequence[int]], top_n: int,
) -> tuple[torch.Tensor, list[tuple[list[float | None], list[list[tuple[int, float]] | None] | None]]]:
    """`decode.prefill` that also scores each prompt's tokens: (logits of each last token (k, V),
    [(logprobs, top) per prompt]); `top` lists the top_n alternatives per token (None when top_n is 0)."""
    device = cache.keys.device
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)  # (k, P)
    for j, p in enumerate(prompts):
        ids[j, : lengths[j]] = torch.tensor(list(p), dtype=torch.long)
    padding = None
    if min(lengths) != P:
        padding = (torch.arange(P)[None, :] < torch.tensor(lengths)[:, None]).to(device)  # (k, P)
    hidden = model.hidden_states(ids.to(device), cache=cache.rows(first, len(prompts)), attention_mask=padding)  # (k, P, C)
    for j, n in enumerate(lengths):
        cache.set_length(first + j, n)
    rows = torch.arange(len(prompts), device=device)
    last_logits = model.unembedding(hidden[rows, torch.tensor(lengths, device=device) - 1])  # (k, V)

    scores = []
    for j, n in enumerate(lengths):
        logprobs: list[float | None] = [None]
        top: list[list[tuple[int, float]] | None] | None = [None] if top_n > 0 else None
        targets = ids[j, 1:n].to(device)  # (n-1,): position t predicts token t+1
        for start in range(0, n - 1, CHUNK):
            end = min(start + CHUNK, n - 1)
            lp = model.unembedding(hidden[j, start:end]).float().log_softmax(-1)  # (chunk, V)
            logprobs.extend(lp.gather(-1, targets[start:end, None]).squeeze(-1).tolist())
            if top is not None:
                best = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
                top.extend(list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist()))
        scores.append((logprobs, top))
    return last_logits, scores
