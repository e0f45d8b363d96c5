"""The tokenizer inside a GGUF file, rebuilt as a `tokenizers` tokenizer that splits
text exactly as llama.cpp does.

GGUF stores a tokenizer as data, and llama.cpp runs one of two algorithms on it,
named by `tokenizer.ggml.model`:

    gpt2    byte-level BPE (GPT-2, Llama 3, Qwen2, scribelm's own): text is split by
            a regex named by `tokenizer.ggml.pre`, each piece is mapped to bytes
            shown as printable characters, then the listed merges apply in order.
            `tokenizers` has the same model: BPE(vocab, merges) after the same split.
    llama   SentencePiece-style (Llama 2, Mistral): spaces become "▁", one "▁" is put
            in front, the text starts as single characters and the adjacent pair
            whose concatenation is a token with the highest *score* merges first;
            a character no token covers becomes its UTF-8 bytes as <0xXX> tokens.
            A BPE whose merge list is every (left, right) split of every token,
            ranked by that token's score, merges the same pairs in the same order
            (as transformers converts SentencePiece models), with byte fallback.

Token types say which tokens are special: CONTROL tokens (BOS, EOS, chat markers)
are special added tokens, USER_DEFINED ones plain added tokens, matched whole.
The chat template is `tokenizer.chat_template`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scribelm.interop.gguf import LLAMA3_REGEX, PRE_TOKENIZER_NAMES
from scribelm.interop.gguf_reader import GGUFError, GGUFFile
from scribelm.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's names of pre-tokenizer regexes -> the regex (None: GPT-2's own, built into ByteLevel);
# the export's table (interop/gguf.py) read the other way, so the two cannot drift apart
PRE_TOKENIZERS: dict[str, str | None] = {
    "gpt-2": None, "default": None, "llama3": LLAMA3_REGEX, **{name: rx for rx, name in PRE_TOKENIZER_NAMES.items()},
}


def tokenizer_from_gguf(f: GGUFFile) -> Tokenizer | None:
    """The file's tokenizer (None when it carries none), or a GGUFError naming what is not supported."""
    kind = f.string("tokenizer.ggml.model")
    if kind is None or kind == "none":
        return None
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{f.path}: tokenizer.ggml.tokens is missing or not a list of strings")
    types = _per_token(f, "tokenizer.ggml.token_type", len(tokens), default=NORMAL)
    if kind == "gpt2":
        backend = _byte_level_bpe(f, tokens)
    elif kind == "llama":
        scores = _per_token(f, "tokenizer.ggml.scores", len(tokens), default=None)
        if not all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in scores):
            raise GGUFError(f"{f.path}: tokenizer.ggml.scores holds something other than numbers")
        backend = _sentencepiece_bpe(f, tokens, [float(x) for x in scores], types)
    else:
        raise GGUFError(f"{f.path}: tokenizer model {kind!r} is not supported (scribelm reads 'gpt2' byte-level BPE "
                        "and 'llama' SentencePiece-style vocabularies)")
    _add_special_tokens(backend, tokens, types)

    def token(key: str) -> str | None:
        index = f.integer(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    extra: dict[str, Any] = {}
    add_bos = f.metadata.get("tokenizer.ggml.add_bos_token")
    if isinstance(add_bos, bool):
        extra["add_bos_token"] = add_bos
    bos, eos, pad = token("bos"), token("eos"), token("padding")
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad,
                     chat_template=f.string("tokenizer.chat_template"), extra_config=extra)


def _per_token(f: GGUFFile, key: str, n: int, default) -> list:
    values = f.metadata.get(key)
    if values is None:
        if default is None:
            raise GGUFError(f"{f.path}: {key} is missing; a 'llama' vocabulary needs a score per token")
        return [default] * n
    if not isinstance(values, (list, np.ndarray)) or len(values) != n:
        raise GGUFError(f"{f.path}: {key} should be a list of {n} entries, one per token")
    return list(values)


def _byte_level_bpe(f: GGUFFile, tokens: list[str]):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    pre = f.string("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{f.path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)}); "
                        "its text splits would differ from llama.cpp's")
    merges = f.metadata.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list):
        raise GGUFError(f"{f.path}: tokenizer.ggml.merges should be a list of strings")
    pairs = []
    for merge in merges:
        left, space, right = merge.partition(" ") if isinstance(merge, str) else ("", "", "")
        if not space:
            raise GGUFError(f"{f.path}: tokenizer.ggml.merges holds {merge!r}, not two tokens separated by a space")
        pairs.append((left, right))
    vocab = _vocabulary(tokens)
    try:
        backend = Backend(models.BPE(vocab, pairs))
    except Exception as err:  # the Rust library raises its own Exception type
        raise GGUFError(f"{f.path}: the BPE vocabulary and merges do not fit together ({err})") from None
    regex = PRE_TOKENIZERS[pre]
    if regex is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str], scores: list[float], types: list[int]):
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as Backend

    vocab = _vocabulary(tokens)
    ranked = []  # (-score of the merged token, its id, left id, right id, left, right)
    for token, index in vocab.items():
        if types[index] == BYTE:
            continue  # <0xXX> pieces are reached by byte fallback, never by merging
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], index, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    unk_id = f.integer("tokenizer.ggml.unknown_token_id")
    if unk_id is not None and 0 <= unk_id < len(tokens):
        unk = tokens[unk_id]
    try:
        model = models.BPE(vocab, [(r[4], r[5]) for r in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True)
    except Exception as err:
        raise GGUFError(f"{f.path}: the 'llama' vocabulary cannot be read as merges ({err})") from None
    backend = Backend(model)
    steps = [normalizers.Replace(" ", "▁")]
    if f.metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return backend


def _vocabulary(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a repeated string keeps its first id, as llama.cpp's lookup does
    return vocab


def _add_special_tokens(backend, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken

    added = [AddedToken(tokens[i], special=t in (CONTROL, UNKNOWN), normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN) and tokens[i]]
    if added:
        backend.add_tokens(added)
