"""A trained sparse autoencoder's features on the explain page.

`scribe explain sae` leaves a directory:

    sae.safetensors     the SAE (its config inside)
    report.json         its numbers, and which activation it reads ("hook", "layer", "site")
    features.json       every feature's top-activating held-out contexts:
                        {"contexts": {feature: [{"activation", "before", "token", "after"}, ...]}}

`scribe explain MODEL TEXT --sae DIR` then runs the text through the model, reads
that activation, encodes it with the SAE, and puts on the page, for every token,
the features most active there; a click on one shows where it fires in this text
and its top-activating contexts from the SAE's own report, each with the exciting
token highlighted. `sae_features_data` gathers those numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from scribelm.inspect.sae import SAEError, SparseAutoencoder

TOP_FEATURES = 5  # features listed per token


def read_sae_directory(directory: str | os.PathLike) -> tuple[SparseAutoencoder, dict[str, Any], dict[str, Any]]:
    """(the SAE, report.json, features.json's contexts) of a `scribe explain sae` directory."""
    directory = Path(directory)
    if not (directory / "sae.safetensors").is_file():
        raise SAEError(f"{directory} holds no sae.safetensors: give a directory written by `scribe explain sae`")
    sae = SparseAutoencoder.load(directory / "sae.safetensors")
    try:
        report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
        layer, site = int(report["layer"]), str(report["site"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SAEError(f"{directory / 'report.json'} does not say which activation the SAE reads: {err}") from None
    contexts: dict[str, Any] = {}
    if (directory / "features.json").is_file():
        try:
            contexts = json.loads((directory / "features.json").read_text(encoding="utf-8"))["contexts"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SAEError(f"cannot read {directory / 'features.json'}: {err}") from None
    report = {**report, "layer": layer, "site": site}
    return sae, report, contexts


@torch.no_grad()
def sae_features_data(lm, ids: torch.Tensor, directory: str | os.PathLike, *, top: int = TOP_FEATURES) -> dict[str, Any]:
    """ids (1, T) -> what the page's SAE section shows: per position the `top` most active
    features, each shown feature's activation at every position, and its top contexts."""
    from scribelm.inspect.sae_train import activations, check_site, hook_name, site_width

    sae, report, contexts = read_sae_directory(directory)
    layer, site = report["layer"], report["site"]
    model = lm.model
    if site not in ("mlp", "resid") or not 0 <= layer < model.config.n_layers:
        raise SAEError(f"the SAE in {directory} reads {hook_name(layer, site) if site in ('mlp', 'resid') else site}, "
                       f"which this model ({model.config.n_layers} layers) does not have")
    check_site(model, layer, site)
    if sae.config.d_in != site_width(model, site):
        raise SAEError(f"the SAE in {directory} reads {sae.config.d_in} numbers but this model's "
                       f"{hook_name(layer, site)} has {site_width(model, site)}: it was trained on another model")
    sae = sae.to(ids.device)
    features = sae.encode(activations(model, ids[:1], layer, site))[0].float()  # (T, F)
    best = features.topk(min(top, features.shape[-1]), dim=-1)  # (T, top)
    per_token = [[{"feature": int(f), "value": round(float(v), 4)} for f, v in zip(idx, val) if v > 0]
                 for idx, val in zip(best.indices.tolist(), best.values.tolist())]
    shown = sorted({entry["feature"] for row in per_token for entry in row})
    return {
        "hook": hook_name(layer, site),
        "n_features": sae.config.n_features,
        "kind": sae.config.kind,
        "metrics": {key: report[key] for key in ("explained_variance", "l0", "dead_fraction", "loss_increase") if key in report},
        "per_token": per_token,
        "activations": {str(f): [round(float(v), 4) for v in features[:, f].tolist()] for f in shown},
        "contexts": {str(f): contexts.get(str(f), []) for f in shown},
    }
