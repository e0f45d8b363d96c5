"""Text to ids and back: a byte-level BPE tokenizer.

Byte-level BPE (GPT-2's scheme) first maps text to its UTF-8 bytes, so every
string can be represented and nothing is ever "unknown"; then it merges the
most frequent adjacent pairs, learned from a corpus, into larger tokens. The
round trip text -> ids -> text is exact for any Unicode string.

The heavy lifting is done by the Hugging Face `tokenizers` library (Rust);
this module trains and wraps it, adds special tokens that plain text can
never produce, and renders chat conversations with a Jinja chat template.

A chat template writes control tokens (`<|user|>`, `<|end|>`, ChatML's
`<|im_start|>` ...) around each message. Only the template may write them:
the same strings typed inside a message are encoded as the plain text they
are, so no user can end a turn or open a system turn by typing one. The
conversation is rendered once with each such string in the messages swapped
for a private marker; whatever special tokens the output then holds are the
template's, and the markers turn back into text (`render_chat`, `encode_chat`).

Files: `tokenizer.json` (the `tokenizers` format, so any Hugging Face
tokenizer loads) and `tokenizer_config.json` (special tokens and chat
template, in the same shape Hugging Face uses).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from scribelm.errors import TokenizerError
from scribelm.io import read_json_object

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]

#: Renders [{role, content}, ...]; roles other than system/user/assistant are refused.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; the chat template knows system, user and assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Names other tokenizers use for their beginning/end/padding tokens, most specific first.
_BOS_NAMES = [BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"]
_EOS_NAMES = [EOS, "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>"]
_PAD_NAMES = [PAD, "<pad>", "<|finetune_right_pad_id|>"]


def _check_text(text: Any, what: str = "text") -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TokenizerError(
            f"{what} contains an unpaired surrogate ({text[err.start]!r} at index {err.start}), which is not valid "
            "Unicode; decode your bytes with errors='replace' or remove it"
        ) from None
    return text


class Tokenizer:
    """A byte-level BPE tokenizer with special tokens and a chat template."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        # Special tokens typed in plain text are split like any other text: only
        # `allow_special=True` (chat rendering) may produce their ids.
        self.backend.encode_special_tokens = True
        vocab = backend.get_vocab(with_added_tokens=True)
        self.bos_token = bos_token if bos_token is not None else next((t for t in _BOS_NAMES if t in vocab), None)
        self.eos_token = eos_token if eos_token is not None else next((t for t in _EOS_NAMES if t in vocab), None)
        self.pad_token = pad_token if pad_token is not None else next((t for t in _PAD_NAMES if t in vocab), None)
        self.chat_template = chat_template
        self.extra_config = dict(extra_config or {})

    # -- training ---------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts_or_files: Iterable[str] | Sequence[str | os.PathLike],
        vocab_size: int = 8192,
        *,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
        files: bool | None = None,
        show_progress: bool = False,
    ) -> "Tokenizer":
        """Learn BPE merges from an iterator of strings or a list of file and folder paths
        (see `training_files`; JSONL and Parquet files give their "text" field).

        The 256 byte symbols are always in the vocabulary, so any text encodes.
        """
        n_special = len(special_tokens)
        if vocab_size < 256 + n_special:
            raise TokenizerError(f"vocab_size must be at least {256 + n_special} (256 bytes + special tokens), got {vocab_size}")
        backend = _HFTokenizer(models.BPE())
        # GPT-2's split (contractions, letters, digits, punctuation, spaces), then bytes.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        if files is None:
            files = isinstance(texts_or_files, (list, tuple)) and all(
                isinstance(f, (os.PathLike, str)) and _is_file(f, folders=True) for f in texts_or_files
            ) and len(texts_or_files) > 0
        if files:
            paths = training_files(texts_or_files)
            if all(_is_plain_text(p) for p in paths):
                backend.train([str(p) for p in paths], trainer)  # read in parallel by the tokenizers library
            else:  # JSONL / Parquet: their text fields, read the way `scribe prepare` reads them
                from scribelm.data.sources import iter_clean_documents

                backend.train_from_iterator((text for text, _ in iter_clean_documents(paths)), trainer)
        else:
            backend.train_from_iterator((_check_text(t) for t in texts_or_files), trainer)
        return cls(backend, chat_template=DEFAULT_CHAT_TEMPLATE if ASSISTANT in special_tokens else None)

    # -- facts ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def special_ids(self) -> set[int]:
        return {tok.content and self.backend.token_to_id(tok.content) for tok in self.backend.get_added_tokens_decoder().values() if tok.special}

    # -- encode / decode ----------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` stay plain text unless `allow_special`."""
        _check_text(text)
        backend = self._control_backend() if allow_special else self.backend
        ids = backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids = [self._required_id("bos")] + ids
        if add_eos:
            ids = ids + [self._required_id("eos")]
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        for t in texts:
            _check_text(t)
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self._required_id("bos")] if add_bos else []
        suffix = [self._required_id("eos")] if add_eos else []
        return [prefix + e.ids + suffix for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text. Bytes that do not form complete UTF-8 characters come out as U+FFFD."""
        ids = self._check_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([self._check_ids(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes the ids stand for (no replacement of incomplete characters),
        for streaming text out one token at a time."""
        out = bytearray()
        for i in self._check_ids(ids):
            out += self.token_bytes(i)
        return bytes(out)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its text)."""
        cache = self.__dict__.setdefault("_token_bytes", {})
        if token_id not in cache:
            cache[token_id] = _token_to_bytes(self, token_id)
        return cache[token_id]

    def tokens(self, text: str) -> list[str]:
        """The token strings of `text` as text (bytes shown decoded where whole)."""
        return [self.decode([i]) for i in self.encode(text)]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0..{n - 1})")
        return ids

    def _required_id(self, which: str) -> int:
        value = getattr(self, f"{which}_id")
        if value is None:
            raise TokenizerError(f"this tokenizer has no {which.upper()} token; add one when training it")
        return value

    # -- chat -----------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation [{role, content}, ...] as the model's prompt text.

        The text shows special-token strings typed in messages as they are; encode the
        conversation with `encode_chat`, which keeps them plain text, not with
        `encode(..., allow_special=True)`, which would turn them into control tokens."""
        _check_messages(messages)
        return self.render_chat(messages, add_generation_prompt=add_generation_prompt).text

    def encode_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """A conversation as the ids the model reads: the template's own markup gives
        control tokens, message text never does (a user cannot forge a turn)."""
        _check_messages(messages)
        return self.encode_rendered(self.render_chat(messages, add_generation_prompt=add_generation_prompt))[0]

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> "RenderedChat":
        """Render with the chat template, keeping track of which special tokens the template
        wrote. An empty list renders what the template writes before any message.

        Every special-token string inside a message is swapped for a private marker before
        rendering and swapped back after, so whatever the template does with the text (strip
        it, split it, quote it) the special tokens left in the output are its own."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template; set one in tokenizer_config.json")
        _check_messages(messages, allow_empty=True)
        specials = self._special_strings()
        bos, eos = self.bos_token or "", self.eos_token or ""
        typed: list[str] = []  # special-token strings found in messages, by marker number
        marker = ""  # chosen when first needed: most conversations hold no special-token string
        special_pattern = _alternation(specials)

        def escape(value: Any) -> Any:
            if isinstance(value, str):
                if special_pattern is None:
                    return value

                def swap(match: "re.Match[str]") -> str:
                    nonlocal marker
                    marker = marker or _marker_char(self.chat_template + bos + eos, messages)
                    typed.append(match.group(0))
                    return f"{marker}{len(typed) - 1}{marker}"

                return special_pattern.sub(swap, value)
            if isinstance(value, dict):
                return {k: escape(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [escape(v) for v in value]
            return value

        escaped = [escape(m) for m in messages]
        rendered = _render_template(self.chat_template, messages=escaped, add_generation_prompt=add_generation_prompt,
                                    bos_token=bos, eos_token=eos)
        if not typed:  # nothing to swap back: every special token in the text is the template's
            return RenderedChat(rendered, _find_controls(rendered, special_pattern), escaped=False)
        pieces: list[str] = []
        controls: list[tuple[int, int]] = []
        at = length = 0
        for match in re.finditer(rf"{re.escape(marker)}(\d+){re.escape(marker)}|{special_pattern.pattern}", rendered):
            pieces.append(rendered[at:match.start()])
            length += match.start() - at
            if match.group(1) is not None:
                piece = typed[int(match.group(1))]
            else:
                piece = match.group(0)
                controls.append((length, length + len(piece)))
            pieces.append(piece)
            length += len(piece)
            at = match.end()
        pieces.append(rendered[at:])
        text = "".join(pieces)
        if marker in text:
            raise TokenizerError("the chat template cut through a special-token string typed in a message; "
                                 "remove it from the message or use a template that keeps message text whole")
        return RenderedChat(text, tuple(controls), escaped=True)

    def encode_rendered(self, rendered: "RenderedChat") -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets into rendered.text) of a rendered conversation: its control
        spans become special tokens, every other character is encoded as plain text."""
        if not rendered.escaped:
            # No message held a special-token string: the whole text in one pass, exactly as
            # `transformers` tokenizes a rendered template (same ids at every boundary).
            encoding = self._control_backend().encode(rendered.text, add_special_tokens=False)
            return encoding.ids, encoding.offsets
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        text = rendered.text
        stripping = {t.content: t for t in self.backend.get_added_tokens_decoder().values() if t.lstrip or t.rstrip}
        at = 0
        for start, end in list(rendered.controls) + [(len(text), len(text))]:
            control = text[start:end]
            token = stripping.get(control) if control else None
            if token is not None:  # such a token takes the whitespace beside it, as in one pass
                while token.lstrip and start > at and text[start - 1].isspace():
                    start -= 1
                while token.rstrip and end < len(text) and text[end].isspace():
                    end += 1
            if start > at:  # plain text, special-token strings in it included, never parsed as controls
                backend = self.backend if at == 0 else self._continuation_backend()
                encoding = backend.encode(text[at:start], add_special_tokens=False)
                ids += encoding.ids
                offsets += [(at + a, at + b) for a, b in encoding.offsets]
            if control:
                ids.append(self.backend.token_to_id(control))
                offsets.append((start, end))
            at = end
        return ids, offsets

    def _control_backend(self) -> _HFTokenizer:
        """A copy of the backend that reads special-token strings as control tokens. The
        shared backend's flag is never switched: a server encodes from many threads at
        once, and a switch seen by another thread's plain-text encode would let typed
        text become control ids. Remade when tokens have been added since."""
        size = self.backend.get_vocab_size(with_added_tokens=True)
        cached = self.__dict__.get("_control")
        if cached is None or cached[0] != size:
            control = _HFTokenizer.from_str(self.backend.to_str())
            control.encode_special_tokens = False
            cached = (size, control)
            self.__dict__["_control"] = cached
        return cached[1]

    def _continuation_backend(self) -> _HFTokenizer:
        """The backend for text that does not start the input: the same one, unless its
        Metaspace pre-tokenizer prepends "▁" to the first piece only (SentencePiece's
        prepend_scheme "first"); then a copy that never prepends, as one pass over the
        whole text would not there."""
        cached = self.__dict__.get("_continuation")
        if cached is None:
            spec = json.loads(self.backend.to_str())
            cached = self.backend
            if _never_prepend(spec.get("pre_tokenizer")):
                cached = _HFTokenizer.from_str(json.dumps(spec))
                cached.encode_special_tokens = True
            self.__dict__["_continuation"] = cached
        return cached

    def _special_strings(self) -> tuple[str, ...]:
        """The texts of the special (control) tokens: what plain text must never turn into."""
        return tuple(sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content}))

    # -- files ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = dict(self.extra_config)
        config.update(
            {
                "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "pad_token": self.pad_token,
                "chat_template": self.chat_template,
            }
        )
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a directory (tokenizer.json [+ tokenizer_config.json]) or a tokenizer.json file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"no tokenizer found at {path} (expected a tokenizer.json file or a directory holding one)")
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise TokenizerError(f"{file} is not a valid JSON tokenizer file ({err}); re-create it with `scribe tokenizer train`") from None
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as err:  # the Rust library raises its own Exception type
            raise TokenizerError(f"{file} is not a tokenizer the `tokenizers` library can read: {err}") from None
        config: dict[str, Any] = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            config = read_json_object(config_file, TokenizerError, missing="", invalid_hint="; save it as UTF-8 JSON")
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            if value is not None and not isinstance(value, str) and not (isinstance(value, dict) and isinstance(value.get("content"), str)):
                raise TokenizerError(f"{config_file}: '{key}' must be a token string, got {type(value).__name__} {value!r}")
        bos, eos, pad = (_token_name(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{config_file}: 'chat_template' must be a string (or a list of named templates), "
                                 f"got {type(template).__name__}")
        extra = {k: v for k, v in config.items() if k not in ("bos_token", "eos_token", "pad_token", "chat_template")}
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template, extra_config=extra)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _is_file(candidate: str | os.PathLike, *, folders: bool = False) -> bool:
    """True for an existing file (or, with `folders`, directory); False for text that merely
    looks like a path (or is too long for one)."""
    if isinstance(candidate, str) and ("\n" in candidate or len(candidate) > 4096):
        return False
    try:
        path = Path(candidate)
        return path.is_file() or (folders and path.is_dir())
    except (OSError, ValueError):
        return False


