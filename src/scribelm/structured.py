"""Structured output: generation that can only write what a grammar allows.

A JSON schema, a regular expression or a Lark grammar becomes a matcher that
follows the text token by token. Before each token is chosen, every token the
grammar does not allow next gets logit -inf, so whatever the sampler does
(greedy, temperature, top-p), the result parses. Even a random-init model
writes valid JSON this way; a trained one writes valid JSON it means.

    logits (V,) of one row
        │ matcher.compute_bitmask()        which tokens may come next (1 bit per token)
        │ masked_fill(not allowed, -inf)
        ▼ choose as usual, then matcher.consume(token)
    the grammar complete (nothing more may follow)  ->  the row ends with "stop"
    complete but more allowed (e.g. a number)       ->  EOS is allowed and ends it

The grammar engine is llguidance (MIT license, Rust with Python bindings, the
engine behind OpenAI-style structured outputs in several servers): it computes a
mask in tens of microseconds on CPU for typical vocabularies, compiles JSON
schemas lazily (no up-front automaton over the whole vocabulary) and reports a
schema it cannot handle with a message, which the server returns as a 400.

JSON is generated compact (no optional whitespace), so a random model cannot
spend its whole budget on spaces.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from scribelm.errors import ScribeError

__all__ = ["GrammarConstraint", "StructuredOutputError", "check_grammar", "grammar_from_json_schema",
           "grammar_from_lark", "grammar_from_regex", "grammar_tokenizer"]

_COMPACT_JSON = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)  # (32,): bit positions within one mask word


class StructuredOutputError(ScribeError):
    """A schema, regex or grammar that cannot be compiled (or one the output broke)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise StructuredOutputError("structured output needs llguidance: pip install llguidance") from None
    return llguidance


def grammar_from_json_schema(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON valid under `schema` (None: any JSON object, OpenAI's json_object mode)."""
    llg = _llguidance()
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                      defaults=_COMPACT_JSON)
    except (ValueError, TypeError, RuntimeError) as err:
        raise StructuredOutputError(f"the JSON schema cannot be used: {err}") from None


def grammar_from_regex(regex: str) -> str:
    return _llguidance().LLMatcher.grammar_from_regex(regex)


def grammar_from_lark(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


_tokenizers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer):
    """llguidance's view of our tokenizer (its vocabulary as bytes), built once per tokenizer."""
    with _tokenizers_lock:
        found = _tokenizers.get(tokenizer)
        if found is None:
            llg = _llguidance()
            eos = tokenizer.eos_id
            found = llg.LLTokenizer(tokenizer.backend.to_str(), eos_token=eos)
            _tokenizers[tokenizer] = found
        return found


def check_grammar(grammar: str, tokenizer) -> None:
    """Refuse a grammar the engine cannot compile, with the engine's own message (one line)."""
    llg = _llguidance()
    error = llg.LLMatcher.validate_grammar(grammar, grammar_tokenizer(tokenizer))
    if error:
        raise StructuredOutputError("the grammar cannot be compiled: " + " ".join(error.split()))


class GrammarConstraint:
    """One sequence's matcher: masks its logits before each choice and follows each chosen token."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int) -> None:
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.matcher = llg.LLMatcher(grammar_tokenizer(tokenizer), grammar)
        if self.matcher.is_error():
            raise StructuredOutputError("the grammar cannot be compiled: " + " ".join(self.matcher.get_error().split()))

    def allowed(self) -> torch.Tensor:
        """(V,) booleans: the tokens the grammar allows next (ids past the tokenizer's vocabulary never)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # (W,)
        bits = ((words[:, None] >> _BITS) & 1).flatten().bool()  # (32 W,)
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.numel())
        allowed[:n] = bits[:n]
        return allowed

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens of one row's logits (V,) to -inf, in place."""
        logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise StructuredOutputError(f"token {token} does not fit the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing more may be written: the output is complete."""
        return self.matcher.is_stopped()

