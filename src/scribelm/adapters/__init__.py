"""Parameter-efficient fine-tuning: LoRA adapters (lora.py) over a full-precision or 4-bit (quant4.py) frozen base."""

from scribelm.adapters.load import load_adapters
from scribelm.adapters.lora import (
    AdapterError,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    read_any_adapter_config,
    save_adapters,
    set_adapters_enabled,
)
from scribelm.adapters.quant4 import Embedding4bit, Linear4bit, dequantize_model, quantize_base, storage_bytes

__all__ = [
    "AdapterError", "Embedding4bit", "Linear4bit", "LoRAConfig", "LoRALinear", "apply_lora", "dequantize_model",
    "load_adapters", "lora_state_dict", "merge_lora", "quantize_base", "read_adapter_config", "read_any_adapter_config",
    "save_adapters", "set_adapters_enabled", "storage_bytes",
]
