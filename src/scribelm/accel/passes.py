"""`accelerate(model)`: swap the model's plain layers for their fast inference versions, in place.

model.py is written in plain PyTorch. For inference this pass turns, without
copying or renaming any parameter (state dicts, checkpoints and exports see
the same keys and values):

    nn.Linear        -> dense.Linear     native / oneDNN products for a few rows on CPU
    model.RMSNorm    -> dense.RMSNorm    one native call for a few float32 rows
    model.Attention  -> PackedAttention  q, k, v stored side by side, one product
    model.MLP        -> PackedMLP        gate, up stored side by side, one product
    model.Transformer -> NativeTransformer  a decode step of Llama- or GPT-2-shaped blocks in one native call

and places the weights of a CPU model in huge pages (placement.py), which
streams them faster.

Each swap changes the module's class only (a subclass of the plain one, with
the same attributes), so the model stays what it was: every fast path falls
back to the plain computation where a gradient is wanted or a graph is being
captured, and the model keeps training and exporting with the same numbers.
The packed layers pack again whenever they are moved or cast (`_apply`), which
is how a model built on the meta device and then moved stays packed.

`scribelm.load` and `LM` apply it by default; `scribelm.quant.quantize_model`
swaps the linear layers of an accelerated or plain model alike.
"""

from __future__ import annotations

from torch import nn

from scribelm.accel.dense import Linear, RMSNorm
from scribelm.accel.native_stack import NativeTransformer
from scribelm.accel.packing import fused_linear, pack_linears
from scribelm.accel.placement import place_weights
from scribelm import model as plain


class PackedAttention(plain.Attention):
    """Attention whose q, k and v are applied by one product when packed (packing.py)."""

    def project_qkv(self, x):
        return fused_linear(x, (self.q, self.k, self.v))

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() give each parameter its own new storage; pack them again
        # (meta-device parameters are left alone by pack_linears).
        result = super()._apply(fn, recurse)
        pack_linears((self.q, self.k, self.v))
        return result


class PackedMLP(plain.MLP):
    """A feed-forward layer whose gate and up projections are applied by one product when packed."""

    def project_gate_up(self, x):
        return fused_linear(x, (self.gate, self.up))

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if self.gate is not None:
            pack_linears((self.gate, self.up))
        return result


#: plain class -> its fast subclass; only modules of exactly the plain class are swapped
#: (a LoRA wrapper or a quantized layer keeps its own class).
SWAPS: dict[type, type] = {
    nn.Linear: Linear,
    plain.RMSNorm: RMSNorm,
    plain.Attention: PackedAttention,
    plain.MLP: PackedMLP,
    plain.Transformer: NativeTransformer,
}


def accelerate(model: nn.Module) -> nn.Module:
    """Swap in the fast inference layers (see the module docstring), in place; returns `model`.
    Applying it again is harmless: it also swaps layers added since (a merged adapter)."""
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    pack_projections(model)
    place_weights(model)  # after packing: a packed buffer moves as one
    return model


def is_accelerated(model: nn.Module) -> bool:
    return any(isinstance(module, (PackedAttention, PackedMLP)) for module in model.modules())


def pack_projections(model: nn.Module) -> nn.Module:
    """Store each block's q, k and v weights (and gate and up) side by side in memory, so
    an accelerated model computes them with one product each. Parameters keep their
    identity, names, shapes and values; layers that cannot be packed are left alone."""
    for module in model.modules():
        if isinstance(module, plain.Attention):
            pack_linears((module.q, module.k, module.v))
        elif isinstance(module, plain.MLP) and module.gate is not None:
            pack_linears((module.gate, module.up))
    return model
