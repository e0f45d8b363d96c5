"""ONNX export: the model as a portable graph for onnxruntime (and every runtime that reads ONNX).

`torch.onnx.export(..., dynamo=True)` traces the model with `torch.export`
and translates the captured graph to ONNX operators (via onnxscript). Batch
and sequence lengths stay symbolic, so one file serves any prompt up to the
model's context.

Two graphs can be written:

    plain      input_ids (B, T) int64                     -> logits (B, T, V)
    with past  input_ids (B, T), past_keys, past_values    -> logits, present_keys, present_values
               past_* (L, B, n_kv_heads, P, head_dim); present_* have P + T positions

The second is for incremental decoding: feed the prompt with P = 0 (empty
past tensors), then one token at a time with the previous step's present_*
as past_*. The graph runs the model's own modules (norms, projections, RoPE,
MLP); only the cache handling differs from `Transformer.forward`, which writes
into a preallocated `KVCache` in place and so does not trace.

A weight-only quantized model exports through its reference kernel; the
exporter's optimizer folds the dequantization of the constant codes, so the
file holds the dequantized float weights: the quantized model's numerics at
float size (onnxruntime's own int4 operators are a different format).

    from scribelm.interop.onnx import export_onnx
    export_onnx(lm, "model.onnx")                         # plain
    export_onnx(lm, "model-kv.onnx", past_key_values=True)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scribelm.errors import ScribeError
from scribelm.io import published_file_mode, temporary_sibling


class ONNXExportError(ScribeError):
    """A model or setting that the ONNX export cannot express."""


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)  # (B, T, V)


class _LogitsWithPast(nn.Module):
    """The transformer's forward pass with the cache as explicit inputs and outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        from scribelm.model import apply_rope, rope_cos_sin, sinusoidal_encoding

        m, c = self.model, self.model.config
        B, T = input_ids.shape
        P = past_keys.shape[3]
        positions = torch.arange(T, device=input_ids.device).expand(B, T) + P  # (B, T)
        x = m.token_embedding(input_ids)  # (B, T, C)
        if c.position == "learned":
            x = x + m.position_embedding(positions)
        elif c.position == "sinusoidal":
            x = x + sinusoidal_encoding(positions, c.d_model).to(x.dtype)
        rope = rope_cos_sin(m._inv_freq, positions, x.dtype) if c.position == "rope" else None
        query_pos = torch.arange(T, device=x.device)[:, None] + P  # (T, 1)
        key_pos = torch.arange(P + T, device=x.device)[None, :]  # (1, P+T)
        mask = key_pos <= query_pos  # (T, P+T)
        presents_k, presents_v = [], []
        for i, block in enumerate(m.blocks):
            a = block.attention

            def attend(h: torch.Tensor) -> torch.Tensor:
                q = a.q(h).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, H, T, hd)
                k = a.k(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, KV, T, hd)
                v = a.v(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
                if rope is not None:
                    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
                k = torch.cat((past_keys[i], k), dim=2)  # (B, KV, P+T, hd)
                v = torch.cat((past_values[i], v), dim=2)
                presents_k.append(k)
                presents_v.append(v)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=a.n_kv_heads != a.n_heads)
                return a.o(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))  # (B, T, C)

            if block.pre_norm:
                x = x + attend(block.attention_norm(x))
                x = x + block.mlp(block.mlp_norm(x))
            else:
                x = block.attention_norm(x + attend(x))
                x = block.mlp_norm(x + block.mlp(x))
        if m.final_norm is not None:
            x = m.final_norm(x)
        return m.unembedding(x), torch.stack(presents_k), torch.stack(presents_v)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress on stdout and notes on its logger; library code stays quiet."""
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed" notes
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        registration_log.setLevel(level)


def export_onnx(
    lm,
    out_path: str | os.PathLike,
    *,
    past_key_values: bool = False,
    opset: int | None = None,
) -> Path:
    """Write `lm.model` as an ONNX graph with dynamic batch and sequence axes; returns the path.

    past_key_values: add past_keys/past_values inputs and present_keys/present_values
    outputs for incremental decoding (see the module docstring). The tokenizer is not
    part of the graph; it is written beside the file as STEM.tokenizer.json when present."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        raise ONNXExportError("ONNX export needs onnx and onnxscript: pip install 'scribelm[onnx]'") from None
    from scribelm.quant import set_kernel, weight_bytes

    model = lm.model
    c = lm.config
    if c.context_length < 2:
        raise ONNXExportError("ONNX export needs a context of at least 2 tokens")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    quantized = bool(getattr(model, "quantization", None))
    if quantized:
        set_kernel(model, "reference")  # the packed CPU kernels are not ONNX operators
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    example_ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=1, max=c.context_length)
    try:
        with torch.no_grad():
            model(example_ids)  # makes the RoPE frequencies, so tracing sees no attribute writes
        if past_key_values:
            wrapper: nn.Module = _LogitsWithPast(model)
            past = torch.zeros(c.n_layers, 2, c.n_kv_heads, 4, c.head_dim, dtype=dtype, device=device)
            args = (example_ids, past, past.clone())
            past_len = torch.export.Dim("past", min=0, max=c.context_length - 1)
            dynamic = {"input_ids": {0: batch, 1: sequence}, "past_keys": {1: batch, 3: past_len},
                       "past_values": {1: batch, 3: past_len}}
            inputs, outputs = ["input_ids", "past_keys", "past_values"], ["logits", "present_keys", "present_values"]
        else:
            wrapper, args = _Logits(model), (example_ids,)
            dynamic = {"input_ids": {0: batch, 1: sequence}}
            inputs, outputs = ["input_ids"], ["logits"]
        big = weight_bytes(model) > 1.5 * 2**30
        tmp_name = str(temporary_sibling(out_path, suffix=".onnx"))  # the next export removes it if this one is killed
        try:
            with _quiet_exporter():
                program = torch.onnx.export(
                    wrapper, args, dynamo=True, input_names=inputs, output_names=outputs,
                    dynamic_shapes=dynamic, opset_version=opset, optimize=True, verbose=False,
                )
                if big:  # protobuf caps a file at 2 GiB: weights go to OUT.data beside it
                    program.save(str(out_path), external_data=True)
                else:
                    program.save(tmp_name, external_data=False)
                    os.chmod(tmp_name, published_file_mode())  # as the user's umask asks, whatever the writer chose
                    os.replace(tmp_name, out_path)
        except Exception as err:
            raise ONNXExportError(f"torch.onnx.export could not export this model: {str(err).splitlines()[0]}") from err
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    finally:
        if quantized:
            set_kernel(model, "auto")
        model.train(was_training)
    if lm.tokenizer is not None:
        lm.tokenizer.backend.save(str(out_path.with_name(out_path.stem + ".tokenizer.json")))
    return out_path
