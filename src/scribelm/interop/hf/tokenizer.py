"""The tokenizer of a Hugging Face model directory: tokenizer.json, or GPT-2's original
vocab.json + merges.txt, with the chat template from tokenizer_config.json or
chat_template.jinja."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scribelm.errors import CheckpointError
from scribelm.io import read_json_object
from scribelm.tokenizer import Tokenizer


def _gpt2_vocab_merges_tokenizer(path: Path):
    """GPT-2's original tokenizer files (vocab.json + merges.txt) as the byte-level BPE
    that transformers builds from them: same merges, same pre-tokenizer, same specials."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    config: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        config = read_json_object(path / "tokenizer_config.json", CheckpointError, missing="")
    try:
        backend = Backend(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    except Exception as err:  # the Rust library raises its own Exception type
        raise CheckpointError(f"vocab.json / merges.txt in {path} cannot be read as a BPE tokenizer: {err}") from None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

    def name(value: Any) -> str | None:
        return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None

    specials = {name(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials |= {name(t) for t in (config.get("added_tokens_decoder") or {}).values() if isinstance(t, dict) and t.get("special")}
    specials.discard(None)
    if not specials and backend.token_to_id("<|endoftext|>") is not None:
        specials = {"<|endoftext|>"}  # GPT-2's one special token, its BOS and EOS
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials)])
    bos = name(config.get("bos_token")) or ("<|endoftext|>" if "<|endoftext|>" in specials else None)
    eos = name(config.get("eos_token")) or bos
    template = config.get("chat_template")
    extra = {k: v for k, v in config.items() if k not in ("bos_token", "eos_token", "pad_token", "chat_template")}
    extra["tokenizer_class"] = "GPT2Tokenizer"
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=name(config.get("pad_token")),
                     chat_template=template if isinstance(template, str) else None, extra_config=extra)


def load_tokenizer(path: Path):
    if not (path / "tokenizer.json").is_file():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tokenizer = _gpt2_vocab_merges_tokenizer(path)
        else:
            return None  # e.g. only a SentencePiece tokenizer.model: the model loads, text needs a tokenizer.json
    else:
        tokenizer = Tokenizer.load(path)
    template_file = path / "chat_template.jinja"  # where transformers >= 4.43 saves it
    if not tokenizer.chat_template and template_file.is_file():
        try:
            tokenizer.chat_template = template_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{template_file} is not UTF-8 text ({err})") from None
    return tokenizer
