"""Named activations of the one model, read or replaced, under TransformerLens' names.

Every intermediate tensor of a forward pass has a name, as in TransformerLens:

    hook_embed, hook_pos_embed                      token embeddings, learned positions (B, T, C)
    blocks.{L}.hook_resid_pre                       residual stream entering block L (B, T, C)
    blocks.{L}.ln1.hook_normalized                  its normalized input to attention (pre-norm),
                                                    before the norm's weight and bias, as TransformerLens
    blocks.{L}.attn.hook_q / hook_k / hook_v        per head (B, T, heads, d_head); k, v have the
                                                    key/value heads of grouped-query attention
    blocks.{L}.attn.hook_rot_q / hook_rot_k         q and k after the rotary embedding (RoPE models)
    blocks.{L}.attn.hook_attn_scores                q·kᵀ/√d_head, masked with -inf (B, heads, query, key)
    blocks.{L}.attn.hook_pattern                    softmax of the scores (B, heads, query, key)
    blocks.{L}.attn.hook_z                          each head's weighted values (B, T, heads, d_head)
    blocks.{L}.hook_attn_out                        attention's output projection (B, T, C)
    blocks.{L}.hook_resid_mid                       residual stream after attention (B, T, C)
    blocks.{L}.ln2.hook_normalized                  normalized input to the MLP (pre-norm)
    blocks.{L}.mlp.hook_pre / hook_post             MLP hidden before / after its activation (B, T, d_mlp)
                                                    (gated: the gate before, activation·up after)
    blocks.{L}.hook_mlp_out                         the MLP's output (B, T, C)
    blocks.{L}.hook_resid_post                      residual stream leaving block L (B, T, C)
    ln_final.hook_normalized                        the final norm, before its weight and bias (B, T, C)

    logits, cache = run_with_cache(lm, "The cat sat", names=["blocks.0.attn.hook_pattern"])
    logits = run_with_hooks(lm, ids, {"blocks.1.attn.hook_z": zero_head_3})

A hook function is called as `fn(tensor, hook=point)` and returns the tensor to use in
its place, or None to leave it be (`point.name`, `point.layer()` say where it is).

How it costs nothing when unused: the hooks are attached from outside, only for the
length of one call, with PyTorch's module hooks on the layers whose input or output a
name is, and with per-instance functions (q/k/v projection, activation, attention
product) that shadow the class's own. When the call returns, every one is removed,
so the model's normal path — fused SDPA, packed projections, native kernels,
quantized layers — runs exactly as before. Attention scores and patterns, which the
fused kernel never forms, are computed explicitly on the layers whose pattern is asked for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.errors import ScribeError

HookFn = Callable[..., "torch.Tensor | None"]

_ABSENT = object()
_LAYER_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


class HookPoint:
    """Where a hook function is being called: `name` (e.g. "blocks.1.attn.hook_pattern")."""

    def __init__(self, name: str) -> None:
        self.name = name

    def layer(self) -> int | None:
        match = _LAYER_NAME.match(self.name)
        return int(match.group(1)) if match else None

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


# --------------------------------------------------------------------------- names


def _transformer(lm_or_model) -> nn.Module:
    model = getattr(lm_or_model, "model", lm_or_model)
    if not hasattr(model, "blocks") or not hasattr(model, "token_embedding"):
        raise ScribeError(f"{type(model).__name__} is not a scribelm Transformer; hooks need one")
    return model


def _block_suffixes(model: nn.Module) -> list[str]:
    config = model.config
    pre_norm = config.norm_position == "pre"
    names = ["hook_resid_pre"]
    if pre_norm:
        names.append("ln1.hook_normalized")
    names += ["attn.hook_q", "attn.hook_k", "attn.hook_v"]
    if config.position == "rope":
        names += ["attn.hook_rot_q", "attn.hook_rot_k"]
    names += ["attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid"]
    if pre_norm:
        names.append("ln2.hook_normalized")
    names += ["mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    return names


def hook_names(lm_or_model) -> list[str]:
    """Every activation name of this model, in the order the forward pass computes them."""
    model = _transformer(lm_or_model)
    names = ["hook_embed"]
    if model.position_embedding is not None:
        names.append("hook_pos_embed")
    suffixes = _block_suffixes(model)
    for layer in range(len(model.blocks)):
        names += [f"blocks.{layer}.{suffix}" for suffix in suffixes]
    if model.final_norm is not None:
        names.append("ln_final.hook_normalized")
    return names


def check_names(lm_or_model, names: Iterable[str]) -> list[str]:
    """The names as a list, or a one-line error for the first that this model does not have."""
    model = _transformer(lm_or_model)
    known = set(hook_names(model))
    names = list(names)
    for name in names:
        if name in known:
            continue
        match = _LAYER_NAME.match(name)
        if match and int(match.group(1)) >= len(model.blocks):
            raise ScribeError(f"{name}: layer {match.group(1)} is out of range; the model has {len(model.blocks)} layers (0-{len(model.blocks) - 1})")
        example = ", ".join(hook_names(model)[:4])
        raise ScribeError(f"{name!r} is not an activation of this model; names look like {example}, ... (see scribelm.inspect.hook_names)")
    return names


# --------------------------------------------------------------------------- attaching


def _run(fns: list[HookFn], point: HookPoint, tensor: torch.Tensor) -> torch.Tensor:
    for fn in fns:
        replaced = fn(tensor, hook=point)
        if replaced is not None:
            if not isinstance(replaced, torch.Tensor) or replaced.shape != tensor.shape:
                shape = tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else type(replaced).__name__
                raise ScribeError(f"the hook on {point.name} returned {shape}; it must return a tensor of shape {tuple(tensor.shape)} or None")
            tensor = replaced
    return tensor


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, taps):
    """What `F.scaled_dot_product_attention` computes, with its scores and pattern formed,
    passed through `taps(name, tensor)`. q (B, H, T, hd), k and v (B, KV, S, hd) -> (B, H, T, hd)."""
    q, k = taps("attn.hook_rot_q", q.transpose(1, 2)).transpose(1, 2), taps("attn.hook_rot_k", k.transpose(1, 2)).transpose(1, 2)
    if enable_gqa and k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, S, hd)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    T, S = scores.shape[-2:]
    if is_causal:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    scores = taps("attn.hook_attn_scores", scores)
    pattern = taps("attn.hook_pattern", torch.softmax(scores.float(), dim=-1).to(q.dtype))  # (B, H, T, S)
    if dropout_p > 0:
        pattern = F.dropout(pattern, p=dropout_p)
    return pattern @ v  # (B, H, T, hd)


class _Attached:
    """The hooks of one call on one model; `remove()` puts the model back as it was."""

    def __init__(self, model: nn.Module, hooks: Mapping[str, list[HookFn]]) -> None:
        self.model = model
        self.hooks = hooks
        self.handles: list[Any] = []
        self.shadowed: list[tuple[object, str, object]] = []  # (module, attribute, what the instance held)
        self.resid_pre: dict[int, torch.Tensor] = {}
        try:
            self._attach()
        except BaseException:
            self.remove()
            raise

    # -- helpers --------------------------------------------------------------
    def _wanted(self, name: str) -> list[HookFn]:
        return self.hooks.get(name, [])

    def _tap(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        fns, point = self._wanted(name), HookPoint(name)
        return (lambda t: _run(fns, point, t)) if fns else (lambda t: t)

    def _shadow(self, module: object, attribute: str, value: object) -> None:
        self.shadowed.append((module, attribute, module.__dict__.get(attribute, _ABSENT)))
        setattr(module, attribute, value)

    def _on_output(self, module: nn.Module, name: str) -> None:
        if self._wanted(name):
            tap = self._tap(name)
            self.handles.append(module.register_forward_hook(lambda m, args, out: tap(out)))

    def _on_normalized(self, norm: nn.Module, name: str) -> None:
        """TransformerLens' hook_normalized: the norm's input scaled (and centred, for LayerNorm)
        to unit size, before its weight and bias; a replacement goes through them."""
        if not self._wanted(name):
            return
        tap = self._tap(name)

        def hook(m, args, out):
            x = args[0].float()
            if isinstance(m, nn.LayerNorm):
                normalized = F.layer_norm(x, m.normalized_shape, eps=m.eps).to(out.dtype)
            else:  # RMSNorm
                normalized = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)).to(out.dtype)
            replaced = tap(normalized)
            if replaced is normalized:
                return out
            bias = getattr(m, "bias", None)
            return replaced * m.weight + (bias if bias is not None else 0)

        self.handles.append(norm.register_forward_hook(hook))

    def _on_input(self, module: nn.Module, name: str, view=None) -> None:
        """A hook on the first argument of `module`, seen through `view(t) -> (shown, back)`."""
        if not self._wanted(name):
            return
        tap = self._tap(name)

        def pre_hook(m, args):
            if view is None:
                return (tap(args[0]), *args[1:])
            shown, back = view(args[0])
            return (back(tap(shown)), *args[1:])

        self.handles.append(module.register_forward_pre_hook(pre_hook))

    # -- attaching ------------------------------------------------------------
    def _attach(self) -> None:
        model = self.model
        self._on_output(model.token_embedding, "hook_embed")
        if model.position_embedding is not None:
            self._on_output(model.position_embedding, "hook_pos_embed")
        for layer, block in enumerate(model.blocks):
            self._attach_block(layer, block)
        if model.final_norm is not None:
            self._on_normalized(model.final_norm, "ln_final.hook_normalized")

    def _attach_block(self, layer: int, block: nn.Module) -> None:
        prefix = f"blocks.{layer}."
        attention, mlp = block.attention, block.mlp
        H, KV, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim

        def heads(n: int):
            def view(t):  # (B, T, n·hd) <-> (B, T, n, hd)
                return t.unflatten(-1, (n, hd)), lambda shown: shown.flatten(-2)
            return view

        resid_mid = self._wanted(prefix + "hook_resid_mid")
        if self._wanted(prefix + "hook_resid_pre") or (resid_mid and block.pre_norm):
            tap_pre = self._tap(prefix + "hook_resid_pre")

            def block_pre(m, args):
                x = tap_pre(args[0])
                self.resid_pre[layer] = x
                return (x, *args[1:])

            self.handles.append(block.register_forward_pre_hook(block_pre))
        if block.pre_norm:
            self._on_normalized(block.attention_norm, prefix + "ln1.hook_normalized")
            self._on_normalized(block.mlp_norm, prefix + "ln2.hook_normalized")

        names = [prefix + f"attn.hook_{n}" for n in ("q", "k", "v")]
        if any(self._wanted(n) for n in names):
            taps = [self._tap(n) for n in names]
            project = attention.project_qkv  # the class's own (packed or plain), bound

            def project_qkv(x):
                out = []
                for t, tap, n in zip(project(x), taps, (H, KV, KV)):
                    shown, back = heads(n)(t)
                    out.append(back(tap(shown)))
                return tuple(out)

            self._shadow(attention, "project_qkv", project_qkv)

        explicit = [prefix + "attn.hook_" + n for n in ("rot_q", "rot_k", "attn_scores", "pattern")]
        if any(self._wanted(n) for n in explicit):
            taps_by_name = {n: self._tap(prefix + n) for n in ("attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern")}
            self._shadow(attention, "attend", lambda *a, **kw: explicit_attention(*a, **kw, taps=lambda n, t: taps_by_name[n](t)))
        self._on_input(attention.o, prefix + "attn.hook_z", heads(H))
        self._on_output(attention, prefix + "hook_attn_out")

        if resid_mid and block.pre_norm:
            # resid_mid = resid_pre + attn_out is never a tensor of its own: show that sum, and
            # carry a replacement over to the attention output by the difference.
            tap_mid = self._tap(prefix + "hook_resid_mid")

            def attention_out(m, args, out):
                mid = self.resid_pre[layer] + out
                replaced = tap_mid(mid)
                return out if replaced is mid else out + (replaced - mid)

            self.handles.append(attention.register_forward_hook(attention_out))
        elif resid_mid:  # post-norm: the first norm's output is the residual stream
            self._on_output(block.attention_norm, prefix + "hook_resid_mid")

        if self._wanted(prefix + "mlp.hook_pre"):
            tap_act, activation = self._tap(prefix + "mlp.hook_pre"), mlp.activation
            self._shadow(mlp, "activation", lambda t: activation(tap_act(t)))
        self._on_input(mlp.down, prefix + "mlp.hook_post")
        self._on_output(mlp, prefix + "hook_mlp_out")
        if block.pre_norm:
            self._on_output(block, prefix + "hook_resid_post")
        else:  # post-norm: the residual stream after the block is the second norm's output
            self._on_output(block.mlp_norm, prefix + "hook_resid_post")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module, attribute, held in reversed(self.shadowed):
            if held is _ABSENT:
                module.__dict__.pop(attribute, None)
            else:
                setattr(module, attribute, held)
        self.handles, self.shadowed = [], []
        self.resid_pre.clear()


@contextmanager
def hooks_attached(lm_or_model, hooks: Mapping[str, HookFn | Iterable[HookFn]]):
    """Attach `{name: fn or [fns]}` for the length of the `with` block."""
    model = _transformer(lm_or_model)
    check_names(model, hooks)
    as_lists = {name: [fns] if callable(fns) else list(fns) for name, fns in hooks.items()}
    attached = _Attached(model, as_lists)
    try:
        yield model
    finally:
        attached.remove()


# --------------------------------------------------------------------------- running


def as_ids(lm, text_or_ids) -> torch.Tensor:
    """Text (tokenized without special tokens), a list of ids, or a (T,) / (B, T) tensor -> ids (B, T),
    checked against the model's vocabulary and context."""
    model = _transformer(lm)
    if isinstance(text_or_ids, str):
        tokenizer = getattr(lm, "tokenizer", None)
        if tokenizer is None:
            raise ScribeError("this model has no tokenizer; give token ids instead of text")
        ids = torch.tensor([tokenizer.encode(text_or_ids)], dtype=torch.long)
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ScribeError("give some text or a non-empty (T,) or (B, T) list of token ids")
    config = model.config
    if ids.shape[1] > config.context_length:
        raise ScribeError(f"the input has {ids.shape[1]} tokens, more than the model's context of {config.context_length}; shorten it")
    if int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
        raise ScribeError(f"token ids must lie in 0-{config.vocab_size - 1}, the model's vocabulary")
    return ids.to(next(model.parameters()).device)


