"""Small task files and data written by the evaluation tests: lm-eval task YAML with
absolute paths to JSON lines, as a user would write them."""

import json
from pathlib import Path

CAPITALS = [
    ("France", "Paris", ["Lyon", "Paris", "Nice"]),
    ("Italy", "Rome", ["Rome", "Milan", "Turin"]),
    ("Spain", "Madrid", ["Seville", "Bilbao", "Madrid"]),
    ("Japan", "Tokyo", ["Osaka", "Tokyo", "Kyoto"]),
    ("Egypt", "Cairo", ["Cairo", "Giza", "Luxor"]),
    ("Peru", "Lima", ["Cusco", "Arequipa", "Lima"]),
    ("Kenya", "Nairobi", ["Nairobi", "Mombasa", "Kisumu"]),
    ("Chile", "Santiago", ["Valparaiso", "Santiago", "Temuco"]),
    ("Canada", "Ottawa", ["Toronto", "Montreal", "Ottawa"]),
    ("Greece", "Athens", ["Athens", "Sparta", "Patras"]),
]
SHOTS = [
    ("Norway", "Oslo", ["Bergen", "Oslo", "Tromso"]),
    ("Poland", "Warsaw", ["Warsaw", "Krakow", "Gdansk"]),
    ("Cuba", "Havana", ["Havana", "Holguin", "Camaguey"]),
    ("Iran", "Tehran", ["Shiraz", "Tabriz", "Tehran"]),
]
VERSES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep. "
    "And the Spirit of God moved upon the face of the waters. And God said, Let there be light: and there was light. "
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "Call me Ishmael.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
    "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of "
    "Darkness, it was the spring of hope, it was the winter of despair.",
]


def _rows(items):
    return [{"country": c, "answer": a, "options": opts, "label": opts.index(a)} for c, a, opts in items]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_parity_tasks(directory: Path) -> Path:
    test = write_jsonl(directory / "capitals_test.jsonl", _rows(CAPITALS))
    train = write_jsonl(directory / "capitals_train.jsonl", _rows(SHOTS))
    verses = write_jsonl(directory / "verses.jsonl", [{"text": v} for v in VERSES])
    data = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    train: {train}
test_split: test
fewshot_split: train
"""
    write_yaml(directory / "capitals_mc0.yaml", f"""task: capitals_mc0
{data}output_type: multiple_choice
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA:"
doc_to_choice: "{{{{options}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    write_yaml(directory / "capitals_mc2.yaml", f"""task: capitals_mc2
{data}output_type: multiple_choice
num_fewshot: 2
doc_to_text: "The capital of {{{{country}}}} is"
doc_to_choice: options
doc_to_target: "{{{{answer}}}}"
""")
    write_yaml(directory / "capitals_ll.yaml", f"""task: capitals_ll
{data}output_type: loglikelihood
num_fewshot: 1
doc_to_text: "{{{{country}}}}:"
doc_to_target: answer
""")
    write_yaml(directory / "capitals_gen.yaml", f"""task: capitals_gen
{data}output_type: generate_until
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""")
    write_yaml(directory / "verses_rolling.yaml", f"""task: verses_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {verses}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
""")
    return directory
