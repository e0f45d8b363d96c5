"""Interop: other people's model formats in, scribelm's models out.

    hf      Hugging Face directories (GPT-2, Llama, Mistral, Qwen2): load and export
    gguf    GGUF files for llama.cpp (export)
    onnx    ONNX graphs for onnxruntime (export)

`scribelm.load(DIR)` recognises a Hugging Face directory by its config.json and
converts it on the fly; `LM.save(DIR, format="hf")` writes one back. The
modules are imported on use, so a missing optional dependency only matters to
the format that needs it.
"""
