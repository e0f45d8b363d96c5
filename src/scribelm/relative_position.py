"""T5's relative position bias: a learned number per head for each (query, key) distance.

Instead of adding a position vector to each token, T5 adds to every attention score a
bias that depends only on how far the key is from the query:

    score(q, k) = q·k + bias[head, bucket(k_pos - q_pos)]

Distances are grouped into buckets: small ones exactly (0, 1, 2, ... up to half the
buckets), larger ones logarithmically up to `max_distance`, everything beyond in the
last bucket, so nearby words are told apart and far ones only roughly. The encoder's
buckets are bidirectional (half for keys before the query, half for keys after); the
decoder sees no keys after the query, so all its buckets go to the past. One table of
biases serves every layer of a stack (it lives in the first layer in T5's checkpoints).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scribelm.config import ModelConfig


def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket index of each relative position (key - query), an integer tensor of any shape."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets  # keys after the query: the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # keys before the query; later ones (masked anyway) -> 0
    exact = num_buckets // 2  # distances below this get a bucket each
    is_small = distance < exact
    # the rest: logarithmic in distance from `exact` to `max_distance`, then the last bucket
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return bucket + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """The bias table of one stack: (buckets, heads); `forward` gives (1, H, T, S) to add to scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.bidirectional = not config.causal
        self.num_buckets, self.max_distance = config.relative_buckets, config.relative_max_distance
        self.bias = nn.Embedding(config.relative_buckets, config.n_heads)

    def forward(self, start: int, T: int, S: int, device) -> torch.Tensor:
        query_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        buckets = relative_position_bucket(key_pos - query_pos, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)  # (T, S)
        return self.bias(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)
