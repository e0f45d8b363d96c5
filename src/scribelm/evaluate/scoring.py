"""The three questions every evaluation task asks a language model.

    loglikelihood(lm, [(context, continuation), ...]) -> [(logprob, is_greedy), ...]
        How likely is this continuation after this context, and is it what greedy
        decoding would write? (multiple choice, cloze, "which ending is real")
    rolling_loglikelihood(lm, texts) -> [RollingScore, ...]
        How likely is this whole document? (perplexity, bits per byte)
    generate_until(lm, [(context, {"until": [...], "max_gen_toks": n}), ...]) -> [str, ...]
        What does the model write? (exact match, F1)

Tokenization follows lm-evaluation-harness, so the same task gives the same
numbers: context and continuation are encoded together and split where the
context's own tokens end (spaces at the end of the context move to the
continuation first), and an empty context is the BOS token (else EOS).

A continuation's log-probability is the sum over its tokens t of
log p(t | everything before t). One forward pass over context + continuation
gives them all, reading the logits at the continuation's positions:

    ids       c0 c1 c2 | x0 x1 x2          (context | continuation)
    input     c0 c1 c2   x0 x1             (the last token predicts nothing)
    predicts     c1 c2   x0 x1 x2  ← scored

Shared prefixes: the choices of a multiple-choice question share one context.
Then the context runs once into a `KVCache`, its keys/values are copied to
one cache row per choice, and only the choices' tokens run, each row from
its own length. For a long question with short answers this is most of the
work saved; `share_prefix=None` picks it when a context has several
continuations at least as long as the longest of them.

Only the positions that are scored are unembedded: (N, C) @ (C, V) instead of
(B, T, V) logits, which for large vocabularies is most of the memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from scribelm.cache import KVCache
from scribelm.errors import ScribeError

Progress = Callable[[int], None]  # called with the number of requests just finished


@dataclass
class ScoringModel:
    """What scoring needs of an `LM`, for a model that should stay as it is (one in training:
    an `LM` would swap in inference layers)."""

    model: Any
    tokenizer: Any
    generation_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RollingScore:
    """A document's summed log-likelihood (natural log) and its sizes, for the
    per-token, per-word and per-byte averages."""

    loglikelihood: float
    tokens: int
    words: int
    bytes: int


# ----------------------------------------------------------------------------- tokens


def encode(lm, text: str) -> list[int]:
    """Text as ids the way the model's own tokenizer would by default: with BOS in front
    when the checkpoint says its tokenizer adds one (a Llama tokenizer does; GPT-2's does not)."""
    if lm.tokenizer is None:
        raise ScribeError("this model has no tokenizer, so it cannot read evaluation text")
    ids = lm.tokenizer.encode(text)
    if (lm.generation_config or {}).get("add_bos_token") and lm.tokenizer.bos_id is not None:
        ids = [lm.tokenizer.bos_id] + ids
    return ids


def prefix_token_id(lm) -> int:
    """What an empty context conditions on: BOS, else EOS."""
    tok = lm.tokenizer
    token = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if token is None:
        raise ScribeError("an empty context needs a BOS or EOS token to condition on, and this tokenizer has neither")
    return token


def encode_pair(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split from the encoding of the whole text."""
    if not context:
        return [prefix_token_id(lm)], encode(lm, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:  # "Answer: " + "Paris" is tokenized as "Answer:" + " Paris", as the model saw text
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(lm, context + continuation)
    context_ids = encode(lm, context)
    return context_ids, whole[len(context_ids):]


# ----------------------------------------------------------------------------- scoring tokens


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _score(model, hidden: torch.Tensor, targets: list[list[int]]) -> list[tuple[float, bool]]:
    """hidden (N, C): the positions that predict the concatenated `targets`, in order."""
    logprobs = F.log_softmax(model.unembedding(hidden).float(), dim=-1)  # (N, V)
    flat = torch.tensor([t for ts in targets for t in ts], device=logprobs.device)
    picked = logprobs.gather(1, flat[:, None])[:, 0]  # (N,)
    greedy = logprobs.argmax(-1) == flat  # (N,)
    out, start = [], 0
    for ts in targets:
        end = start + len(ts)
        out.append((float(picked[start:end].sum()), bool(greedy[start:end].all())))
        start = end
    return out


def _score_whole(model, pairs: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[float, bool]]:
    """One right-padded forward pass over each context + continuation (left-truncated to the
    model's context, as lm-eval does)."""
    inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in pairs]
    T = max(len(i) for i in inputs)
    device = next(model.parameters()).device
    ids = torch.zeros(len(inputs), T, dtype=torch.long, device=device)  # (B, T); the pad id is never read
    for b, row in enumerate(inputs):
        ids[b, :len(row)] = torch.tensor(row)
    hidden = model.hidden_states(ids)  # (B, T, C): causal, so right padding changes no real position
    rows = [b for b, (_, cont) in enumerate(pairs) for _ in cont]
    cols = [len(inputs[b]) - len(cont) + j for b, (_, cont) in enumerate(pairs) for j in range(len(cont))]
    return _score(model, hidden[rows, cols], [cont for _, cont in pairs])


def _score_shared(model, groups: list[tuple[list[int], list[list[int]]]]) -> list[tuple[float, bool]]:
    """Each (context, [continuation, ...]) group: the context runs once, its keys and values
    are copied to one cache row per continuation, then all continuations run together."""
    device = next(model.parameters()).device
    G = len(groups)
    context_lengths = [len(ctx) for ctx, _ in groups]
    Tc = max(context_lengths)
    longest_cont = max(len(c) for _, conts in groups for c in conts)
    contexts = torch.zeros(G, Tc, dtype=torch.long, device=device)  # (G, Tc), right-padded
    for g, (ctx, _) in enumerate(groups):
        contexts[g, :len(ctx)] = torch.tensor(ctx)
    small = KVCache(model.config, G, Tc + longest_cont, device=device, dtype=_model_dtype(model))
    context_hidden = model.hidden_states(contexts, cache=small)  # (G, Tc, C)
    last = context_hidden[torch.arange(G, device=device), torch.tensor(context_lengths, device=device) - 1]  # (G, C)

    owner = [g for g, (_, conts) in enumerate(groups) for _ in conts]  # cache row -> its group
    conts = [c for _, cs in groups for c in cs]
    R = len(conts)
    first = last[owner]  # (R, C): predicts each continuation's first token
    Tk = max(len(c) for c in conts) - 1
    if Tk == 0:  # one-token continuations: the context's last position is all there is
        return _score(model, first, conts)
    index = torch.tensor(owner, device=device)
    cache = KVCache.over(small.keys.index_select(1, index), small.values.index_select(1, index))  # (L, R, ...)
    for r, g in enumerate(owner):
        cache.set_length(r, context_lengths[g])  # the padding after a context is overwritten or masked
    rest = torch.zeros(R, Tk, dtype=torch.long, device=device)  # (R, Tk): each continuation but its last token
    for r, c in enumerate(conts):
        rest[r, :len(c) - 1] = torch.tensor(c[:-1])
    rest_hidden = model.hidden_states(rest, cache=cache)  # (R, Tk, C), each row from its own length
    positions = [first[r:r + 1] if j == 0 else rest_hidden[r, j - 1:j] for r, c in enumerate(conts) for j in range(len(c))]
    return _score(model, torch.cat(positions), conts)


def _length_sorted(n: int, key: Callable[[int], int]) -> list[int]:
    return sorted(range(n), key=lambda i: -key(i))  # longest first: similar lengths share a batch


@torch.inference_mode()
def loglikelihood_tokens(
    lm,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    share_prefix: bool | None = None,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """`loglikelihood` on ids: [(context ids, continuation ids), ...] -> [(logprob, is_greedy), ...]."""
    model = lm.model
    model.eval()
    max_length = model.config.context_length
    pairs = [(list(c), list(x)) for c, x in pairs]
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ScribeError("every scored pair needs a non-empty context and continuation (in tokens)")
        if len(cont) > max_length:
            raise ScribeError(f"a continuation of {len(cont)} tokens exceeds the model's context of {max_length}")
    results: list[tuple[float, bool] | None] = [None] * len(pairs)

    # Group the continuations of one context; groups that fit and gain go the shared way.
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    shared, whole = [], []
    for ctx, members in groups.items():
        longest = max(len(pairs[i][1]) for i in members)
        fits = len(ctx) + longest - 1 <= max_length
        gains = len(members) > 1 and len(ctx) >= longest
        (shared if fits and (share_prefix or (share_prefix is None and gains)) else whole).append(members)

    # Shared: batches of whole groups, about `batch_size` continuations each.
    shared.sort(key=lambda m: -len(pairs[m[0]][0]))
    batch: list[list[int]] = []
    for k, members in enumerate(shared):
        batch.append(members)
        if sum(len(m) for m in batch) >= batch_size or k == len(shared) - 1:
            scores = _score_shared(model, [(pairs[m[0]][0], [pairs[i][1] for i in m]) for m in batch])
            flat = [i for m in batch for i in m]
            for i, s in zip(flat, scores):
                results[i] = s
            if progress:
                progress(len(flat))
            batch = []

    # Whole: one sequence per pair, longest first.
    singles = [i for m in whole for i in m]
    order = sorted(singles, key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, s in zip(chunk, _score_whole(model, [pairs[i] for i in chunk], max_length)):
            results[i] = s
        if progress:
            progress(len(chunk))
    return results  # type: ignore[return-value]


def loglikelihood(
    lm,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    share_prefix: bool | None = None,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """[(context, continuation), ...] -> [(summed log-probability of the continuation, whether
    greedy decoding would produce it), ...]. Contexts longer than the model's context keep
    their most recent tokens."""
    pairs = [encode_pair(lm, ctx, cont) for ctx, cont in requests]
    for (ctx, cont), (_, cont_ids) in zip(requests, pairs):
        if not cont_ids:
            raise ScribeError(f"the continuation {cont!r} after {ctx[-40:]!r} is empty in tokens; nothing to score")
    return loglikelihood_tokens(lm, pairs, batch_size=batch_size, share_prefix=share_prefix, progress=progress)


# ----------------------------------------------------------------------------- rolling


def rolling_windows(ids: Sequence[int], prefix: int, max_length: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Cut a document into (context, predicted) windows that predict every token once.

    The first window predicts the first `max_length` tokens after `prefix`; each later one
    predicts the next `stride` tokens (default `max_length`: windows side by side) with as
    much of the text before them as fits as context. With the default this is lm-eval's
    `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ScribeError(f"the stride must be between 1 and the model's context ({max_length}), got {stride}")
    ids = list(ids)
    if not ids:
        return []
    first = min(max_length, len(ids))
    windows = [([prefix], ids[:first])]  # as (context, continuation) pairs: the inputs are context + all but the last
    done = first
    while done < len(ids):
        n = min(len(ids) - done, stride)
        end = done + n
        inputs = ids[max(0, end - max_length - 1):end - 1]  # max_length inputs ending just before `end`
        windows.append((inputs[:len(inputs) - (n - 1)], ids[end - n:end]))
        done = end
    return windows


def rolling_loglikelihood(
    lm,
    texts: Sequence[str],
    *,
    stride: int | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[RollingScore]:
    """Each whole document's log-likelihood, in windows of the model's context (see
    `rolling_windows`); with the sizes for perplexity per token, word and byte."""
    import re

    prefix = prefix_token_id(lm)
    max_length = lm.model.config.context_length
    windows, owners, token_counts = [], [], []
    for d, text in enumerate(texts):
        ids = encode(lm, text)
        token_counts.append(len(ids))
        for w in rolling_windows(ids, prefix, max_length, stride):
            windows.append(w)
            owners.append(d)
    totals = [0.0] * len(texts)
    scores = loglikelihood_tokens(lm, windows, batch_size=batch_size, share_prefix=False, progress=None)
    for d, (ll, _) in zip(owners, scores):
        totals[d] += ll
    if progress:
        progress(len(texts))
    return [
        RollingScore(totals[d], token_counts[d], len(re.split(r"\s+", text)), len(text.encode("utf-8")))
        for d, text in enumerate(texts)
    ]


# ----------------------------------------------------------------------------- generation


def _generation_settings(kwargs: Mapping[str, Any], default_max: int) -> dict[str, Any]:
    """lm-eval's generation_kwargs as scribelm settings (greedy unless it asks to sample)."""
    known = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ScribeError(f"unknown generation_kwargs: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    until = kwargs.get("until", [])
    until = [until] if isinstance(until, str) else list(until or [])
    sample = bool(kwargs.get("do_sample", False))
    settings = {
        "stop": [u for u in until if u],
        "max_new_tokens": int(kwargs.get("max_gen_toks", default_max)),
        "temperature": float(kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0,
    }
    for key in ("top_p", "top_k", "seed"):
        if sample and key in kwargs:
            settings[key] = kwargs[key]
    return settings


@torch.inference_mode()
def generate_until(
    lm,
    requests: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    batch_size: int = 16,
    max_gen_toks: int = 256,
    progress: Progress | None = None,
) -> list[str]:
    """[(context, generation_kwargs), ...] -> the text each continues with, cut before the
    first `until` string (EOS always stops). Runs through `scribelm.generate`, batched by
    identical settings; contexts keep their most recent tokens when the prompt and the
    tokens to generate exceed the model's context."""
    from scribelm.generate import generate

    max_length = lm.model.config.context_length
    out: list[str | None] = [None] * len(requests)
    by_settings: dict[str, list[int]] = {}
    settings_of: dict[str, dict[str, Any]] = {}
    for i, (_, kwargs) in enumerate(requests):
        s = _generation_settings(kwargs or {}, max_gen_toks)
        key = repr(sorted(s.items()))
        by_settings.setdefault(key, []).append(i)
        settings_of[key] = s
    for key, members in by_settings.items():
        s = settings_of[key]
        keep = max(1, max_length - s["max_new_tokens"])
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            prompts = [(encode(lm, requests[i][0]) if requests[i][0] else [prefix_token_id(lm)])[-keep:] for i in chunk]
            texts = generate(lm, prompts, **s)
            for i, text in zip(chunk, texts):
                out[i] = text
            if progress:
                progress(len(chunk))
    return out  # type: ignore[return-value]