def _select(model, names) -> list[str]:
    everything = hook_names(model)
    if names is None:
        return everything
    if isinstance(names, str):
        return check_names(model, [names])
    if callable(names):  # a filter, as TransformerLens' names_filter
        return [name for name in everything if names(name)]
    return check_names(model, names)


def run_with_cache(lm, text_or_ids, names=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass that also keeps activations: `(logits (B, T, V), {name: tensor})`.
    `names`: None for all of them, a list of names, or a filter `name -> bool`."""
    model = _transformer(lm)
    ids = as_ids(lm, text_or_ids)
    cache: dict[str, torch.Tensor] = {}

    def keep(tensor, hook):
        cache[hook.name] = tensor.detach()

    with hooks_attached(model, {name: keep for name in _select(model, names)}), torch.no_grad():
        logits = model(ids)
    return logits, {name: cache[name] for name in hook_names(model) if name in cache}


def run_with_hooks(lm, text_or_ids, hooks: Mapping[str, HookFn | Iterable[HookFn]]) -> torch.Tensor:
    """One forward pass with `{name: fn}` applied (each `fn(tensor, hook=point)` returns the
    replacement, or None); returns the logits (B, T, V)."""
    model = _transformer(lm)
    ids = as_ids(lm, text_or_ids)
    with hooks_attached(model, hooks), torch.no_grad():
        return model(ids)
