"""Cutting documents into chunks a retriever can rank and a model can read.

    text ──paragraphs (blank lines)──▶ sentences (. ! ? then space)──▶ words (only
         for a sentence longer than a chunk) ──greedy packing──▶ chunks of at most
         `chunk_tokens` tokens, each starting `overlap` tokens (whole sentences)
         before the previous one ended

Sizes are counted in tokens of a tokenizer (the answering model's, or the embedder's
by default) because that is what a context budget is measured in. A chunk never
cuts a sentence unless that one sentence is longer than a chunk; its text is always
the exact slice `document.text[start:end]`, so the offsets point into the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scribelm.errors import ScribeError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Span:
    """A piece of a document: text[start:end], `tokens` long, `paragraph_start` if a paragraph begins here."""

    start: int
    end: int
    tokens: int
    paragraph_start: bool


def _pieces(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """(start, end) of the non-blank pieces of text[start:end] between matches of `pattern`."""
    out, at = [], start
    for match in pattern.finditer(text, start, end):
        out.append((at, match.start()))
        at = match.end()
    out.append((at, end))
    return [(a + len(text[a:b]) - len(text[a:b].lstrip()), a + len(text[a:b].rstrip()))
            for a, b in out if text[a:b].strip()]


def sentence_spans(text: str, count_tokens: Callable[[Sequence[str]], list[int]], chunk_tokens: int,
                   start: int = 0, end: int | None = None) -> list[Span]:
    """The sentences of text[start:end] with their token counts; a sentence longer than a
    chunk is split between words into pieces that fit."""
    end = len(text) if end is None else end
    sentences: list[tuple[int, int, bool]] = []
    for p_start, p_end in _pieces(text, start, end, _PARAGRAPH_BREAK):
        for i, (s_start, s_end) in enumerate(_pieces(text, p_start, p_end, _SENTENCE_END)):
            sentences.append((s_start, s_end, i == 0))
    counts = count_tokens([text[a:b] for a, b, _ in sentences]) if sentences else []
    spans: list[Span] = []
    for (a, b, first), tokens in zip(sentences, counts):
        if tokens <= chunk_tokens:
            spans.append(Span(a, b, tokens, first))
            continue
        words = [(m.start(), m.end()) for m in _WORD.finditer(text, a, b)]
        word_tokens = count_tokens([text[x:y] for x, y in words])
        piece_start, piece_tokens, prev_end = words[0][0], 0, words[0][1]
        for (x, y), n in zip(words, word_tokens):
            if piece_tokens and piece_tokens + n > chunk_tokens:
                spans.append(Span(piece_start, prev_end, piece_tokens, first))
                first, piece_start, piece_tokens = False, x, 0
            piece_tokens += n
            prev_end = y
        spans.append(Span(piece_start, prev_end, piece_tokens, first))
    return spans


def pack(spans: list[Span], chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy packing of consecutive spans into (start, end) chunks of at most `chunk_tokens`
    tokens (by the spans' counts); each chunk after the first repeats the last whole spans
    of the one before, up to `overlap` tokens. A chunk that is at least half full ends
    before a new paragraph rather than running into it."""
    chunks: list[tuple[int, int]] = []
    i = 0
    while i < len(spans):
        j, total = i, 0
        while j < len(spans) and (j == i or total + spans[j].tokens <= chunk_tokens):
            if j > i and spans[j].paragraph_start and total >= chunk_tokens // 2 and \
                    not _fits_paragraph(spans, j, chunk_tokens - total):
                break
            total += spans[j].tokens
            j += 1
        chunks.append((spans[i].start, spans[j - 1].end))
        if j >= len(spans):
            break
        back, kept = j, 0  # step back over whole spans for the overlap, always moving forward
        while back - 1 > i and kept + spans[back - 1].tokens <= overlap:
            back -= 1
            kept += spans[back].tokens
        i = back
    return chunks


def _fits_paragraph(spans: list[Span], j: int, room: int) -> bool:
    """Whether the paragraph starting at spans[j] fits in `room` tokens whole."""
    total = spans[j].tokens
    for span in spans[j + 1:]:
        if span.paragraph_start:
            break
        total += span.tokens
    return total <= room


def chunk_text(text: str, count_tokens: Callable[[Sequence[str]], list[int]], *, chunk_tokens: int,
               overlap: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) character offsets of the chunks of text[start:end]."""
    check_sizes(chunk_tokens, overlap)
    return pack(sentence_spans(text, count_tokens, chunk_tokens, start, end), chunk_tokens, overlap)


def check_sizes(chunk_tokens: int, overlap: int) -> None:
    for name, value in (("chunk_tokens", chunk_tokens), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ScribeError(f"{name} must be a non-negative integer, got {value!r}")
    if chunk_tokens < 8:
        raise ScribeError(f"chunk_tokens must be at least 8, got {chunk_tokens}")
    if overlap >= chunk_tokens:
        raise ScribeError(f"overlap ({overlap}) must be smaller than chunk_tokens ({chunk_tokens})")


def token_counter(tokenizer) -> Callable[[Sequence[str]], list[int]]:
    """A function counting the tokens of each text with a scribelm Tokenizer (no special tokens;
    a copy of its backend without the padding or truncation a tokenizer file may switch on)."""
    from scribelm.embed import encoder_backend

    backend = encoder_backend(tokenizer, 0, truncate=False)  # kept per tokenizer

    def count(texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)] if texts else []

    return count
