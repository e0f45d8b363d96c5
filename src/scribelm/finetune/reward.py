"""Reward models: a scalar score for a reply, learned from preferences.

RLHF's first step. Take any language model, drop nothing, and add a linear
"score" head (C → 1) on the final hidden state of the sequence's last token:

    r(prompt, reply) = w · h_last          h_last: (C,), the transformer's summary of the text

trained on the same {"prompt", "chosen", "rejected"} pairs as DPO with the
Bradley–Terry loss (`rl_losses.reward_pair_loss`): the probability that the
chosen reply wins is σ(r_chosen − r_rejected). A record may carry a "margin"
(how much better chosen is; the loss then asks for at least that gap), and
a centring coefficient keeps the scores near zero. Held-out pairwise
accuracy — the share of pairs the model ranks right — is what to watch.

A saved reward model is a normal checkpoint directory (the language model,
loadable by `scribelm.load`) plus `reward_head.safetensors`; `load_reward_model`
reads both. `export_reward_hf` writes a Hugging Face
`…ForSequenceClassification` (num_labels 1) that transformers scores the same,
pooling the last non-padding token as we do.

Text is rendered with the chat template, prompt as the user's turn and the
reply as the assistant's, exactly as during training; `score_texts` does
this for RL rollouts, so a policy with a different tokenizer is scored on
the text it wrote, retokenized for the reward model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scribelm.data.chat import IGNORE_INDEX, DatasetError, read_jsonl, tokenize_conversation
from scribelm.data.preference import PreferenceDataset, PreferencePair, record_to_pair
from scribelm.errors import ScribeError
from scribelm.finetune.rl_losses import reward_pair_loss

REWARD_HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """A transformer and a linear score head: ids (B, T) -> scores (B,) at each row's last real token."""

    def __init__(self, transformer: nn.Module, score: nn.Linear | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = transformer.config
        if score is None:
            score = nn.Linear(self.config.d_model, 1, bias=False)
            nn.init.normal_(score.weight, std=1.0 / self.config.d_model ** 0.5)
        self.score = score.to(next(transformer.parameters()).device)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        last = self.transformer.hidden_states(ids, attention_mask=attention_mask, last_only=True)  # (B, 1, C)
        return self.score(last).float().view(-1)  # (B,)


# --------------------------------------------------------------------------- data


@dataclass
class RewardPairs:
    """Tokenized preference pairs with an optional margin each."""

    pairs: PreferenceDataset
    margins: list[float] | None

    def __len__(self) -> int:
        return len(self.pairs)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, tokenizer, *, max_length: int,
                   overflow: str = "truncate") -> "RewardPairs":
        def check(record, where):
            record_to_pair(record, where, tokenizer)
            margin = record.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
                raise DatasetError(f"{where}: 'margin' must be a number")
            return record

        records = read_jsonl(path, validate=check)
        dataset = PreferenceDataset.from_records([r for _, r in records], tokenizer, max_length=max_length,
                                                 overflow=overflow, lines=[n for n, _ in records], source=str(path))
        by_line = {n: float(r.get("margin", 0.0)) for n, r in records}
        has_margins = any("margin" in r for _, r in records)
        return cls(dataset, [by_line[p.line] for p in dataset.pairs] if has_margins else None)

    def split(self, fraction: float, seed: int = 0) -> tuple["RewardPairs", "RewardPairs"]:
        margin_of = {id(p): m for p, m in zip(self.pairs.pairs, self.margins)} if self.margins else None
        train, val = self.pairs.split(fraction, seed)

        def margins(d):
            return [margin_of[id(p)] for p in d.pairs] if margin_of else None

        return RewardPairs(train, margins(train)), RewardPairs(val, margins(val))

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, pad_id: int = 0):
        order = list(range(len(self)))
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        for start in range(0, len(order), batch_size):
            chosen = order[start: start + batch_size]
            yield collate_reward_pairs([self.pairs.pairs[i] for i in chosen],
                                       [self.margins[i] for i in chosen] if self.margins else None, pad_id)


