"""Training a sparse autoencoder on a loaded model's activations, and judging it.

    text or prepared shards ── token windows (B, T) ── the model, run with a hook ──
        activations (B·T, d) of one layer: the MLP's hidden units or the residual stream
        ── a shuffling buffer (neighbouring tokens are alike) ── SAE batches ── Adam

Nothing is stored: activations stream from the data pipeline as training
needs them. What keeps features alive and training steady (the recipes of
Anthropic's "Towards Monosemanticity" and Gao et al. 2024):

    start          decoder rows random unit vectors, the encoder their transpose;
                   the decoder bias at the geometric median of the first batch
    every step     the gradient's component along each (unit) decoder row is
                   removed, the gradient norm clipped, the rows renormalized
    top-k          the AuxK loss (`aux_coefficient`, `aux_k`, `aux_normalized`): the
                   features that have not fired for `dead_window` steps are trained
                   to reconstruct the error the live ones leave
    resampling     every `resample_every` steps the dead features are restarted:
                   each gets the direction of an input the SAE reconstructs badly
                   (drawn from the last few batches with probability ∝ its squared
                   error, distinct inputs while there are enough), its encoder
                   scaled to a fifth of the live features' mean norm, its bias zero
                   and its Adam state reset

Judged on held-out tokens (`evaluate_sae`):

    explained variance   1 − E‖x − x̂‖² / E‖x − E x‖²
    L0                   mean number of features active on a token
    dead fraction        features that never fire
    loss increase        the model's next-token loss with x̂ spliced in place of x,
                         minus the clean loss (and what zeroing x would cost, for scale)

and `top_contexts` shows, for a feature, the tokens (with their context) that
excite it most.

Activation points are named as TransformerLens names them:
`blocks.{L}.mlp.hook_post` (site "mlp") and `blocks.{L}.hook_resid_post` (site "resid").
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from scribelm.inspect.hooks import hooks_attached, run_with_cache
from scribelm.inspect.sae import SAEConfig, SAEError, SparseAutoencoder, default_input_scale, geometric_median

SITES = {"mlp": "blocks.{layer}.mlp.hook_post", "resid": "blocks.{layer}.hook_resid_post"}


def hook_name(layer: int, site: str) -> str:
    return SITES[site].format(layer=layer)


def site_width(model, site: str) -> int:
    return model.config.d_mlp if site == "mlp" else model.config.d_model


def check_site(model, layer: int, site: str) -> None:
    if site not in SITES:
        raise SAEError(f"unknown activation site {site!r}; choose one of {', '.join(SITES)}")
    n = model.config.n_layers
    if not 0 <= layer < n:
        raise SAEError(f"the model has {n} layers (0..{n - 1}); there is no layer {layer}")


# --------------------------------------------------------------------------- activations


@contextmanager
def hooked(model, layer: int, site: str, edit: Callable[[torch.Tensor], torch.Tensor | None]):
    """While inside, `edit(activation)` sees the site's activation (B, T, d) on every forward
    and may return a replacement (the named hook points of `scribelm.inspect.hooks`)."""
    check_site(model, layer, site)
    with hooks_attached(model, {hook_name(layer, site): lambda tensor, hook: edit(tensor)}):
        yield


@torch.no_grad()
def activations(model, ids: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """ids (B, T) -> the site's activations (B, T, d), running blocks 0..layer only."""
    check_site(model, layer, site)
    name = hook_name(layer, site)
    _, cache = run_with_cache(model, ids, names=[name], stop_at_layer=layer + 1)
    return cache[name]


