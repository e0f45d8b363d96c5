"""How much a quantized model lost: bits per byte and perplexity on held-out text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.accel.quantized import QuantizationError

@torch.no_grad()
def bits_per_byte(model: nn.Module, tokenizer, text: str, *, window: int | None = None) -> dict[str, float]:
    """Next-token loss of `model` on `text`, in bits per UTF-8 byte (tokenizer-independent)
    and as perplexity per token. The text is cut into non-overlapping windows of the
    model's context (or `window`); each window predicts its tokens after the first."""
    ids = tokenizer.encode(text)
    n_bytes = len(text.encode("utf-8"))
    window = min(window or model.config.context_length, model.config.context_length)
    if len(ids) < 2 or n_bytes == 0:
        raise QuantizationError("the evaluation text is too short; give at least a sentence")
    device = next(model.parameters()).device
    total_nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1], device=device)[None]  # (1, T+1)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1])  # (1, T, V)
        total_nats += F.cross_entropy(logits.float()[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return {
        "bits_per_byte": total_nats / math.log(2) / n_bytes,
        "perplexity": math.exp(total_nats / count),
        "tokens": count,
        "bytes": n_bytes,
    }


#: Held-out English prose (public domain: Austen, Melville, Dickens, Carroll) for
#: `scribe quantize` when no --eval-text is given.
DEFAULT_EVAL_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.\n"
    "Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; "
    "whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every "
    "funeral I meet, then, I account it high time to get to sea as soon as I can.\n"
    "There were a king with a large jaw and a queen with a plain face, on the throne of England; there were a "
    "king with a large jaw and a queen with a fair face, on the throne of France. In both countries it was "
    "clearer than crystal to the lords of the State preserves of loaves and fishes, that things in general were "
    "settled for ever.\n"
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, and what is the use of a book, thought Alice, without pictures or conversations?\n"
)
