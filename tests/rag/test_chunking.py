"""Chunking by tokens: exact offsets, size limits, whole sentences, overlap."""

from __future__ import annotations

import re

import pytest

from scribelm.errors import ScribeError
from scribelm.rag.chunking import chunk_text, token_counter
from tests.trained_tiny import kjv_verses


@pytest.fixture(scope="module")
def text():
    verses = kjv_verses()[:120]
    paragraphs = [" ".join(verses[i:i + 6]) for i in range(0, len(verses), 6)]
    long_sentence = " ".join(["and the waters prevailed upon the earth"] * 40)  # one sentence longer than a chunk
    return "\n\n".join(paragraphs[:10] + [long_sentence + "."] + paragraphs[10:])


def test_chunks_are_exact_slices_within_the_budget(minilm, text):
    count = token_counter(minilm.tokenizer)
    chunks = chunk_text(text, count, chunk_tokens=64, overlap=16)
    assert len(chunks) > 10
    assert chunks[0][0] == 0 and chunks[-1][1] == len(text.rstrip())
    sizes = count([text[a:b] for a, b in chunks])
    # counted per sentence, packed; the joined slice may differ from the sum by a token or two at joins
    assert max(sizes) <= 64 + 4
    for (a, b), (c, d) in zip(chunks, chunks[1:]):
        assert a < c <= b + 2  # consecutive: next starts inside (overlap) or just after the previous one
        assert not text[b:c].strip() or c <= b  # nothing between two chunks is left out


def test_sentences_are_not_cut_unless_longer_than_a_chunk(minilm, text):
    count = token_counter(minilm.tokenizer)
    chunks = chunk_text(text, count, chunk_tokens=64, overlap=16)
    long_start = text.index("and the waters prevailed")
    long_end = text.index(".", long_start) + 1
    for a, b in chunks:
        if long_start <= a < long_end or long_start < b < long_end:
            continue  # inside the over-long sentence: split between words
        assert a == 0 or re.search(r"[.!?;:]\)?\s+$", text[:a]) or text[a - 2:a] == "\n\n", text[a - 20:a + 20]
        assert re.search(r"[.!?;:]\)?$", text[a:b]), text[b - 20:b + 5]


def test_overlap_repeats_whole_sentences(minilm, text):
    count = token_counter(minilm.tokenizer)
    chunks = chunk_text(text, count, chunk_tokens=64, overlap=24)
    overlaps = [text[c:b] for (a, b), (c, d) in zip(chunks, chunks[1:]) if c < b]
    assert overlaps, "some chunks must repeat the end of the previous one"
    assert all(count([o])[0] <= 24 + 2 for o in overlaps)
    assert len(chunk_text(text, count, chunk_tokens=64, overlap=0)) < len(chunks)


@pytest.mark.parametrize("size, overlap, message", [(4, 0, "at least 8"), (32, 32, "smaller than"), (32, -1, "non-negative")])
def test_bad_sizes(size, overlap, message):
    with pytest.raises(ScribeError, match=message):
        chunk_text("Some text.", lambda texts: [1] * len(texts), chunk_tokens=size, overlap=overlap)
