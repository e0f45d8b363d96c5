"""Log-probabilities of a prompt's own tokens: what makes the server an evaluation backend.

OpenAI's legacy completions API, asked for `echo: true` with `logprobs: k`,
returns a log-probability for every token of the prompt as well as for the
generated ones (the first prompt token has none: nothing predicts it, so it
is `null`). Evaluation harnesses (lm-eval's `local-completions`) score a
multiple-choice answer exactly that way: they send context + continuation
with `max_tokens: 0` (or 1) and sum the continuation's log-probabilities.

The prompt is prefilled as usual, but every position's hidden state is kept:

    for each chunk of CHUNK positions (keys/values cached, as a chunked prefill):
        hidden (k, t, C) = model.hidden_states(chunk, cache=rows)
        position t of row j predicts token t+1:
            log_softmax(unembedding(hidden[j, t]))[prompt[t+1]]      so neither (P, P) attention
                                                                     scores nor (P, V) logits exist
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

CHUNK = 256  # positions run and unembedded at once: bounds attention scores and logits of a long prompt


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
    [(logprobs, top) per prompt]); `top` lists the top_n alternatives per token (None when top_n is 0).

    The prompts go through the cache CHUNK positions at a time, each chunk scored as it comes,
    so neither the attention scores nor the logits ever span the whole prompt."""
    device = cache.keys.device
    lengths = [len(p) for p in prompts]
    if min(lengths) != max(lengths) and not cache.accepts_padding:  # a rolling cache: one row at a time
        parts = [prefill_scored(model, cache, first + j, [p], top_n) for j, p in enumerate(prompts)]
        return torch.cat([logits for logits, _ in parts]), [scores[0] for _, scores in parts]
    P = max(lengths)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)  # (k, P)
    for j, p in enumerate(prompts):
        ids[j, : lengths[j]] = torch.tensor(list(p), dtype=torch.long)
    ids = ids.to(device)
    padding = None
    if min(lengths) != P:
        padding = (torch.arange(P)[None, :] < torch.tensor(lengths)[:, None]).to(device)  # (k, P)
    rows = cache.rows(first, len(prompts))
    scores = [([None], [None] if top_n > 0 else None) for _ in prompts]  # nothing predicts a first token
    final = None  # (k, C): each row's hidden state at its last token
    for start in range(0, P, CHUNK):
        end = min(start + CHUNK, P)
        mask = None if padding is None else padding[:, :end]  # (k, S) cached and new positions
        hidden = model.hidden_states(ids[:, start:end], cache=rows, attention_mask=mask)  # (k, t, C)
        if final is None:
            final = hidden.new_zeros(hidden.shape[0], hidden.shape[2])
        for j, n in enumerate(lengths):
            if start <= n - 1 < end:
                final[j] = hidden[j, n - 1 - start]
            stop = min(end, n - 1)  # position t predicts token t+1; the last token predicts nothing here
            if stop <= start:
                continue
            lp = model.unembedding(hidden[j, : stop - start]).float().log_softmax(-1)  # (t, V)
            logprobs, top = scores[j]
            logprobs.extend(lp.gather(-1, ids[j, start + 1 : stop + 1, None]).squeeze(-1).tolist())
            if top is not None:
                best = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
                top.extend(list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist()))
    for j, n in enumerate(lengths):
        cache.set_length(first + j, n)
    return model.unembedding(final), scores  # (k, V)