def collate_reward_pairs(pairs: Sequence[PreferencePair], margins: Sequence[float] | None = None,
                         pad_id: int = 0) -> dict[str, torch.Tensor]:
    """ids and attention_mask (2B, T): chosen rows over rejected rows, right-padded; margin (B,) if given."""
    rows = [p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    batch = {"ids": ids, "attention_mask": mask}
    if margins is not None:
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return batch


class RewardPairLoader:
    """Shuffled batches of pairs, epoch after epoch, resumable (epoch, batch index)."""

    def __init__(self, data: RewardPairs, batch_size: int, *, seed: int = 0, pad_id: int = 0) -> None:
        self.data, self.batch_size, self.seed, self.pad_id = data, batch_size, seed, pad_id
        self.epoch, self.batch_index = 0, 0
        self.sequence_length = max(max(len(p.chosen), len(p.rejected)) for p in data.pairs.pairs)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self):
        while True:
            batches = list(self.data.batches(self.batch_size, shuffle=True, seed=self.seed, epoch=self.epoch,
                                             pad_id=self.pad_id))
            while self.batch_index < len(batches):
                self.batch_index += 1
                yield batches[self.batch_index - 1]
            self.epoch, self.batch_index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_index, self.seed = int(state["epoch"]), int(state["batch_index"]), int(state["seed"])


# --------------------------------------------------------------------------- objective and evaluation


class RewardObjective:
    """`objective(model, batch) -> (loss, metrics)`: Bradley–Terry over a stacked pair batch."""

    def __init__(self, center_coefficient: float | None = None) -> None:
        self.center_coefficient = center_coefficient

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        scores = model(batch["ids"], attention_mask=batch["attention_mask"])  # (2B,)
        B = scores.shape[0] // 2
        chosen, rejected = scores[:B], scores[B:]
        loss = reward_pair_loss(chosen, rejected, batch.get("margin"), self.center_coefficient)
        with torch.no_grad():
            metrics = {"accuracy": float((chosen > rejected).float().mean()),
                       "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
                       "reward_margin": float((chosen - rejected).mean()), "pairs": float(B)}
        return loss, metrics


@torch.no_grad()
def evaluate_reward_model(model: RewardModel, data: RewardPairs, batch_size: int = 8, pad_id: int = 0,
                          center_coefficient: float | None = None) -> dict[str, float]:
    """Loss, pairwise accuracy and mean margin over a whole (held-out) set of pairs."""
    objective = RewardObjective(center_coefficient)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = {"loss": 0.0, "accuracy": 0.0, "reward_margin": 0.0}
    n = 0
    try:
        for batch in data.batches(batch_size, shuffle=False, pad_id=pad_id):
            loss, metrics = objective(model, {k: v.to(device) for k, v in batch.items()})
            B = metrics["pairs"]
            totals["loss"] += float(loss) * B
            totals["accuracy"] += metrics["accuracy"] * B
            totals["reward_margin"] += metrics["reward_margin"] * B
            n += B
    finally:
        model.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()} | {"pairs": float(n)}


# --------------------------------------------------------------------------- saving, loading, scoring


def _head_bytes(model: RewardModel) -> bytes:
    from safetensors.torch import save

    return save({"score.weight": model.score.weight.detach().cpu().contiguous()})


def save_reward_model(path: str | os.PathLike, model: RewardModel, tokenizer=None,
                      generation: dict[str, Any] | None = None,
                      extra_files: dict[str, bytes | str] | None = None) -> Path:
    """A checkpoint directory of the language model with the score head beside it (atomically)."""
    from scribelm.checkpoint import save_checkpoint

    files = {**(extra_files or {}), REWARD_HEAD_FILE: _head_bytes(model)}
    return save_checkpoint(path, model.transformer, model.config, tokenizer, generation, files)