def token_batches(lm, data: str | os.PathLike | Sequence[str | os.PathLike], *, batch_size: int = 16,
                  sequence_length: int = 64, split: str = "train", seed: int = 0, loop: bool = True) -> Iterator[torch.Tensor]:
    """Token windows (B, T) from the data pipeline: a prepared data directory (`scribe
    prepare`; its tokenizer must be the model's) or text / JSONL / Parquet files, which
    are read document by document and tokenized with the model's tokenizer."""
    from scribelm.data.loader import TokenBatchLoader
    from scribelm.data.prepare import check_tokenizer_matches, read_manifest

    sequence_length = min(sequence_length, lm.config.context_length)
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if len(paths) == 1 and Path(paths[0]).is_dir() and (Path(paths[0]) / "manifest.json").is_file():
        check_tokenizer_matches(read_manifest(paths[0]), lm.tokenizer, lm.config.vocab_size, paths[0])
        loader = TokenBatchLoader(paths[0], split, batch_size, sequence_length, shuffle=loop, loop=loop, seed=seed)
        for batch in loader:
            yield batch["ids"].long()
        return
    from scribelm.data.sources import find_input_files, iter_clean_documents

    ids: list[int] = []
    for text, _ in iter_clean_documents(find_input_files(paths)):
        ids.extend(lm.tokenizer.encode(text + "\n"))
    T = sequence_length
    if len(ids) < T * batch_size:
        raise SAEError(f"the data holds {len(ids)} tokens, fewer than one batch of {batch_size}×{T}; give more text")
    stream = torch.tensor(ids)
    windows = stream[: len(ids) // T * T].view(-1, T)  # (W, T)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(windows), generator=generator) if loop else torch.arange(len(windows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start : start + batch_size]]
        if not loop:
            return


def activation_stream(lm, batches: Iterable[torch.Tensor], layer: int, site: str, *,
                      buffer_tokens: int = 16384, batch_tokens: int = 1024, seed: int = 0) -> Iterator[torch.Tensor]:
    """Shuffled SAE batches (batch_tokens, d) of the site's activations, streamed: a buffer
    of `buffer_tokens` activations is filled, shuffled, and its first half handed out."""
    generator = torch.Generator().manual_seed(seed)
    batches = iter(batches)
    buffer: torch.Tensor | None = None  # (n, d) float32, on the model's device
    while True:
        chunks = [] if buffer is None else [buffer]
        filled = 0 if buffer is None else len(buffer)
        while filled < buffer_tokens:
            ids = next(batches, None)
            if ids is None:
                break
            acts = activations(lm.model, ids.to(lm.device), layer, site).flatten(0, 1).float()  # (B·T, d)
            chunks.append(acts)
            filled += len(acts)
        if filled < batch_tokens:
            return
        buffer = torch.cat(chunks)
        buffer = buffer[torch.randperm(len(buffer), generator=generator).to(buffer.device)]
        give = max(batch_tokens, len(buffer) // 2) // batch_tokens * batch_tokens
        for start in range(0, give, batch_tokens):
            yield buffer[start : start + batch_tokens]
        buffer = buffer[give:]


# --------------------------------------------------------------------------- training


@dataclass
class SAETraining:
    layer: int
    site: str = "mlp"
    expansion: int = 8  # features = expansion × the site's width (when `features` is not given)
    features: int | None = None
    k: int | None = None  # top-k; None: ReLU + L1
    l1_coefficient: float = 1.0  # in units where E‖x‖² = d (SparseAutoencoder.input_scale)
    aux_coefficient: float = 1.0  # top-k's dead-feature loss (on the quickstart model 1 left far fewer dead than 1/32)
    aux_k: int | None = None  # dead features in that loss; None: half the activation width
    aux_normalized: bool = False  # Gao et al.'s form of that loss (see scribelm.inspect.sae)
    grad_clip: float = 1.0  # the gradient's largest norm; 0: no clipping
    resample_pool: int = 8  # recent batches whose badly reconstructed inputs seed resampled features
    steps: int = 2000
    batch_tokens: int = 1024
    lr: float = 1e-3
    l1_warmup: float = 0.05  # share of the steps over which the L1 penalty ramps up from 0
    resample_every: int = 250  # steps; 0: never resample
    dead_window: int = 50  # steps without firing that make a feature dead (for the auxiliary loss and resampling)
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.batch_tokens < 1 or self.lr <= 0:
            raise SAEError("steps, batch_tokens and lr must be positive")
        if self.resample_every < 0 or self.dead_window < 1 or self.grad_clip < 0 or self.resample_pool < 1:
            raise SAEError("resample_every and grad_clip must be ≥ 0, dead_window and resample_pool ≥ 1")
        if self.expansion < 1 or (self.features is not None and self.features < 1):
            raise SAEError("the dictionary needs at least one feature")


def train_sae(lm, batches: Iterable[torch.Tensor], settings: SAETraining,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> tuple[SparseAutoencoder, list[dict[str, float]]]:
    """Train an SAE on the activations of `settings.layer`/`site` for the token windows in
    `batches` (e.g. `token_batches`). Returns the SAE and a log of the loss terms."""
    settings.check()
    check_site(lm.model, settings.layer, settings.site)
    torch.manual_seed(settings.seed)
    d = site_width(lm.model, settings.site)
    config = SAEConfig(d_in=d, n_features=settings.features or settings.expansion * d, k=settings.k,
                       l1_coefficient=settings.l1_coefficient, aux_coefficient=settings.aux_coefficient,
                       aux_k=settings.aux_k, aux_normalized=settings.aux_normalized)
    sae = SparseAutoencoder(config).to(lm.device)
    stream = activation_stream(lm, batches, settings.layer, settings.site, batch_tokens=settings.batch_tokens,
                               buffer_tokens=max(16 * settings.batch_tokens, 8192), seed=settings.seed)
    first = next(stream, None)
    if first is None:
        raise SAEError("the data gave not one batch of activations; give more text")
    with torch.no_grad():
        sae.input_scale.fill_(default_input_scale(first))
        sae.b_dec.copy_(geometric_median(first * sae.input_scale))  # start the decoder bias at the data's centre
    optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    since_fired = torch.zeros(config.n_features, dtype=torch.long, device=lm.device)
    log: list[dict[str, float]] = []
    recent: list[torch.Tensor] = []  # the last batches, for resampling
    decay_from = int(0.8 * settings.steps)
    for step in range(settings.steps):
        x = (first if step == 0 else next(stream, None))
        if x is None:
            raise SAEError(f"the data ran out after {step} steps; give more text or fewer steps")
        x = x * sae.input_scale
        warm = min(1.0, (step + 1) / max(1, settings.l1_warmup * settings.steps))
        sae.config.l1_coefficient = settings.l1_coefficient * warm
        lr_factor = 1.0 if step < decay_from else (settings.steps - step) / (settings.steps - decay_from)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor
        dead = since_fired > settings.dead_window
        terms = sae.loss_terms(x, dead)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        remove_parallel_gradient(sae)
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), settings.grad_clip)
        optimizer.step()
        sae.normalize_decoder()
        fired = (terms["features"] > 0).any(0)
        since_fired += 1
        since_fired[fired] = 0
        recent = (recent + [x])[-settings.resample_pool :]
        if settings.resample_every and (step + 1) % settings.resample_every == 0 and step + 1 < decay_from:
            resample_dead_features(sae, optimizer, torch.cat(recent), since_fired > settings.dead_window)
            since_fired[since_fired > settings.dead_window] = 0
        entry = {"step": step + 1, "loss": terms["loss"].item(), "mse": terms["mse"].item(),
                 "l0": (terms["features"] > 0).float().sum(-1).mean().item(),
                 "dead_fraction": dead.float().mean().item()}
        entry.update({name: terms[name].item() for name in ("l1", "aux") if name in terms})
        log.append(entry)
        if on_step is not None:
            on_step(step + 1, entry)
    sae.config.l1_coefficient = settings.l1_coefficient
    return sae.eval(), log


@torch.no_grad()
def remove_parallel_gradient(sae: SparseAutoencoder) -> None:
    """Drop the part of each decoder row's gradient that would only change its length,
    which the renormalization after the step undoes anyway (it would still move Adam's state)."""
    grad = sae.W_dec.grad
    if grad is not None:
        rows = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # (F, d)
        grad -= (grad * rows).sum(-1, keepdim=True) * rows


@torch.no_grad()
def resample_dead_features(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                           dead: torch.Tensor) -> int:
    """Give each dead feature the direction of a badly reconstructed input of x (N, d)
    (scaled units); returns how many were resampled."""
    chosen_features = dead.nonzero().flatten()
    if len(chosen_features) == 0:
        return 0
    error = (sae.decode(sae.activate(sae.pre_activations(x))) - x).pow(2).sum(-1)  # (N,)
    if error.sum() <= 0:
        return 0
    weights = error.pow(2)
    enough = int((weights > 0).sum()) >= len(chosen_features)  # distinct inputs, so no two restart alike
    picks = torch.multinomial(weights / weights.sum(), len(chosen_features), replacement=not enough)
    directions = x[picks] - sae.b_dec  # (n, d)
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    encoder_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[chosen_features] = directions
    sae.W_enc[:, chosen_features] = directions.T * 0.2 * encoder_norm
    sae.b_enc[chosen_features] = 0.0
    for parameter, index in ((sae.W_dec, (chosen_features,)), (sae.W_enc, (slice(None), chosen_features)),
                             (sae.b_enc, (chosen_features,))):
        state = optimizer.state.get(parameter, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return len(chosen_features)


# --------------------------------------------------------------------------- judging


@torch.no_grad()
def evaluate_sae(lm, sae: SparseAutoencoder, batches: Iterable[torch.Tensor], layer: int, site: str) -> dict[str, Any]:
    """Explained variance, L0, dead fraction and the next-token loss with the
    reconstruction spliced in, over the token windows in `batches` (module docstring)."""
    check_site(lm.model, layer, site)
    if sae.config.d_in != site_width(lm.model, site):
        raise SAEError(f"the SAE reads {sae.config.d_in} numbers but {hook_name(layer, site)} has "
                       f"{site_width(lm.model, site)}")
    model = lm.model
    tokens, squared_error, total, total_sq, active, fired = 0, 0.0, 0.0, 0.0, 0.0, None
    losses = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_batches = 0
    for ids in batches:
        ids = ids.to(lm.device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        losses["clean"] += _next_token_loss(model, inputs, targets)
        seen: list[torch.Tensor] = []

        def splice(a: torch.Tensor) -> torch.Tensor:
            seen.append(a)
            return sae(a)

        with hooked(model, layer, site, splice):
            losses["spliced"] += _next_token_loss(model, inputs, targets)
        with hooked(model, layer, site, torch.zeros_like):
            losses["zero"] += _next_token_loss(model, inputs, targets)
        x = seen[0].flatten(0, 1).float()  # (N, d)
        features = sae.encode(x)  # (N, F)
        squared_error += (sae(x) - x).pow(2).sum().item()
        total += x.sum(0)
        total_sq += x.pow(2).sum(0)
        active += (features > 0).sum().item()
        now = (features > 0).sum(0)  # (F,)
        fired = now if fired is None else fired + now
        tokens += len(x)
        n_batches += 1
    if n_batches == 0:
        raise SAEError("no held-out batches to evaluate on; give more text")
    variance = (total_sq - total.pow(2) / tokens).sum().item()  # Σ over tokens of ‖x − mean‖²
    losses = {name: value / n_batches for name, value in losses.items()}
    return {
        "explained_variance": 1.0 - squared_error / variance,
        "l0": active / tokens,
        "dead_fraction": (fired == 0).float().mean().item(),
        "loss_clean": losses["clean"],
        "loss_spliced": losses["spliced"],
        "loss_zero_ablated": losses["zero"],
        "loss_increase": losses["spliced"] - losses["clean"],
        "loss_recovered": (losses["zero"] - losses["spliced"]) / max(losses["zero"] - losses["clean"], 1e-12),
        "tokens": tokens,
        "firing_counts": fired.tolist(),  # per feature: on how many tokens it fired
    }


@torch.no_grad()
def firing_counts(lm, sae: SparseAutoencoder, batches: Iterable[torch.Tensor], layer: int, site: str) -> tuple[torch.Tensor, int]:
    """On how many tokens of `batches` each feature fires: (counts (F,), tokens). Features
    with a zero count are dead on these tokens; the more tokens, the rarer a feature may
    be and still count as alive."""
    counts, tokens = torch.zeros(sae.config.n_features, dtype=torch.long), 0
    for ids in batches:
        features = sae.encode(activations(lm.model, ids.to(lm.device), layer, site)).flatten(0, 1)  # (N, F)
        counts += (features > 0).sum(0).cpu()
        tokens += len(features)
    return counts, tokens


def _next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    logits = model(inputs)  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).item()


@torch.no_grad()
def top_contexts(lm, sae: SparseAutoencoder, batches: Iterable[torch.Tensor], layer: int, site: str,
                 features: Sequence[int], *, n: int = 5, width: int = 8) -> dict[int, list[dict[str, Any]]]:
    """For each feature, the n tokens that excite it most: {"activation", "token", "before"
    (up to `width` tokens of context), "after"}."""
    bad = [f for f in features if not 0 <= f < sae.config.n_features]
    if bad:
        raise SAEError(f"the SAE has {sae.config.n_features} features; no feature {bad[0]}")
    index = torch.tensor(list(features), dtype=torch.long)
    best_values = torch.full((len(index), 0), -math.inf)
    best_where: torch.Tensor = torch.zeros((len(index), 0, 2), dtype=torch.long)
    kept: list[torch.Tensor] = []
    first_window = 0
    for ids in batches:
        kept.append(ids.cpu())
        acts = sae.encode(activations(lm.model, ids.to(lm.device), layer, site)).cpu()[..., index]  # (B, T, f)
        B, T, _ = acts.shape
        values = acts.flatten(0, 1).T  # (f, B·T)
        rows = torch.arange(B * T)
        where = torch.stack([first_window + rows // T, rows % T], -1).expand(len(index), -1, -1)  # (f, B·T, 2)
        first_window += B
        best_values = torch.cat([best_values, values], 1)
        best_where = torch.cat([best_where, where], 1)
        top = best_values.topk(min(n, best_values.shape[1]), dim=1)
        best_values = top.values
        best_where = torch.gather(best_where, 1, top.indices[..., None].expand(-1, -1, 2))
    windows = torch.cat(kept) if kept else torch.zeros(0, 0, dtype=torch.long)
    decode = lm.tokenizer.decode
    result: dict[int, list[dict[str, Any]]] = {}
    for row, feature in enumerate(features):
        entries = []
        for value, (w, t) in zip(best_values[row].tolist(), best_where[row].tolist()):
            if value <= 0:
                continue
            ids = windows[w].tolist()
            entries.append({"activation": value, "token": decode(ids[t : t + 1]),
                            "before": decode(ids[max(0, t - width) : t]), "after": decode(ids[t + 1 : t + 1 + width])})
        result[int(feature)] = entries
    return result
