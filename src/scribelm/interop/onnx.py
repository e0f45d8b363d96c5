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
MLP) through `Transformer.forward`; only the cache differs: a `PastKeyValues`
takes the past as inputs and gives the presents as outputs, where a `KVCache`
writes into preallocated storage in place, which does not trace.

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
from torch import nn

from scribelm.cache import PastKeyValues
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
    """The model's own forward pass over a cache given as tensors (`PastKeyValues`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        cache = PastKeyValues(past_keys, past_values)
        logits = self.model(input_ids, cache=cache)  # (B, T, V)
        return (logits, *cache.presents())


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
    from scribelm.accel.quantize import set_kernel, weight_bytes

    model = lm.model
    c = lm.config
    if c.context_length < 2:
        raise ONNXExportError("ONNX export needs a context of at least 2 tokens")
    if c.n_experts:  # its dispatch sizes each expert's batch from the data, which a traced graph cannot hold
        raise ONNXExportError("ONNX export does not support mixtures of experts; export as GGUF or Hugging Face instead")
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
