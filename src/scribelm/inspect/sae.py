"""Sparse autoencoders: find the features a layer stores in superposition.

A layer's activation x (d_in numbers) is rewritten as a sparse sum of many more
learned directions ("features"), F ≫ d_in:

    encode   f = act((x − b_dec) W_enc + b_enc)        (F,)  mostly zeros
    decode   x̂ = f W_dec + b_dec                       (d_in,)
    loss     ‖x − x̂‖²  +  sparsity term

Two ways to make f sparse:

    relu     act = ReLU and an L1 penalty  λ · Σ_i f_i ‖W_dec,i‖  (weighted by each
             decoder row's norm, so shrinking f while growing W_dec does not cheat)
    top-k    act keeps the k largest pre-activations (ReLU'd), the rest zero; the
             pre-activations are scaled by ‖W_dec,i‖ first, so the choice does not
             depend on the decoder norms. Features that stopped firing ("dead") get an
             auxiliary loss (AuxK): the top k_aux = d_in/2 dead ones must reconstruct
             what the live ones missed, e = x − x̂. Two forms: sae-lens's ‖ê − e‖²,
             scaled down while few are dead; or Gao et al.'s (`aux_normalized`),
             ‖ê − e‖² / Var(e) with ReLU'd dead activations, which keeps pulling dead
             features toward the error even once it is small.

Only k of F features are active, so the top-k decoder sums k rows per token
(a gather, not an (N, F) × (F, d) product): the same numbers, far less work.

The parameter names, layouts (W_enc (d_in, F), W_dec (F, d_in)) and loss terms are
those of sae-lens's standard and top-k training SAEs, so the same weights and batch
give the same numbers (tests check it). The trainer (`sae_train.py`) also keeps every
decoder row at unit norm and resamples dead features.

`input_scale` multiplies the activations before they reach the SAE (and divides the
reconstruction after), chosen so that E‖x‖² = d_in: one L1 coefficient then suits
every layer and model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from scribelm.errors import ScribeError


class SAEError(ScribeError, ValueError):
    """A sparse-autoencoder setting or input that cannot work."""


@dataclass
class SAEConfig:
    d_in: int
    n_features: int
    k: int | None = None  # top-k; None: ReLU with an L1 penalty
    l1_coefficient: float = 5.0
    aux_coefficient: float = 1.0  # top-k's dead-feature loss (sae-lens's default; Gao et al. 2024 use 1/32)
    aux_k: int | None = None  # dead features in the auxiliary loss; None: d_in // 2
    aux_normalized: bool = False  # Gao et al.'s form of that loss (module docstring); False: sae-lens's

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.n_features < 1:
            raise SAEError(f"d_in and n_features must be positive, got {self.d_in} and {self.n_features}")
        if self.k is not None and not 1 <= self.k <= self.n_features:
            raise SAEError(f"k must be between 1 and the {self.n_features} features, got {self.k}")
        if self.l1_coefficient < 0 or self.aux_coefficient < 0:
            raise SAEError("the loss coefficients must not be negative")
        if self.aux_k is not None and self.aux_k < 1:
            raise SAEError(f"aux_k must be positive, got {self.aux_k}")

    @property
    def kind(self) -> str:
        return "relu" if self.k is None else "topk"


class SparseAutoencoder(nn.Module):
    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        self.config = config
        d, F = config.d_in, config.n_features
        W_dec = torch.empty(F, d)
        nn.init.kaiming_uniform_(W_dec)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)  # unit decoder rows
        self.W_dec = nn.Parameter(W_dec)  # (F, d): row i is feature i's direction
        self.W_enc = nn.Parameter(W_dec.T.clone())  # (d, F): starts as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))

    # -- the autoencoder, in the SAE's own (scaled) units -----------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d) -> (N, F), before the sparsifying activation."""
        # (x − b_dec) W_enc written so that backward needs no (N, d) gradient for x, only b_dec's (d,)
        hidden = x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)  # (N, F)
        if self.config.k is not None:
            hidden = hidden * self.W_dec.norm(dim=-1)  # top-k picks as if the decoder rows were unit
        return hidden

    def activate(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.k is None:
            return torch.relu(hidden)
        values, indices = hidden.topk(self.config.k, dim=-1, sorted=False)  # (N, k)
        return torch.zeros_like(hidden).scatter_(-1, indices, values.relu())  # (N, F)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, F) -> reconstruction (N, d)."""
        return self._times_decoder(features) + self.b_dec

    def _times_decoder(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.k is not None:
            features = features / self.W_dec.norm(dim=-1)  # undo the scaling of pre_activations
        return features @ self.W_dec  # (N, d)

    def loss_terms(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss of a batch x (N, d) in the SAE's units, term by term:
        {"mse", "l1" (relu) or "aux" (top-k), "loss" (their sum), "features", "reconstruction"}.
        dead (F,) bool: the features that have not fired lately (top-k's auxiliary loss)."""
        hidden = self.pre_activations(x)  # (N, F)
        if self.config.k is None:
            features = self.activate(hidden)  # (N, F)
            reconstruction = self.decode(features)  # (N, d)
        else:
            values, indices = hidden.topk(self.config.k, dim=-1, sorted=False)  # (N, k)
            values = values.relu()
            features = torch.zeros_like(hidden).scatter(-1, indices, values)  # (N, F)
            reconstruction = self._decode_sparse(values, indices) + self.b_dec  # (N, d)
        mse = (reconstruction - x).pow(2).sum(-1).mean()
        terms = {"mse": mse, "features": features, "reconstruction": reconstruction}
        if self.config.k is None:
            weighted = features * self.W_dec.norm(dim=-1)  # (N, F)
            terms["l1"] = (self.config.l1_coefficient * weighted.abs().sum(-1)).mean()
            terms["loss"] = mse + terms["l1"]
        else:
            terms["aux"] = self._dead_feature_loss(x, reconstruction, hidden, dead)
            terms["loss"] = mse + terms["aux"]
        return terms

    def _decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """values, indices (N, k) of the active features -> Σ values·W_dec rows (N, d), top-k scaling undone."""
        values = values / self.W_dec.norm(dim=-1)[indices]  # undo the scaling of pre_activations
        return nn.functional.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")  # (N, d)

    def _dead_feature_loss(self, x, reconstruction, hidden, dead) -> torch.Tensor:
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead == 0:
            return reconstruction.new_zeros(())
        residual = (x - reconstruction).detach()  # (N, d): what the live features missed
        k_aux = self.config.aux_k or x.shape[-1] // 2
        dead_only = torch.where(dead[None], hidden, -torch.inf)  # (N, F)
        top = dead_only.topk(min(k_aux, n_dead), dim=-1, sorted=False)  # (N, k_aux)
        values = top.values.relu() if self.config.aux_normalized else top.values
        error = (self._decode_sparse(values, top.indices) - residual).pow(2).sum(-1).mean()
        if self.config.aux_normalized:
            variance = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            return self.config.aux_coefficient * error / variance
        scale = min(n_dead / k_aux, 1.0)  # a few dead features: a small push
        return self.config.aux_coefficient * scale * error

    # -- in the activations' own units -----------------------------------------------
    def encode(self, activations: torch.Tensor) -> torch.Tensor:
        """Activations (..., d) as the model gives them -> feature activations (..., F)."""
        x = activations.float() * self.input_scale
        return self.activate(self.pre_activations(x))

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        """Activations (..., d) -> their reconstruction (..., d), in the model's units and dtype."""
        x = activations.float() * self.input_scale
        reconstruction = self.decode(self.activate(self.pre_activations(x))) / self.input_scale
        return reconstruction.to(activations.dtype)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (the encoder column and bias with it for
        top-k, whose scaled pre-activations then stay the same)."""
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-8)  # (F,)
        self.W_dec /= norms[:, None]
        if self.config.k is not None:
            self.W_enc *= norms
            self.b_enc *= norms

    # -- files ---------------------------------------------------------------------
    def save(self, path) -> None:
        """One safetensors file: the weights plus the config as metadata."""
        import json

        from safetensors.torch import save

        from scribelm.io import write_file_atomically

        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        write_file_atomically(path, save(tensors, metadata={"scribelm_sae": json.dumps(asdict(self.config))}))

    @classmethod
    def load(cls, path) -> "SparseAutoencoder":
        import json

        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                config = SAEConfig(**json.loads(f.metadata()["scribelm_sae"]))
            sae = cls(config)
            sae.load_state_dict(load_file(str(path)))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as err:
            if isinstance(err, SAEError):
                raise
            raise SAEError(f"{path} is not a scribelm sparse autoencoder: {err}") from None
        return sae


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """The point (d,) with the least summed distance to points (N, d) (Weiszfeld's
    iteration from the mean): a centre that outliers do not drag, where the decoder
    bias starts."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)  # (N,)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


def default_input_scale(sample: torch.Tensor) -> float:
    """The factor that brings a sample of activations (N, d) to E‖x‖² = d."""
    mean_square_norm = sample.float().pow(2).sum(-1).mean().item()
    if not math.isfinite(mean_square_norm) or mean_square_norm <= 0:
        raise SAEError("the activations are all zero or not finite; nothing to learn")
    return math.sqrt(sample.shape[-1] / mean_square_norm)
