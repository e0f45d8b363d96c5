"""LoRA adapters in `peft`'s format, for users of the Hugging Face stack.

scribelm names a layer `blocks.3.attention.q`; a Hugging Face Llama calls it
`model.layers.3.self_attn.q_proj`, and `peft` stores its adapter as

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   (out, r)

next to an adapter_config.json with peft_type "LORA", r, lora_alpha and the
target modules. The name table is the one the Hugging Face exporter uses
(`scribelm.interop.hf`), so adapters trained on an imported Llama, Mistral
or Qwen2 model load with `PeftModel.from_pretrained(hf_model, directory)`.
GPT-2 fuses q, k and v into one Conv1D, which a per-projection adapter does
not map onto; merge instead (`scribe convert --merge-lora`) for GPT-2 bases.

`load_peft_adapters` reads such a directory back onto a scribelm model (plain
LoRA, rsLoRA scaling included); DoRA, per-layer ranks, trained biases and
saved extra modules are refused by name, since they would change the numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scribelm.adapters.lora import AdapterError, LoRAConfig, install_adapters, lora_modules, read_adapter_weights


def _module_names(model: torch.nn.Module, family) -> dict[str, str]:
    """scribelm linear layer name -> Hugging Face module name, for layers stored as-is."""
    table = {}
    for rule in family.weights:
        if rule.kind != "same" or not rule.hf.endswith(".weight") or not rule.ours[0].endswith(".weight"):
            continue
        hf, ours = rule.hf[: -len(".weight")], rule.ours[0][: -len(".weight")]
        for i in range(model.config.n_layers):
            table[ours.format(i=i)] = hf.format(i=i)
    return table


def save_peft_adapters(model: torch.nn.Module, directory: str | os.PathLike, *, base_model: str | None = None,
                       architecture: str | None = None) -> Path:
    """Write the model's LoRA adapters as a peft adapter directory (atomically); returns it."""
    from scribelm.io import atomic_directory
    from scribelm.interop.hf import family_for

    modules = lora_modules(model)
    if not modules:
        raise AdapterError("this model has no LoRA adapters to export; train or load some first")
    family = family_for(model.config, architecture)
    table = _module_names(model, family)
    unmapped = [n for n in modules if n not in table]
    if unmapped:
        raise AdapterError(f"{family.title} has no separate layer for {', '.join(unmapped[:3])}; peft adapters cannot "
                           "express it. Merge the adapters instead: scribe convert BASE DST --to hf --merge-lora ADAPTER")
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise AdapterError("peft's format needs one rank and alpha for all adapters")
    state = {}
    for name, module in modules.items():
        prefix = f"base_model.model.{table[name]}"
        state[f"{prefix}.lora_A.weight"] = module.lora_A.detach().contiguous()
        state[f"{prefix}.lora_B.weight"] = module.lora_B.detach().contiguous()
    config = getattr(model, "lora_config", None)
    meta = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        "lora_dropout": config.dropout if config is not None else 0.0,
        "target_modules": sorted(table[n] for n in modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_peft_adapters(model: torch.nn.Module, directory: str | os.PathLike, meta: dict[str, Any]) -> list[str]:
    """Wrap `model` with the LoRA adapters of a peft adapter directory (config `meta`); returns
    the wrapped layer names."""
    from scribelm.interop.hf import family_for

    directory = Path(directory)
    if meta.get("peft_type") != "LORA":
        raise AdapterError(f"{directory} holds a peft {meta.get('peft_type')!r} adapter; only LoRA adapters load here")
    refused = {
        "use_dora": "DoRA", "rank_pattern": "per-layer ranks (rank_pattern)", "alpha_pattern": "per-layer alphas",
        "modules_to_save": "fully trained extra modules (modules_to_save)", "fan_in_fan_out": "fan_in_fan_out layers",
        "layers_to_transform": "adapters on some layers only (layers_to_transform)",
    }
    for key, what in refused.items():
        if meta.get(key):
            raise AdapterError(f"{directory}: peft adapters with {what} are not supported; merge them with peft instead")
    if meta.get("bias", "none") != "none":
        raise AdapterError(f"{directory}: peft adapters that train biases (bias={meta['bias']!r}) are not supported")
    rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
    if meta.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); LoRALinear by alpha / r
    ours_by_hf = {hf: ours for ours, hf in _module_names(model, family_for(model.config)).items()}
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in read_adapter_weights(directory).items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        part = part.split(".")[0]  # "A.weight" or "A.<adapter name>.weight"
        if module not in ours_by_hf or part not in ("A", "B"):
            unknown.append(key)
            continue
        state[f"{ours_by_hf[module]}.lora_{part}"] = tensor
    if unknown:
        raise AdapterError(f"{directory} holds tensors that map onto no layer of this model ({', '.join(unknown[:2])}); "
                           "load it onto the base model it was trained on")
    names = sorted({key.rpartition(".")[0] for key in state})
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=float(meta.get("lora_dropout") or 0.0), targets=names)
    return install_adapters(model, names, config, state, directory / "adapter_model.safetensors")
