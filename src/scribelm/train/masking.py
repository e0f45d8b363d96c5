"""The masked-language-model objective (BERT): hide some tokens, predict them from both sides.

    ids      The  cat  sat  on  the  mat  .
    selected       ^              ^                       15% of the (non-special) tokens
    inputs   The [MASK] sat  on  big  mat  .              of those: 80% [MASK], 10% a random
    targets  -100  cat -100 -100 the -100 -100            token, 10% left as they are

The loss is the cross-entropy at the selected positions only (targets elsewhere are -100).
Replacing some selected tokens by random ones, and leaving some unchanged, keeps the model
from learning that only [MASK] positions matter: at fine-tuning and embedding time there
is no [MASK] in the input. Special tokens (BOS, EOS between documents, padding) are never
selected. Masks are drawn afresh for every batch (dynamic masking, as RoBERTa), from the
objective's own generator; evaluation masks each batch the same way every time, so
validation losses of different steps compare.

`MaskedLMObjective(model, batch)` plugs into the shared Trainer like `NextTokenObjective`,
reading the batch's `ids` (the loader's next-token `targets` are not used).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from scribelm.errors import ConfigError
from scribelm.train.objectives import IGNORE_INDEX

#: Names of the mask token in tokenizers that have one, most common first.
MASK_NAMES = ("[MASK]", "<mask>", "<|mask|>")
NEW_MASK_TOKEN = "<|mask|>"


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int] = (),
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (inputs, targets), both (B, T): BERT's 15% / 80-10-10 corruption.

    Random replacements are drawn from the non-special ids below `vocab_size`."""
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=ids.dtype, device=ids.device)
    allowed = ~torch.isin(ids, special)  # (B, T): never select a special token
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)  # (B, T)
    selected = (draw < probability) & allowed
    targets = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator, device=ids.device)  # (B, T): 80 / 10 / 10
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=ids.device)
    ordinary[special[special < vocab_size]] = False
    pool = ordinary.nonzero().squeeze(1)  # (N,) ids a random replacement may take
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator, device=ids.device)]
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, targets


def find_mask_id(tokenizer) -> int | None:
    """The tokenizer's mask token id, if it has one of the usual names."""
    for name in MASK_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


class MaskedLMObjective:
    """Cross-entropy of the hidden tokens, at the selected positions only."""

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Iterable[int] = (), *,
                 probability: float = 0.15, seed: int = 0) -> None:
        if not 0.0 < probability < 1.0:
            raise ConfigError(f"the masking probability must be in (0, 1), got {probability}")
        self.mask_id, self.vocab_size, self.probability = mask_id, vocab_size, probability
        self.special_ids = sorted(set(special_ids))
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["ids"].cpu()  # (B, T); masks drawn on the CPU generator: the same on every device
        if model.training:
            generator = self.generator
        else:  # the same masks for this batch at every evaluation
            generator = torch.Generator().manual_seed(int(ids.sum()) % (1 << 62))
        inputs, targets = mask_tokens(ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
                                      special_ids=self.special_ids, probability=self.probability, generator=generator)
        device = batch["ids"].device
        logits = model(inputs.to(device), attention_mask=batch.get("attention_mask"))  # (B, T, V)
        flat_logits, flat_targets = logits.float().view(-1, logits.size(-1)), targets.to(device).reshape(-1)
        if model.training:
            # no selected token at all (a tiny batch): a zero loss that still reaches every parameter
            if not bool((flat_targets != IGNORE_INDEX).any()):
                return logits.sum() * 0.0, {}
            return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX), {}
        nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        counted = int((flat_targets != IGNORE_INDEX).sum())
        return nll / max(counted, 1), {"nll_sum": float(nll), "tokens": float(counted)}
