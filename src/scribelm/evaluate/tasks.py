"""Task files: lm-evaluation-harness task YAML, the subset people write by hand.

    task: capitals
    dataset_path: json                       # or csv, parquet, text
    dataset_kwargs:
      data_files: {test: capitals.jsonl, train: shots.jsonl}
    test_split: test                         # the documents scored (else validation_split)
    fewshot_split: train                     # where examples come from (else training_split, ...)
    output_type: multiple_choice             # loglikelihood, loglikelihood_rolling, generate_until
    doc_to_text: "Q: What is the capital of {{country}}?\\nA:"
    doc_to_target: answer                    # a field name, a template, or an index into the choices
    doc_to_choice: "{{options}}"             # a field, a template that renders a list, or a list
    target_delimiter: " "                    # between the question and the answer
    fewshot_delimiter: "\\n\\n"              # after each worked example
    num_fewshot: 2                           # examples drawn with random.Random(1234), as lm-eval
    generation_kwargs: {until: ["\\n"], max_gen_toks: 32}
    metric_list: [{metric: acc}, {metric: acc_norm}]

A YAML with `group: NAME` and `task: [a, b]` is a group; a task's `tag:` (or a
string `group:`) puts it in one. `include: base.yaml` merges a base file
first. Templates are Jinja, rendered in a sandbox (no attribute access to
Python internals) with lm-eval's `regex_replace` filter; a field name alone
is that field's value. Relative data paths are read next to the YAML file,
else from the working directory. Nothing is downloaded: a dataset from the
Hugging Face hub is refused with what to do instead.

`Task.requests(num_fewshot, limit)` turns the documents into the prompts the
scorer answers, with the documents' origin (file and line) kept for errors.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scribelm.errors import ScribeError


class TaskError(ScribeError):
    """A task file or its data that cannot be evaluated."""


OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
DEFAULT_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "generate_until": ["exact_match"],
}
METRICS_FOR = {
    "multiple_choice": {"acc", "acc_norm", "acc_mutual_info"},
    "loglikelihood": {"perplexity", "acc"},
    "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"},
    "generate_until": {"exact_match", "squad_exact_match", "squad_f1"},
}
FORMATS = ("json", "csv", "parquet", "text")
KNOWN_KEYS = {
    "task", "task_alias", "tag", "group", "include", "dataset_path", "dataset_name", "dataset_kwargs",
    "training_split", "validation_split", "test_split", "fewshot_split", "doc_to_text", "doc_to_target",
    "doc_to_choice", "description", "target_delimiter", "fewshot_delimiter", "num_fewshot", "output_type",
    "generation_kwargs", "metric_list", "metadata", "fewshot_config", "repeats", "should_decontaminate",
}
FEWSHOT_SEED = 1234
BUNDLED_DIR = Path(__file__).parent / "tasks"


# ----------------------------------------------------------------------------- templates


def _regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, text, count=count)


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = _regex_replace
    return env


_ENV = None


def render(template: str, doc: dict[str, Any]) -> str:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV.from_string(template).render(**doc)


# ----------------------------------------------------------------------------- YAML


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML; lm-eval's `!function` tags (Python code from the task's folder) are refused."""


def _refuse_tag(loader, tag_suffix, node):
    raise TaskError(f"{loader.name}: the tag !{tag_suffix} runs Python code from the task folder, which scribe eval "
                    "does not do; write the step as a Jinja template instead")


_TaskLoader.add_multi_constructor("!", _refuse_tag)


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A task YAML as a dict, its `include:` merged under it."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=_TaskLoader)  # noqa: S506 (a safe loader)
    except FileNotFoundError:
        raise TaskError(f"no task file {path}") from None
    except yaml.YAMLError as err:
        raise TaskError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise TaskError(f"{path}: a task file is a mapping of keys (task:, dataset_path:, ...)")
    if "include" in config:
        base = path.parent / str(config.pop("include"))
        if base.resolve() in _seen:
            raise TaskError(f"{path}: the includes form a cycle through {base}")
        config = {**read_yaml(base, _seen + (path.resolve(),)), **config}
    return config


# ----------------------------------------------------------------------------- data


