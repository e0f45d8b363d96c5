"""What one decode step reads from memory.

At batch 1 a decode step is bound by memory bandwidth, not arithmetic: it
reads every weight once to produce one token. Dividing these bytes by a
step's time gives the bandwidth the step achieves (`scribe generate --stats`,
benchmarks/decode.py), which is how close it runs to the machine's limit.
"""

from __future__ import annotations

from scribelm.accel.quantize import weight_bytes


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: all of them (`quant.weight_bytes`) but the
    token and position embedding tables, of which a step reads one row, unless the
    unembedding shares the table and so reads all of it."""
    total = weight_bytes(model)
    unembedding = getattr(model.unembedding, "weight", None)  # a quantized unembedding has its own tensors
    for table in (model.token_embedding, model.position_embedding):
        if table is not None and table.weight is not unembedding:
            total -= table.weight.numel() * table.weight.element_size()
    return total