def training_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files a tokenizer trains on: files as given, folders expanded exactly as `scribe
    prepare` expands them (recursively, sorted, hidden files skipped), each checked to be
    non-empty text before any work starts."""
    from scribelm.data.sources import DataError, find_input_files

    for item in inputs:
        if not Path(item).exists():
            raise TokenizerError(f"training input not found: {item} (give text, JSONL or Parquet files, or folders of them)")
    try:
        return find_input_files(inputs)
    except DataError as err:
        raise TokenizerError(str(err)) from None


def _is_plain_text(path: Path) -> bool:
    from scribelm.data.sources import JSONL_SUFFIXES, PARQUET_SUFFIXES

    return path.suffix.lower() not in JSONL_SUFFIXES + PARQUET_SUFFIXES


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # HF's AddedToken serialisation
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered by its chat template.

    text      the prompt text (special-token strings typed in messages appear as typed)
    controls  (start, end) character spans of the special tokens the template itself wrote
    escaped   whether any message held a special-token string (then only `controls` are control tokens)
    """

    text: str
    controls: tuple[tuple[int, int], ...]
    escaped: bool


def _check_messages(messages: Any, *, allow_empty: bool = False) -> None:
    if not isinstance(messages, (list, tuple)) or not (messages or allow_empty):
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TokenizerError(f"message {i} must have a string 'role' and a string 'content'")
        _check_text(m["content"], f"message {i} content")