@dataclass
class Doc:
    """One document (a row of the data) and where it came from, for error messages."""

    fields: dict[str, Any]
    origin: str  # "data.jsonl line 7"


def _resolve_data_path(name: str, yaml_dir: Path) -> Path:
    if re.match(r"^[a-z][a-z0-9+.-]*://", name):
        raise TaskError(f"data file {name} is a URL; scribe eval reads local files only: download it and point data_files at it")
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and (yaml_dir / candidate).exists():
        return yaml_dir / candidate
    return candidate


def _plain(value: Any) -> Any:
    """numpy / pandas scalars and arrays as Python values, as `datasets` hands them out."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return value


def read_data_file(path: Path, fmt: str) -> list[Doc]:
    if not path.is_file():
        raise TaskError(f"missing data file {path}")
    docs: list[Doc] = []
    if fmt == "json":
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}: not valid JSON ({err})") from None
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise TaskError(f"{path} item {i}: each document is a JSON object, got {type(row).__name__}")
                docs.append(Doc(row, f"{path.name} item {i}"))
            return docs
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path} line {n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path} line {n}: each line is a JSON object, got {type(row).__name__}")
            docs.append(Doc(row, f"{path.name} line {n}"))
        return docs
    if fmt == "text":
        return [Doc({"text": line}, f"{path.name} line {n}")
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
    import pandas as pd

    try:
        frame = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many kinds; the message is what matters
        raise TaskError(f"{path}: cannot read as {fmt} ({str(err).splitlines()[0]})") from None
    offset = 2 if fmt == "csv" else 0  # csv: line 1 is the header
    for i, row in enumerate(frame.to_dict("records")):
        where = f"{path.name} line {i + offset}" if fmt == "csv" else f"{path.name} row {i}"
        docs.append(Doc({k: _plain(v) for k, v in row.items()}, where))
    return docs


def load_splits(config: dict[str, Any], yaml_path: Path) -> dict[str, list[Doc]]:
    """The task's data, split name -> documents, from local files only."""
    name = config.get("task", yaml_path.stem)
    fmt = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") or {}
    check_local_dataset(config, name)
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if not files:
        raise TaskError(f"task {name}: dataset_path {fmt} needs dataset_kwargs.data_files (local files, "
                        "e.g. {test: data.jsonl})")
    if not isinstance(files, dict):
        files = {"train": files}
    splits = {}
    for split, paths in files.items():
        paths = [paths] if isinstance(paths, str) else list(paths)
        splits[str(split)] = [d for p in paths for d in read_data_file(_resolve_data_path(str(p), yaml_path.parent), fmt)]
    return splits


def check_local_dataset(config: dict[str, Any], name: str) -> None:
    """Refuse, before anything else, a task whose data would come from the network."""
    fmt = config.get("dataset_path")
    if fmt not in FORMATS:
        if not fmt:
            raise TaskError(f"task {name}: no dataset_path; use dataset_path: json (or csv, parquet, text) "
                            "with dataset_kwargs.data_files pointing at local files")
        raise TaskError(f"task {name}: dataset_path {fmt!r} is not a local format; scribe eval does not download "
                        "datasets: save the data as JSON lines (or csv, parquet, text), set dataset_path: json "
                        "and point dataset_kwargs.data_files at the files")


# ----------------------------------------------------------------------------- tasks


@dataclass
class Request:
    """What one document asks of the model: scored pairs, a document, or a generation."""

    doc_index: int
    kind: str  # an output type
    context: str = ""
    continuations: list[str] = field(default_factory=list)  # multiple choice: one per choice
    unconditional: bool = False  # also score the choices after nothing (acc_mutual_info)
    text: str = ""  # loglikelihood_rolling: the document
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    target: Any = None  # gold index (multiple choice) or target string(s)
    choices: list[str] = field(default_factory=list)


