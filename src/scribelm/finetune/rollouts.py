"""Rollouts: the policy writes completions, and they become a training batch.

Online RL trains on what the current policy writes. Each step: take some
prompts, sample completions with scribelm's batched generation (one KV
cache for all rows, each row sampled with its own seed), and lay every
(prompt, completion) out as one training row:

    ids      p p p p c c c c c <pad> ...        (B, T) right-padded
    targets  - - - c c c c c e  -              the token each position predicts;
                                                 -100 except on completion tokens (e: EOS, kept:
                                                 stopping is part of what is learned)

so log π(completion token) is read from the same forward pass shape as
supervised fine-tuning (`completion_token_logps`).

Prompts come from a JSONL file, one {"prompt": "..."} per line (or a plain
string per line). A chat-tuned model gets its chat template around the
prompt; a base model continues the text as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from scribelm.data.chat import IGNORE_INDEX
from scribelm.errors import ScribeError
from scribelm.finetune.rl_losses import token_logps_and_entropy


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompt texts of a JSONL file: {"prompt": "..."} objects or JSON strings, one a line."""
    path = Path(path)
    if not path.is_file():
        raise ScribeError(f"prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScribeError(f"{path}:{number}: not valid JSON ({err.msg}); write one {{\"prompt\": ...}} a line") from None
        text = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(text, str) or not text.strip():
            raise ScribeError(f"{path}:{number}: expected {{\"prompt\": \"non-empty text\"}}")
        prompts.append(text)
    if not prompts:
        raise ScribeError(f"{path} holds no prompts; write one {{\"prompt\": \"...\"}} per line")
    return prompts


def prompt_ids(lm, text: str, chat: bool) -> list[int]:
    """A prompt's ids: under the chat template (ending where the assistant's reply starts) or raw."""
    from scribelm.generate import encode_prompt

    if not chat:
        return encode_prompt(lm, text)
    return lm.tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)


@dataclass
class Rollouts:
    """A batch of sampled completions, laid out for training."""

    ids: torch.Tensor  # (B, T) prompt + completion, right-padded
    targets: torch.Tensor  # (B, T) the completion token each position predicts, else -100
    completion_texts: list[str]
    completion_lengths: torch.Tensor  # (B,) tokens, EOS included
    truncated: torch.Tensor  # (B,) True where max_new_tokens ended the completion

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX  # (B, T)


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: Sequence[Sequence[int]], settings, *, seed: int,
                    pad_id: int = 0, extra_stop_ids: Sequence[int] = ()) -> Rollouts:
    """One completion per prompt row (repeat a prompt G times for a group), sampled in one batch."""
    from dataclasses import replace

    from scribelm.generate import BatchGeneration

    was_training = model.training
    model.eval()
    try:
        generation = BatchGeneration(model, tokenizer, prompts, replace(settings, seed=seed),
                                     seed_offsets=list(range(len(prompts))), extra_stop_ids=extra_stop_ids,
                                     defer_text=True)  # only the completions are read: no text per token
        completions = generation.run()
    finally:
        model.train(was_training)
    rows = [list(p) + list(c.token_ids) for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        row = rows[b]
        ids[b, : len(row)] = torch.tensor(row)
        n = len(c.token_ids)
        if n:
            targets[b, len(p) - 1: len(p) - 1 + n] = torch.tensor(c.token_ids)
    return Rollouts(ids, targets, [c.text for c in completions],
                    torch.tensor([len(c.token_ids) for c in completions]),
                    torch.tensor([c.finish_reason == "length" for c in completions]))


def completion_token_logps(model, ids: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and the entropy at each position (B, T) (0 where there is no target), from
    logits / temperature, the distribution the completions were sampled from."""
    logits = model(ids)  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    mask = targets != IGNORE_INDEX
    logps, entropy = token_logps_and_entropy(logits, targets.clamp(min=0))
    return logps * mask, entropy * mask


def completion_logps(model, ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(target) at each position (B, T), 0 where there is no target: `completion_token_logps`
    without the entropy, for the passes that only the ratio and the KL read (the reference's,
    the sampling policy's); the same numbers."""
    logits = model(ids)  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * (targets != IGNORE_INDEX)  # (B, T)
