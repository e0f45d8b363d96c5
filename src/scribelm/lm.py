"""`LM`: a model with its tokenizer, the object users hold.

    lm = scribelm.load("my-model")      # a checkpoint directory
    lm.model, lm.tokenizer, lm.config   # the parts
    lm.save("copy-of-my-model")         # atomic, safetensors
    lm.generate("Once upon a time", max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0)  # -> str
    lm.generate(["a", "b"], temperature=0)           # -> [str, str], batched
    for delta in lm.stream("Once"): ...              # text deltas
    lm.chat([{"role": "user", "content": "Hi"}])     # chat template applied
    lm.embed(["a text", "another"])                  # (2, C) unit vectors (scribelm.embed)
    (settings: scribelm.sampling.SamplingSettings; loop: scribelm.generate)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scribelm.checkpoint import is_scribe_checkpoint, load_model, read_generation, save_checkpoint
from scribelm.config import ModelConfig
from scribelm.errors import CheckpointError, ScribeError
from scribelm.model import Transformer
from scribelm.store import find_model_path, gguf_file
from scribelm.tokenizer import Tokenizer

CHAT_TUNED_KEY = "chat_tuned"  # generation.json: true once fine-tuned on conversations


@dataclass
class LM:
    model: Transformer
    tokenizer: Tokenizer | None
    generation_config: dict[str, Any] = field(default_factory=dict)
    sentence_config: dict[str, Any] = field(default_factory=dict)  # a sentence-transformers directory's pooling

    def __post_init__(self) -> None:
        # Inference layers (packed projections, native CPU kernels) by default; they keep the
        # plain layers' parameters and fall back to them for training and exports.
        from scribelm.accel import accelerate

        accelerate(self.model)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_or_prompts, *, return_details: bool = False, **settings: Any):
        """A string in, a string out; a list in, a list out (see `scribelm.generate.generate`)."""
        from scribelm.generate import generate

        return generate(self, prompt_or_prompts, return_details=return_details, **settings)

    def stream(self, prompt, **settings: Any):
        """Yield text deltas of one generation (see `scribelm.generate.stream`)."""
        from scribelm.generate import stream

        return stream(self, prompt, **settings)

    def chat(self, messages, *, stream: bool = False, **settings: Any):
        """The assistant's reply to [{role, content}, ...] (see `scribelm.generate.chat`)."""
        from scribelm.generate import chat

        return chat(self, messages, stream=stream, **settings)

    def embed(self, texts: str | list[str], *, pooling: str | None = None, normalize: bool = True,
              batch_size: int = 32, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """(N, C) float32 sentence embeddings. pooling: "mean", "cls", "max" or "last"; None
        follows the directory's sentence-transformers config, else mean for encoders and
        last-token for decoders (see `scribelm.embed`). dtype: what the model computes in —
        None its own, "float32", "bfloat16", or "auto" (bfloat16 on CPUs that have it natively)."""
        from scribelm.embed import embed

        return embed(self, texts, pooling=pooling, normalize=normalize, batch_size=batch_size, dtype=dtype)

    def apply_adapter(self, directory: str | os.PathLike) -> "LM":
        """Put saved LoRA adapters (a `scribe finetune lora` result, or a peft adapter
        directory) on this model, in place and unmerged: the base weights stay as they are,
        each wrapped layer adds its low-rank correction. Returns self.

        Merging first (`scribelm.adapters.merge_lora`) gives the same outputs at the base
        model's speed; unmerged, one base serves with or without its adapters."""
        from scribelm.adapters.load import load_adapters
        from scribelm.adapters.lora import read_any_adapter_config

        meta = read_any_adapter_config(directory)
        load_adapters(self.model, directory)
        self.model.eval()
        if meta.get("chat_tuned"):
            self.generation_config = {**self.generation_config, CHAT_TUNED_KEY: True}
        return self

    @property
    def chat_tuned(self) -> bool:
        """Whether the model was fine-tuned on conversations, as far as its files tell:
        generation.json's "chat_tuned" (written by `scribe finetune`), else a chat template
        its maker chose (a Hugging Face instruct model). scribelm's built-in template, which
        every tokenizer trained here gets, says nothing about the weights."""
        from scribelm.tokenizer import DEFAULT_CHAT_TEMPLATE

        recorded = (self.generation_config or {}).get(CHAT_TUNED_KEY)
        if isinstance(recorded, bool):
            return recorded
        template = self.tokenizer.chat_template if self.tokenizer is not None else None
        return bool(template) and template != DEFAULT_CHAT_TEMPLATE

    def save(self, path: str | os.PathLike, format: str = "scribe", **options: Any) -> Path:
        """Write a checkpoint directory: format "scribe" (native) or "hf" (Hugging Face; options:
        max_shard_size, architecture — see `scribelm.interop.hf.save_hf`)."""
        if format == "hf":
            from scribelm.interop.hf import save_hf

            return save_hf(self, path, **options)
        if format != "scribe":
            raise ScribeError(f"unknown save format {format!r}; supported: 'scribe', 'hf'")
        if options:
            raise ScribeError(f"unknown option(s) for the scribe format: {', '.join(sorted(options))}")
        return save_checkpoint(path, self.model, self.config, self.tokenizer, self.generation_config)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         adapter: str | os.PathLike | None = None) -> LM:
    """Load a scribelm checkpoint directory, a Hugging Face model directory
    (GPT-2, Llama, Mistral, Qwen2; converted on the fly) or a GGUF file
    (scribelm.interop.gguf_load), as an `LM`. `device` may be
    "auto" (the first accelerator there is, else the CPU). `adapter`: a LoRA adapter
    directory put on top without merging (see `LM.apply_adapter`)."""
    from scribelm.devices import resolve_device

    lm = _load_base(path, resolve_device(device), dtype)
    if adapter is not None:
        lm.apply_adapter(adapter)
    return lm


def _load_base(path: str | os.PathLike, device: str, dtype: torch.dtype | None) -> LM:
    given = Path(path).expanduser()
    if given.exists() and not given.is_dir() and gguf_file(given) is None:
        raise CheckpointError(f"{given} is a file; give the checkpoint directory that holds config.json, or a GGUF file")
    path = find_model_path(given)  # a directory, else a name in the local store (`scribe models add`)
    if path is None:
        raise CheckpointError(
            f"no model at {given}: give a checkpoint directory, a Hugging Face model directory, a GGUF file "
            "or a name from `scribe models list`"
        )
    gguf = gguf_file(path)  # a GGUF file, or a store entry holding one
    if gguf is not None:
        from scribelm.interop.gguf_load import load_gguf_parts

        model, tokenizer, generation = load_gguf_parts(gguf, device=device, dtype=dtype)
        return LM(model=model, tokenizer=tokenizer, generation_config=generation)
    if not is_scribe_checkpoint(path) and (path / "config.json").is_file():
        from scribelm.interop.hf import is_hf_directory, load_hf_parts

        if is_hf_directory(path):
            from scribelm.embed import read_sentence_config

            sentence = read_sentence_config(path)
            model, tokenizer, generation = load_hf_parts(path, device=device, dtype=dtype)
            return LM(model=model, tokenizer=tokenizer, generation_config=generation, sentence_config=sentence)
        # otherwise read_config gives the precise reason (corrupt JSON, foreign format, ...)
    # the small side files first: a mistake in them is reported before the weights are read
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    generation = read_generation(path)
    model = load_model(path, device=device, dtype=dtype)
    model.eval()
    return LM(model=model, tokenizer=tokenizer, generation_config=generation)