@dataclass
class Task:
    name: str
    output_type: str
    docs: list[Doc]
    fewshot_docs: list[Doc]
    fewshot_is_eval_split: bool
    config: dict[str, Any]
    metrics: list[tuple[str, dict[str, Any]]]
    source: Path

    # -- the fields ---------------------------------------------------------------------
    def _resolve(self, key: str, spec: Any, doc: Doc) -> Any:
        features = doc.fields
        try:
            if isinstance(spec, int) or isinstance(spec, list):
                return spec
            if isinstance(spec, dict):
                return list(spec.values())
            if not isinstance(spec, str):
                raise TaskError(f"task {self.name}: {key} must be a field name, a template or a list, got {type(spec).__name__}")
            if spec in features:
                return features[spec]
            return render(spec, features)
        except TaskError:
            raise
        except Exception as err:
            from jinja2 import TemplateSyntaxError, UndefinedError

            if isinstance(err, UndefinedError):
                missing = re.search(r"'([^']+)' is undefined", str(err))
                what = f"field {missing.group(1)!r}" if missing else str(err)
                raise TaskError(f"task {self.name}: {key} uses {what}, which {doc.origin} does not have "
                                f"(its fields: {', '.join(features) or 'none'})") from None
            if isinstance(err, TemplateSyntaxError):
                raise TaskError(f"task {self.name}: {key} is not a valid template ({err.message})") from None
            raise TaskError(f"task {self.name}: {key} failed on {doc.origin}: {err}") from None

    def doc_to_text(self, doc: Doc) -> Any:
        text = self._resolve("doc_to_text", self.config.get("doc_to_text"), doc)
        if isinstance(text, str) and text.isdigit() and self.config.get("doc_to_choice") is not None:
            return ast.literal_eval(text)
        return text

    def doc_to_target(self, doc: Doc) -> Any:
        spec = self.config.get("doc_to_target")
        target = self._resolve("doc_to_target", spec, doc)
        if isinstance(spec, str) and spec not in doc.fields and isinstance(target, str):
            if target.isdigit() and self.config.get("doc_to_choice") is not None:
                return ast.literal_eval(target)
            if len(target) >= 2 and target[0] == "[" and target[-1] == "]":
                try:
                    return ast.literal_eval(target)
                except (SyntaxError, ValueError):
                    return target
        return target

    def doc_to_choice(self, doc: Doc) -> list[str]:
        spec = self.config.get("doc_to_choice")
        choices = self._resolve("doc_to_choice", spec, doc)
        if isinstance(spec, str) and spec not in doc.fields:
            try:
                choices = ast.literal_eval(choices)
            except (SyntaxError, ValueError):
                raise TaskError(f"task {self.name}: doc_to_choice rendered {choices[:60]!r} for {doc.origin}, "
                                "which is not a list; render a list like ['a', 'b']") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"task {self.name}: the choices of {doc.origin} must be a non-empty list of strings, got {choices!r}"[:300])
        return choices

    def gold_index(self, doc: Doc, choices: list[str]) -> int:
        gold = self.doc_to_target(doc)
        if isinstance(gold, bool) or not isinstance(gold, (int, str)):
            raise TaskError(f"task {self.name}: the target of {doc.origin} must be a choice's index or text, got {gold!r}")
        if isinstance(gold, str):
            if gold not in choices:
                raise TaskError(f"task {self.name}: the target {gold!r} of {doc.origin} is none of its choices {choices}")
            return choices.index(gold)
        if not 0 <= gold < len(choices):
            raise TaskError(f"task {self.name}: label {gold} of {doc.origin} is out of range for its {len(choices)} choices")
        return gold

    # -- prompts ------------------------------------------------------------------------
    def _answer_text(self, doc: Doc) -> str:
        target = self.doc_to_target(doc)
        if isinstance(target, int) and not isinstance(target, bool) and self.config.get("doc_to_choice") is not None:
            return self.doc_to_choice(doc)[target]
        if isinstance(target, list):
            return str(target[0])
        return str(target)

    def _question(self, doc: Doc) -> str:
        text = self.doc_to_text(doc)
        if not isinstance(text, str):
            raise TaskError(f"task {self.name}: doc_to_text of {doc.origin} gave {text!r}, not text")
        return text

    def context(self, doc: Doc, num_fewshot: int, rnd: random.Random) -> str:
        """description + worked examples (question, target delimiter, answer, fewshot delimiter) + the question."""
        target_delimiter = self.config.get("target_delimiter", " ")
        fewshot_delimiter = self.config.get("fewshot_delimiter", "\n\n")
        description = self.config.get("description") or ""
        parts = [self._resolve("description", description, doc) if description else ""]
        if num_fewshot > 0:
            for example in self._sample(rnd, num_fewshot, doc):
                parts.append(self._question(example) + target_delimiter + self._answer_text(example) + fewshot_delimiter)
        parts.append(self._question(doc))
        return "".join(parts)

    def _sample(self, rnd: random.Random, n: int, doc: Doc) -> list[Doc]:
        # As lm-eval's ContextSampler: draw n (n + 1 when the examples come from the scored split,
        # then drop the document itself), from one generator shared by the whole task in order.
        pool = self.fewshot_docs
        if not self.fewshot_is_eval_split:
            if len(pool) < n:
                raise TaskError(f"task {self.name}: {n} few-shot examples asked for, the few-shot split has {len(pool)}")
            return rnd.sample(pool, n)
        if len(pool) < n + 1:
            raise TaskError(f"task {self.name}: {n} few-shot examples asked for, the split has {len(pool)} documents")
        drawn = [d for d in rnd.sample(pool, n + 1) if d.fields != doc.fields][:n]
        if len(drawn) < n:
            drawn = rnd.sample([d for d in pool if d.fields != doc.fields], n)
        return drawn

    def requests(self, num_fewshot: int | None = None, limit: int | float | None = None) -> list[Request]:
        """One `Request` per document (the first `limit`, or that fraction when below 1)."""
        shots = int(self.config.get("num_fewshot") or 0) if num_fewshot is None else num_fewshot
        if shots < 0:
            raise TaskError(f"num_fewshot must be 0 or more, got {shots}")
        docs = self.docs
        if limit is not None:
            count = int(limit * len(docs)) if isinstance(limit, float) and limit < 1 else int(limit)
            docs = docs[:count]
        rnd = random.Random(FEWSHOT_SEED)
        out = []
        for i, doc in enumerate(docs):
            if self.output_type == "loglikelihood_rolling":
                text = self.doc_to_target(doc)
                if not isinstance(text, str):
                    raise TaskError(f"task {self.name}: doc_to_target of {doc.origin} must be text for a rolling task")
                out.append(Request(i, self.output_type, text=text))
                continue
            context = self.context(doc, shots, rnd)
            delimiter = self.config.get("target_delimiter", " ")
            if self.output_type == "multiple_choice":
                choices = self.doc_to_choice(doc)
                out.append(Request(i, self.output_type, context=context, continuations=[delimiter + c for c in choices],
                                   unconditional=any(m == "acc_mutual_info" for m, _ in self.metrics),
                                   target=self.gold_index(doc, choices), choices=choices))
            elif self.output_type == "loglikelihood":
                target = self._answer_text(doc)  # as lm-eval: no delimiter; the target carries its own space
                out.append(Request(i, self.output_type, context=context, continuations=[target], target=target))
            else:
                target = self.doc_to_target(doc)
                if isinstance(target, int) and self.config.get("doc_to_choice") is not None:
                    target = self.doc_to_choice(doc)[target]
                golds = [str(t) for t in target] if isinstance(target, list) else [str(target)]
                out.append(Request(i, self.output_type, context=context,
                                   generation_kwargs=dict(self.config.get("generation_kwargs") or {}), target=golds))
        return out