def load_reward_head(path: str | os.PathLike, model: RewardModel) -> None:
    """Copy a saved checkpoint's transformer weights and score head into `model` (for resuming)."""
    from safetensors.torch import load_file

    from scribelm.train.checkpoints import copy_weights_into

    copy_weights_into(model.transformer, Path(path))
    head = load_file(str(Path(path) / REWARD_HEAD_FILE))
    with torch.no_grad():
        model.score.weight.copy_(head["score.weight"])


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A saved reward model -> (RewardModel in eval mode, tokenizer)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import scribelm

    head_file = Path(path) / REWARD_HEAD_FILE
    if not head_file.is_file():
        raise ScribeError(f"{path} is not a reward model (no {REWARD_HEAD_FILE}); train one with "
                          "`scribe finetune reward`")
    lm = scribelm.load(path, device=device)
    try:
        weight = load_file(str(head_file))["score.weight"]
    except (SafetensorError, KeyError, OSError) as err:
        raise ScribeError(f"{head_file} is damaged ({err}); restore it from a copy") from None
    if tuple(weight.shape) != (1, lm.config.d_model):
        raise ScribeError(f"{head_file} holds a head of shape {tuple(weight.shape)}, not (1, {lm.config.d_model})")
    score = nn.Linear(lm.config.d_model, 1, bias=False)
    with torch.no_grad():
        score.weight.copy_(weight)
    return RewardModel(lm.model, score).eval(), lm.tokenizer


def conversation_ids(tokenizer, prompt: str, reply: str) -> list[int]:
    """A prompt and a reply rendered as (user, assistant) turns, as the reward model was trained."""
    ids, _ = tokenize_conversation(tokenizer, [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": reply}], train_on="last")
    return ids


@torch.no_grad()
def score_texts(model: RewardModel, tokenizer, prompts: Sequence[str], replies: Sequence[str],
                batch_size: int = 16) -> list[float]:
    """Reward-model scores of (prompt, reply) texts, tokenized with the reward model's own tokenizer
    (and cut to its context, keeping the end, which is where the score is read)."""
    context = model.config.context_length
    rows = [conversation_ids(tokenizer, p, r)[-context:] for p, r in zip(prompts, replies)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_id or 0
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        T = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        scores += model(ids.to(device), attention_mask=mask.to(device)).tolist()
    return scores


def export_reward_hf(model: RewardModel, tokenizer, path: str | os.PathLike, *, architecture: str | None = None) -> Path:
    """Write a Hugging Face `…ForSequenceClassification` (num_labels 1) directory, atomically."""
    from safetensors.torch import load_file, save_file

    from scribelm.interop.hf.save import save_hf
    from scribelm.io import atomic_directory
    from scribelm.lm import LM

    path = Path(path)
    if tokenizer is None or tokenizer.pad_id is None:
        raise ScribeError("exporting a reward model needs a tokenizer with a padding token "
                          "(transformers finds each row's last token by it)")
    with atomic_directory(path) as tmp:
        causal = save_hf(LM(model.transformer, tokenizer), tmp / "causal", max_shard_size="100GB",
                         architecture=architecture)
        config = json.loads((causal / "config.json").read_text())
        causal_name = config["architectures"][0]
        config["architectures"] = [causal_name.replace("ForCausalLM", "ForSequenceClassification")
                                   .replace("LMHeadModel", "ForSequenceClassification")]
        config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                      pad_token_id=tokenizer.pad_id, problem_type="regression")
        tensors = load_file(str(causal / "model.safetensors"))
        tensors.pop("lm_head.weight", None)
        tensors["score.weight"] = model.score.weight.detach().cpu().float().to(
            next(iter(tensors.values())).dtype).contiguous()
        for item in causal.iterdir():
            if item.name not in ("config.json", "model.safetensors"):
                item.rename(tmp / item.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (causal / "config.json").unlink()
        (causal / "model.safetensors").unlink()
        causal.rmdir()
    return path


__all__ = ["IGNORE_INDEX", "REWARD_HEAD_FILE", "RewardModel", "RewardObjective", "RewardPairs", "RewardPairLoader",
           "collate_reward_pairs", "evaluate_reward_model", "export_reward_hf", "load_reward_model", "save_reward_model",
           "score_texts"]
