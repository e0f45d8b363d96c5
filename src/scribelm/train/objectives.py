"""Objectives: what the Trainer minimizes, as a plug-in.

An objective is any callable `objective(model, batch) -> (loss, metrics)`:
`loss` is a scalar tensor to differentiate, `metrics` a dict of floats to
log. The Trainer owns everything else (optimizer, schedule, accumulation,
precision, checkpoints, processes), so pretraining, supervised fine-tuning
and preference objectives share one loop.

Batches are dicts of tensors: `ids` (B, T), `targets` (B, T) holding the id
that should follow each position (-100 where nothing should be learned:
prompts, padding), and optionally `attention_mask` and `positions`.

During evaluation (model in eval mode) an objective may add three sums to
its metrics — `nll_sum` (nats over all counted targets), `tokens` and
`bytes` (the UTF-8 bytes those targets stand for) — and the Trainer then
reports validation loss per token and **bits per byte**:

    bpb = nll_sum / (ln 2 · bytes)

Bits per byte does not depend on the tokenizer: a model with a larger
vocabulary predicts fewer, longer tokens, and dividing by bytes instead of
tokens makes the two comparable (uniform guessing over 256 byte values
scores 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scribelm.moe import balance_loss_and_metrics

IGNORE_INDEX = -100


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(V,) how many bytes of text each token id stands for. Special tokens
    (EOS between documents) count as one byte, the separator they replace, so
    their loss is counted rather than dropped."""
    special = tokenizer.special_ids
    lengths = [1 if i in special else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.int64)


class NextTokenObjective:
    """Cross-entropy of the next token: pretraining and supervised fine-tuning."""

    def __init__(self, token_bytes: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        self.token_bytes = token_bytes
        self.ignore_index = ignore_index

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(
            batch["ids"], attention_mask=batch.get("attention_mask"), positions=batch.get("positions")
        )  # (B, T, V)
        targets = batch["targets"]  # (B, T)
        flat_logits = logits.float().view(-1, logits.size(-1))  # (B·T, V)
        flat_targets = targets.reshape(-1)  # (B·T,)
        if model.training:
            loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=self.ignore_index)
            # a mixture of experts adds its load-balancing loss, weighted by router_aux_loss_coef
            balance, metrics = balance_loss_and_metrics(model, batch.get("attention_mask"))
            return (loss if balance is None else loss + balance), metrics
        nll = F.cross_entropy(flat_logits, flat_targets, ignore_index=self.ignore_index, reduction="none")  # (B·T,)
        counted = flat_targets != self.ignore_index
        n_tokens = int(counted.sum())
        nll_sum = nll[counted].sum()
        metrics = {"nll_sum": float(nll_sum), "tokens": float(n_tokens)}
        if self.token_bytes is not None:
            table = self.token_bytes.to(flat_targets.device)
            metrics["bytes"] = float(table[flat_targets[counted]].sum())
        return nll_sum / max(n_tokens, 1), metrics
