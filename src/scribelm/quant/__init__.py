"""Weight-only quantization of a model: int8 and int4 linear layers.

    from scribelm.quant import quantize_model, bits_per_byte
    quantize_model(lm.model, bits=4, group_size=32)   # in place
    lm.save("my-model-int4")                          # config.json records the scheme

The formats, the quantized layer and its kernels live with the other inference
kernels in `scribelm.accel` (formats.py, quantized.py, quantize.py); this package
gathers what a user calls, and measures what quantizing lost (quality.py).
"""

from scribelm.accel.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, unpack_int4
from scribelm.accel.quantize import (
    dequantize_model,
    is_quantized_tensor,
    prepare_quantized_skeleton,
    quantizable_linears,
    quantize_model,
    scheme_record,
    set_kernel,
    weight_bytes,
)
from scribelm.accel.quantized import (
    DEFAULT_GROUP_SIZE,
    DYNAMIC_MAX_ROWS,
    KERNELS,
    NATIVE_MAX_ROWS,
    QUANTIZED_TENSORS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizationError,
    QuantizedLinear,
    check_scheme,
)
from scribelm.quant.quality import DEFAULT_EVAL_TEXT, bits_per_byte

__all__ = [
    "DEFAULT_EVAL_TEXT", "DEFAULT_GROUP_SIZE", "DYNAMIC_MAX_ROWS", "KERNELS", "NATIVE_MAX_ROWS", "QUANTIZED_TENSORS",
    "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES", "QuantizationError", "QuantizedLinear", "bits_per_byte",
    "check_scheme", "dequantize_int4", "dequantize_int8", "dequantize_model", "is_quantized_tensor",
    "prepare_quantized_skeleton", "quantizable_linears", "quantize_int4", "quantize_int8", "quantize_model",
    "scheme_record", "set_kernel", "unpack_int4", "weight_bytes",
]
