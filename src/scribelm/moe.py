"""Sparse mixture of experts: the feed-forward of a block as many MLPs, a few per token.

    x (N, C)                                  N = B·T tokens
     │ router: logits = x · W_r               (N, E)      one score per expert
     │ softmax → probabilities p              (N, E)
     │ top-k → chosen experts, their weights  (N, k)      renormalised to sum 1 (Mixtral) or not (Qwen2-MoE)
     ▼
    y_n = Σ_j weight_nj · Expert_{chosen_nj}(x_n)   (+ sigmoid(x_n · w_s) · SharedExpert(x_n), Qwen2-MoE)

Each token pays for k experts while the model holds E of them: more parameters at
the same compute per token (Mixtral 8x7B: 46.7B parameters, 12.9B used per token).

Dispatch groups tokens by expert instead of looping over tokens: the N·k
(token, expert) assignments are sorted by expert, so each expert runs once on
one contiguous batch of its tokens, and the weighted outputs are scattered back
with `index_add_`. An expert no token chose is not run at all, so it gets no gradient.

Training adds the Switch/Mixtral load-balancing loss (`load_balancing_loss`),
E · Σ_i f_i · P_i with f_i the share of assignments expert i received and P_i its
mean router probability, smallest when tokens spread evenly; without it the
router tends to collapse onto a few experts. Each `MoE` keeps its last router
logits (`router_logits`) for that loss and for inspection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.config import ModelConfig


class MoE(nn.Module):
    """Router + experts (+ an optional gated shared expert) in place of a block's MLP.

    make_mlp(width) builds one expert: the model's own MLP at that hidden width."""

    def __init__(self, config: ModelConfig, make_mlp: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.experts_per_token
        self.normalize_top_k = config.normalize_top_k
        self.jitter = config.router_jitter
        self.aux_loss_coef = config.router_aux_loss_coef
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(config.d_expert) for _ in range(config.n_experts))
        self.shared_expert = make_mlp(config.d_shared_expert) if config.d_shared_expert else None
        self.shared_expert_gate = nn.Linear(config.d_model, 1, bias=False) if config.d_shared_expert else None
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> router logits (N, E), weights (N, k) and indices (N, k) of the chosen experts."""
        logits = self.router(x)  # (N, E)
        probs = F.softmax(logits.float(), dim=-1)  # (N, E), float32 so near-ties pick the same experts in bf16
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), chosen

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Σ_j weights[:, j] · Expert_{chosen[:, j]}(x), tokens grouped by expert. x (N, C) -> (N, C)."""
        flat_choice = chosen.reshape(-1)  # (N·k,) assignment a is token a // k
        order = flat_choice.argsort(stable=True)  # (N·k,) assignments sorted by expert
        token_of = order // self.top_k  # (N·k,) which token each sorted assignment belongs to
        counts = torch.bincount(flat_choice, minlength=self.n_experts).tolist()  # tokens per expert
        grouped = x[token_of].split(counts)  # E chunks, chunk i = the tokens routed to expert i
        outputs = torch.cat([expert(chunk) for expert, chunk, n in zip(self.experts, grouped, counts) if n])  # (N·k, C)
        outputs = outputs * weights.reshape(-1)[order, None]  # (N·k, C) each scaled by its routing weight
        return torch.zeros_like(x).index_add_(0, token_of, outputs)  # (N, C) the k outputs of a token summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if self.training and self.jitter > 0:  # multiplicative noise so routing does not overfit exact inputs
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        flat = x.reshape(B * T, C)  # (N, C)
        logits, weights, chosen = self.route(flat)
        self.router_logits = logits
        y = self.dispatch(flat, weights, chosen)  # (N, C)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)  # (N, C)
        return y.view(B, T, C)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_logits(model: nn.Module) -> list[torch.Tensor]:
    """Each MoE layer's router logits (N, E) from the model's last forward pass, in layer order."""
    return [m.router_logits for m in moe_layers(model) if m.router_logits is not None]


def _assignment_stats(
    logits: Iterable[torch.Tensor], n_experts: int, top_k: int, attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, P): per expert, top-k assignments per counted token and mean router probability,
    pooled over layers; tokens whose mask is 0 (padding) are not counted."""
    assigned = probability = counted = 0.0
    for layer_logits in logits:
        probs = F.softmax(layer_logits.float(), dim=-1)  # (N, E)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        weight = (torch.ones(probs.shape[0], device=probs.device) if attention_mask is None
                  else attention_mask.reshape(-1).to(probs.device, torch.float32))  # (N,) 1 counted, 0 padding
        one_hot = F.one_hot(chosen, n_experts).float().sum(1)  # (N, E) how often each token chose each expert
        assigned = assigned + (one_hot * weight[:, None]).sum(0)  # (E,)
        probability = probability + (probs * weight[:, None]).sum(0)  # (E,)
        counted = counted + weight.sum()
    return assigned / counted, probability / counted


def load_balancing_loss(
    logits: list[torch.Tensor], n_experts: int, top_k: int, attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss E · Σ_i f_i · P_i over the layers' router logits (N, E) each;
    attention_mask (B, T) with N = B·T excludes padding tokens. Minimal when routing is uniform."""
    f, p = _assignment_stats(logits, n_experts, top_k, attention_mask)
    return n_experts * (f * p).sum()


def balance_loss_and_metrics(model: nn.Module, attention_mask: torch.Tensor | None = None,
                             ) -> tuple[torch.Tensor | None, dict[str, float | list[float]]]:
    """After a training forward pass: router_aux_loss_coef · load-balancing loss (None for a model
    without experts) and what to log, the loss and each expert's share of the assignments.
    attention_mask: (B, T) 1 for real tokens, 0 for padding; other mask shapes count every token."""
    layers = [m for m in moe_layers(model) if m.router_logits is not None]
    if not layers:
        return None, {}
    first = layers[0]
    if attention_mask is not None and attention_mask.dim() != 2:
        attention_mask = None
    logits = [m.router_logits for m in layers]
    aux = load_balancing_loss(logits, first.n_experts, first.top_k, attention_mask)
    share = expert_share([t.detach() for t in logits], first.n_experts, first.top_k, attention_mask)
    return first.aux_loss_coef * aux, {"router_aux_loss": float(aux.detach()), "expert_share": share}


def expert_share(logits: list[torch.Tensor], n_experts: int, top_k: int,
                 attention_mask: torch.Tensor | None = None) -> list[float]:
    """Fraction of all top-k assignments each expert received (sums to 1): 1/E each when balanced."""
    f, _ = _assignment_stats(logits, n_experts, top_k, attention_mask)
    return (f / top_k).tolist()
