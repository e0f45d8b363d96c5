"""`scribe eval MODEL [MODEL ...] --tasks NAME_OR_YAML[,...]`: score models on evaluation tasks.

    scribe eval quickstart/model --tasks kjv                      # the bundled tasks (offline)
    scribe eval my-model --tasks my_task.yaml --num-fewshot 2 --limit 200
    scribe eval my-model --tasks hellaswag_local --include-path tasks/ --log-samples out/
    scribe eval fp32/ int8/ int4/ --tasks kjv_cloze,kjv_mc        # one table, a column per model
    scribe eval base/ --adapter runs/lora/adapter --tasks kjv_cloze
    scribe eval --base-url http://localhost:8080/v1 --model-name m --tasks kjv_cloze   # a server's model
    scribe eval my-model --tasks kjv_bpb --json --output results.json

Task files are lm-evaluation-harness YAML (the hand-written subset) with local data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scribelm.cli.common import console, err_console, print_json
from scribelm.errors import ScribeError


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score models on evaluation tasks (lm-eval task files, bundled tasks)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="checkpoint directories, Hugging Face directories or store names; several give one table")
    p.add_argument("--tasks", required=True, metavar="NAMES",
                   help="comma-separated task names, group names or task YAML files")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR", help="a folder of task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="worked examples before each question")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="score the first N documents of each task (below 1: that fraction)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B")
    p.add_argument("--log-samples", default=None, metavar="DIR", help="write each task's requests and scores as JSONL here")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the results as JSON to this file")
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA adapters put on each model, unmerged")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps, or auto (default cpu)")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="evaluate the model behind an OpenAI-compatible completions server instead")
    p.add_argument("--model-name", default=None, metavar="NAME", help="the model name to ask the server for")
    p.set_defaults(handler=run)


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if value <= 0:
        raise ScribeError(f"--limit must be positive, got {value:g}")
    return value if value < 1 else int(value)


def _progress(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err_console, transient=True,
                    disable=not err_console.is_terminal)  # a log file gets the results, not bar frames


def _evaluate_one(label: str, model, tasks, requests, args):
    from scribelm.evaluate import evaluate

    with _progress(label) as bar:
        task = bar.add_task("requests", total=None, rate="")
        started, done = time.perf_counter(), 0

        def advance(n: int, total: int) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:.1f} req/s")

        return evaluate(model, tasks, num_fewshot=args.num_fewshot, limit=_limit(args.limit),
                        batch_size=args.batch_size, progress=advance, requests=requests)


def _write_samples(directory: Path, label: str, results) -> None:
    from scribelm.io import write_file_atomically

    directory.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("._") or "model"
    for r in results:
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in r.samples)
        write_file_atomically(directory / f"{safe}__{r.name}.jsonl", lines)


def run(args) -> int:
    from scribelm.evaluate import load_tasks
    from scribelm.evaluate.table import results_json, results_table
    from scribelm.io import write_file_atomically

    if args.batch_size < 1:
        raise ScribeError(f"--batch-size must be at least 1, got {args.batch_size}")
    if bool(args.models) == bool(args.base_url):
        raise ScribeError("give one or more MODEL directories, or --base-url for a server (not both)")
    if len(set(args.models)) < len(args.models):
        raise ScribeError("the same model is given twice; give each once")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise ScribeError("--tasks names no task; give task names or YAML files, comma-separated")
    tasks = load_tasks(names, args.include_path)
    requests = [t.requests(args.num_fewshot, _limit(args.limit)) for t in tasks]  # data errors before any model loads

    per_model = []
    if args.base_url:
        from scribelm.evaluate.remote import CompletionsBackend

        backend = CompletionsBackend(args.base_url, model=args.model_name, batch_size=args.batch_size)
        per_model.append((args.model_name or args.base_url, _evaluate_one(args.base_url, backend, tasks, requests, args)))
    else:
        from scribelm.lm import load

        for path in args.models:
            lm = load(path, device=args.device, adapter=args.adapter)
            per_model.append((path, _evaluate_one(path, lm, tasks, requests, args)))
            del lm
    if args.log_samples:
        for label, results in per_model:
            _write_samples(Path(args.log_samples), label, results)
    data = results_json(per_model)
    if args.output:
        write_file_atomically(args.output, json.dumps(data, indent=2) + "\n")
    if args.json:
        print_json(data)
    else:
        console.print(results_table(per_model), markup=False)
    return 0
