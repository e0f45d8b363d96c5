"""The encoder-decoder transformer (T5, and the original "Attention Is All You Need" model).

    source ids (B, S) ──▶ encoder: bidirectional Blocks ──▶ states (B, S, C)  ─┐  (once per prompt)
                                                                               │ cross-attention
    decoder ids (B, T) ─▶ decoder: causal Blocks, each self-attention ─▶ cross-attention ─▶ MLP
                          ──▶ logits (B, T, V): the next target token

Both halves are the one `Transformer` of `scribelm.model`: the encoder is configured
`causal=False`, the decoder `cross_attention=True`, and they share one token embedding.
The decoder reads the target "shifted right": it starts from a start token (T5: the pad
id, 0) and at each step predicts the next target token, seeing only earlier ones.

Generation encodes the prompt once, projects the encoder's states to each decoder
layer's cross-attention keys and values once (`EncoderMemory`), then decodes token by
token with the decoder's self-attention keys and values in a `KVCache`.

T5 v1.0 scales the decoder's output by 1/sqrt(d_model) before its tied unembedding (the
embedding is trained at a larger scale); v1.1 does not (`scale_decoder_output`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.cache import KVCache
from scribelm.config import ModelConfig
from scribelm.errors import ScribeError
from scribelm.model import EncoderMemory, Transformer


def encoder_config(config: ModelConfig) -> ModelConfig:
    """The encoder of an encoder-decoder `config` (which describes the decoder): the same
    widths, `encoder_layers` bidirectional blocks without cross-attention."""
    return config.replace(causal=False, cross_attention=False, n_layers=config.encoder_layers, encoder_layers=0,
                          tie_embeddings=True, name=f"{config.name}-encoder")


def build_model(config: ModelConfig) -> nn.Module:
    """A `Transformer`, or an `EncoderDecoder` when the config has an encoder."""
    return EncoderDecoder(config) if config.encoder_layers else Transformer(config)


class EncoderDecoder(nn.Module):
    """An encoder and a cross-attending decoder sharing one token embedding."""

    is_encoder_decoder = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not config.encoder_layers:
            raise ScribeError("an encoder-decoder needs encoder_layers > 0")
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # registered first: its name is canonical
        self.encoder = Transformer(encoder_config(config))
        self.decoder = Transformer(config)
        self.encoder.token_embedding = self.decoder.token_embedding = self.shared
        self.encoder.unembedding = None  # the encoder's states go to the decoder, not to a vocabulary
        if config.tie_embeddings:
            self.decoder.unembedding.weight = self.shared.weight
        if not self.shared.weight.is_meta:
            nn.init.normal_(self.shared.weight, mean=0.0, std=config.init_std)

    # the names a decoder-only model has, for code that ties or inspects them
    @property
    def token_embedding(self) -> nn.Embedding:
        return self.shared

    @property
    def unembedding(self) -> nn.Linear:
        return self.decoder.unembedding

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderMemory:
        """source ids (B, S), padding mask (B, S) -> what the decoder cross-attends to."""
        states = self.encoder.hidden_states(ids, attention_mask=attention_mask)  # (B, S, C)
        return EncoderMemory(states, attention_mask)

    def decode(self, decoder_ids: torch.Tensor, memory: EncoderMemory, *, cache: KVCache | None = None,
               last_only: bool = False) -> torch.Tensor:
        """decoder ids (B, T) -> logits (B, T, V) (the last position only with `last_only`)."""
        x = self.decoder.hidden_states(decoder_ids, cache=cache, last_only=last_only, memory=memory)  # (B, T, C)
        if self.config.scale_decoder_output:
            x = x * self.config.d_model ** -0.5
        return self.decoder.unembedding(x)  # (B, T, V)

    def forward(self, ids: torch.Tensor, decoder_ids: torch.Tensor, *,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(decoder_ids, self.encode(ids, attention_mask))

    def loss(self, ids: torch.Tensor, targets: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             start_id: int = 0, ignore_index: int = -100) -> torch.Tensor:
        """Cross-entropy of the targets (B, T) given the source (teacher forcing): the decoder
        reads the targets shifted right, after the start token."""
        decoder_ids = shift_right(targets, start_id)
        logits = self(ids, decoder_ids, attention_mask=attention_mask)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=ignore_index)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return sum(p.numel() for name, p in self.named_parameters()
                   if not (exclude_embeddings and name.startswith("shared.")))


def shift_right(targets: torch.Tensor, start_id: int, ignore_index: int = -100) -> torch.Tensor:
    """targets (B, T) -> decoder inputs (B, T): the start token, then the targets but the last
    (ignored positions read as the start token, as T5 reads them as padding)."""
    shifted = torch.cat([torch.full_like(targets[:, :1], start_id), targets[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == ignore_index, start_id)


class BoundDecoder:
    """The decoder of an `EncoderDecoder` with one source's memory bound to it, called as a
    decoder-only model is (ids, cache, last_only -> logits): what beam search and the decode
    core (`BatchGeneration`: greedy, sampling, streaming) drive. The beams share the source,
    so its cross-attention keys and values are never reordered."""

    def __init__(self, model: EncoderDecoder, memory: EncoderMemory) -> None:
        self.model, self.memory, self.config = model, memory, model.config

    def __call__(self, ids: torch.Tensor, *, cache: KVCache | None = None, attention_mask=None,
                 last_only: bool = False) -> torch.Tensor:
        return self.model.decode(ids, self.memory, cache=cache, last_only=last_only)

    def parameters(self):
        return self.model.parameters()


@torch.inference_mode()
def greedy_generate(model: EncoderDecoder, prompt_ids: Sequence[int], *, max_new_tokens: int,
                    stop_ids: Sequence[int] = (), start_id: int = 0) -> tuple[list[int], str]:
    """The most likely continuation, token by token: (new ids, "stop" | "length").
    The prompt is encoded once; the decoder's keys and values stay in a cache."""
    device = next(model.parameters()).device
    memory = model.encode(torch.tensor([list(prompt_ids)], device=device))
    length = min(model.config.context_length, max_new_tokens + 1)
    cache = KVCache(model.config, 1, length, device=device, dtype=memory.states.dtype)
    token, out = start_id, []
    for _ in range(min(max_new_tokens, length)):
        logits = model.decode(torch.tensor([[token]], device=device), memory, cache=cache)  # (1, 1, V)
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            return out, "stop"
    return out, "length"