@functools.lru_cache(maxsize=16)
def _alternation(specials: tuple[str, ...]) -> "re.Pattern[str] | None":
    """One pattern matching any of `specials`, longest first (as the tokenizer matches them)."""
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


def _find_controls(text: str, pattern: "re.Pattern[str] | None") -> tuple[tuple[int, int], ...]:
    return () if pattern is None else tuple(m.span() for m in pattern.finditer(text))


def _never_prepend(spec: Any) -> bool:
    """Turn every Metaspace prepend_scheme "first" in a pre-tokenizer spec into "never", in place;
    True if one was found."""
    if not isinstance(spec, dict):
        return False
    found = spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first"
    if found:
        spec["prepend_scheme"] = "never"
    for inner in spec.get("pretokenizers") or []:
        found = _never_prepend(inner) or found
    return found


def _marker_char(template: str, messages: Any) -> str:
    """A private-use character that occurs neither in the template nor in any message."""
    seen = set(template)
    seen.update(json.dumps(messages, ensure_ascii=False, default=str))
    for code in range(0xE000, 0xF900):
        if chr(code) not in seen:
            return chr(code)
    raise TokenizerError("the messages use every private-use character, so their special-token strings cannot be kept apart")


def _render_template(template: str, **context: Any) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The environment transformers renders chat templates in (loop controls, unescaped tojson,
    # strftime_now, tools/documents defined), so a model's own template gives the same prompt.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    context.setdefault("tools", None)
    context.setdefault("documents", None)
    try:
        return env.from_string(template).render(**context)
    except TemplateError as err:
        raise TokenizerError(f"chat template failed to render: {err}") from None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes)}


_BYTE_DECODER = _byte_decoder()


def _token_to_bytes(tok: Tokenizer, token_id: int) -> bytes:
    piece = tok.backend.id_to_token(token_id)
    if piece is None:
        raise TokenizerError(f"token id {token_id} is outside the vocabulary")
    added = tok.backend.get_added_tokens_decoder().get(token_id)
    if added is not None:
        return added.content.encode("utf-8")
    if all(ch in _BYTE_DECODER for ch in piece):  # byte-level BPE (GPT-2, Llama 3, ours)
        return bytes(_BYTE_DECODER[ch] for ch in piece)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode("utf-8")  # SentencePiece word piece


def iter_text_files(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    for p in paths:
        yield Path(p).read_text(encoding="utf-8")
