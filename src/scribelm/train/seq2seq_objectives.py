"""Objectives of encoder-decoders (T5): span corruption, and supervised input -> target pairs.

Span corruption (T5 pretraining) drops ~15% of a text's tokens in spans of ~3 and asks
the decoder to write them back, each span introduced by the sentinel that replaced it:

    text     Thank you for inviting me to your party last week .
    input    Thank you <S0> me to your party <S1> week .            (to the encoder)
    target   <S0> for inviting <S1> last <S2>                       (the decoder's output)

Noise and non-noise stretches are cut into the same number of spans at random points and
interleaved, so every span has a random length with the wanted mean; with the window
length fixed, every row's input and target have the same lengths (no padding).

Supervised pairs come from JSONL lines {"input": ..., "target": ...} (translation,
summarisation): the input goes to the encoder, the target (with EOS) is what the decoder
learns to write. Both objectives plug into the shared Trainer like `NextTokenObjective`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from scribelm.data.sources import DataError
from scribelm.errors import ConfigError
from scribelm.seq2seq import shift_right
from scribelm.train.objectives import IGNORE_INDEX

SENTINEL_FORMATS = ("<extra_id_{}>", "<|sentinel_{}|>")  # T5's names, and the ones scribelm adds


def _random_segmentation(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """n items cut into `parts` non-empty runs at random points: the runs' lengths."""
    cuts = (torch.randperm(n - 1, generator=generator)[: parts - 1] + 1).sort().values.tolist()
    bounds = [0] + cuts + [n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def span_corrupt(ids: Sequence[int], sentinel_ids: Sequence[int], *, noise_density: float = 0.15,
                 mean_span: float = 3.0, generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """(encoder input, decoder target) of one token sequence; see the module docstring."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    length = len(ids)
    if length < 2:
        raise DataError("span corruption needs at least 2 tokens per sequence")
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(1, min(round(n_noise / mean_span), n_noise, length - n_noise))
    if n_spans + 1 > len(sentinel_ids):
        raise ConfigError(f"{n_spans} noise spans need {n_spans + 1} sentinel tokens, the tokenizer has {len(sentinel_ids)}")
    noise = _random_segmentation(n_noise, n_spans, generator)
    keep = _random_segmentation(length - n_noise, n_spans, generator)
    inputs: list[int] = []
    targets: list[int] = []
    at = 0
    for span, (kept, dropped) in enumerate(zip(keep, noise)):
        inputs += list(ids[at:at + kept]) + [sentinel_ids[span]]
        at += kept
        targets += [sentinel_ids[span]] + list(ids[at:at + dropped])
        at += dropped
    return inputs, targets + [sentinel_ids[n_spans]]  # a last sentinel closes the target


def find_sentinel_ids(tokenizer) -> list[int]:
    """The tokenizer's sentinel ids in order (<extra_id_0>, <extra_id_1>, ...), or []."""
    for pattern in SENTINEL_FORMATS:
        ids = []
        while (token_id := tokenizer.token_to_id(pattern.format(len(ids)))) is not None:
            ids.append(token_id)
        if ids:
            return ids
    return []


def _seq2seq_loss(model, ids, targets, attention_mask, training: bool) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(ids, shift_right(targets, 0), attention_mask=attention_mask)  # (B, T, V)
    flat_logits, flat_targets = logits.float().flatten(0, 1), targets.reshape(-1)
    if training:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX), {}
    nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    counted = int((flat_targets != IGNORE_INDEX).sum())
    return nll / max(counted, 1), {"nll_sum": float(nll), "tokens": float(counted)}


class SpanCorruptionObjective:
    """T5's pretraining objective over the loader's windows (`ids` (B, T))."""

    def __init__(self, sentinel_ids: Sequence[int], *, noise_density: float = 0.15, mean_span: float = 3.0,
                 seed: int = 0) -> None:
        self.sentinel_ids, self.noise_density, self.mean_span = list(sentinel_ids), noise_density, mean_span
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rows = batch["ids"].tolist()
        # evaluation corrupts each batch the same way every time, so validation losses compare
        generator = self.generator if model.training else torch.Generator().manual_seed(sum(map(sum, rows)) % (1 << 62))
        pairs = [span_corrupt(r, self.sentinel_ids, noise_density=self.noise_density, mean_span=self.mean_span,
                              generator=generator) for r in rows]
        device = batch["ids"].device
        inputs = torch.tensor([p[0] for p in pairs], device=device)  # (B, S): equal lengths for equal windows
        targets = torch.tensor([p[1] for p in pairs], device=device)  # (B, T')
        return _seq2seq_loss(model, inputs, targets, None, model.training)


class Seq2SeqObjective:
    """Cross-entropy of the target given the input; batches from `seq2seq_batches`."""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return _seq2seq_loss(model, batch["ids"], batch["targets"], batch.get("attention_mask"), model.training)


def read_seq2seq_pairs(path: str | os.PathLike, tokenizer, *, max_input: int = 512,
                       max_target: int = 512) -> list[tuple[list[int], list[int]]]:
    """Token ids of each {"input", "target"} line of a JSONL file (EOS after each side when the
    tokenizer has one), truncated to the given lengths; a bad line is refused naming it."""
    path = Path(path)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        for key in ("input", "target"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise DataError(f"{path}:{number}: a seq2seq line needs string fields \"input\" and \"target\"; "
                                f"'{key}' is missing or not text")
        source = tokenizer.encode(record["input"])[: max_input - len(eos)] + eos
        target = tokenizer.encode(record["target"])[: max_target - len(eos)] + eos
        pairs.append((source, target))
    if not pairs:
        raise DataError(f"{path} holds no input/target pairs")
    return pairs


def seq2seq_batches(pairs: Sequence[tuple[list[int], list[int]]], batch_size: int, *, pad_id: int = 0,
                    shuffle: bool = True, seed: int = 0, loop: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches: ids and attention_mask (B, S) for the encoder, targets (B, T) with -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist() if shuffle else list(range(len(pairs)))
        for start in range(0, len(order), batch_size):
            chosen = [pairs[i] for i in order[start:start + batch_size]]
            S, T = max(len(s) for s, _ in chosen), max(len(t) for _, t in chosen)
            ids = torch.full((len(chosen), S), pad_id, dtype=torch.long)
            mask = torch.zeros(len(chosen), S, dtype=torch.long)
            targets = torch.full((len(chosen), T), IGNORE_INDEX, dtype=torch.long)
            for r, (source, target) in enumerate(chosen):
                ids[r, : len(source)], mask[r, : len(source)] = torch.tensor(source), 1
                targets[r, : len(target)] = torch.tensor(target)
            yield {"ids": ids, "attention_mask": mask, "targets": targets}
        if not loop:
            return