def _metrics(config: dict[str, Any], name: str, output_type: str) -> list[tuple[str, dict[str, Any]]]:
    entries = config.get("metric_list")
    if entries is None:
        return [(m, {}) for m in DEFAULT_METRICS[output_type]]
    if not isinstance(entries, list):
        raise TaskError(f"task {name}: metric_list is a list of {{metric: NAME}} entries")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
            raise TaskError(f"task {name}: each metric_list entry needs metric: NAME, got {entry!r}")
        metric = entry["metric"]
        if metric not in METRICS_FOR[output_type]:
            raise TaskError(f"task {name}: metric {metric!r} does not apply to {output_type}; "
                            f"available: {', '.join(sorted(METRICS_FOR[output_type]))}")
        options = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}
        allowed = {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"} if metric == "exact_match" else set()
        if set(options) - allowed:
            raise TaskError(f"task {name}: unknown option(s) {', '.join(sorted(set(options) - allowed))} for metric {metric}")
        out.append((metric, options))
    return out


def build_task(config: dict[str, Any], path: Path) -> Task:
    name = config.get("task")
    if not isinstance(name, str) or not name:
        raise TaskError(f"{path}: a task file needs task: NAME")
    check_local_dataset(config, name)
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        raise TaskError(f"task {name}: unsupported key(s) {', '.join(unknown)} in {path.name}; "
                        "scribe eval reads the hand-written subset of lm-eval task files (see README)")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(f"task {name}: unknown output_type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
    if output_type == "multiple_choice" and config.get("doc_to_choice") is None:
        raise TaskError(f"task {name}: a multiple_choice task needs doc_to_choice")
    if output_type == "generate_until":
        kwargs = dict(config.get("generation_kwargs") or {"do_sample": False})
        kwargs.setdefault("until", [config.get("fewshot_delimiter", "\n\n")])
        config = {**config, "generation_kwargs": kwargs}
    metrics = _metrics(config, name, output_type)
    splits = load_splits(config, path)

    def split(key: str) -> str | None:
        value = config.get(key)
        if value is not None and str(value) not in splits:
            raise TaskError(f"task {name}: {key} {value!r} is not among the data_files splits ({', '.join(splits)})")
        return None if value is None else str(value)

    eval_split = split("test_split") or split("validation_split")
    if eval_split is None:
        raise TaskError(f"task {name}: set test_split (or validation_split) to the split to score")
    fewshot_split = split("fewshot_split") or split("training_split") or split("validation_split") or eval_split
    return Task(name=name, output_type=output_type, docs=splits[eval_split], fewshot_docs=splits[fewshot_split],
                fewshot_is_eval_split=(fewshot_split == eval_split), config=config, metrics=metrics, source=path)


# ----------------------------------------------------------------------------- finding tasks


def _index(directories: Iterable[Path]) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Task name -> YAML file, and group name -> member task names, over these directories."""
    tasks: dict[str, Path] = {}
    groups: dict[str, list[str]] = {}
    for directory in directories:
        for path in sorted(directory.rglob("*.yaml")) + sorted(directory.rglob("*.yml")):
            try:
                config = read_yaml(path)
            except TaskError:
                continue  # a broken file elsewhere in the folder matters only if asked for
            name, group = config.get("task"), config.get("group")
            if isinstance(group, str) and isinstance(name, list):
                groups.setdefault(group, []).extend(str(t) for t in name)
                continue
            if isinstance(name, str):
                tasks.setdefault(name, path)
                tags = config.get("tag") or (group if isinstance(group, str) else None) or []
                for tag in [tags] if isinstance(tags, str) else tags:
                    groups.setdefault(str(tag), []).append(name)
    return tasks, groups


def load_tasks(names: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()) -> list[Task]:
    """Tasks by YAML path, task name, or group name; names are looked up in `include_paths`
    and the bundled tasks."""
    directories = [Path(p) for p in include_paths]
    for d in directories:
        if not d.is_dir():
            raise TaskError(f"--include-path {d} is not a directory")
    index: tuple[dict[str, Path], dict[str, list[str]]] | None = None
    out: list[Task] = []

    def add(name: str, trail: tuple[str, ...]) -> None:
        nonlocal index
        candidate = Path(name).expanduser()
        if candidate.suffix in (".yaml", ".yml"):
            config = read_yaml(candidate)
            if isinstance(config.get("task"), list):
                for member in config["task"]:
                    add(str(member), trail + (name,))
            else:
                out.append(build_task(config, candidate))
            return
        if index is None:
            index = _index(directories + [BUNDLED_DIR])
        tasks, groups = index
        if name in tasks:
            out.append(build_task(read_yaml(tasks[name]), tasks[name]))
        elif name in groups:
            if name in trail:
                raise TaskError(f"group {name} contains itself")
            for member in groups[name]:
                add(member, trail + (name,))
        else:
            known = sorted(set(tasks) | set(groups))
            raise TaskError(f"unknown task {name!r}; give a task YAML file, or one of: {', '.join(known) or 'none'} "
                            "(more with --include-path DIR)")

    for name in names:
        add(name, ())
    return out


def bundled_task_names() -> list[str]:
    tasks, groups = _index([BUNDLED_DIR])
    return sorted(tasks) + sorted(groups)
