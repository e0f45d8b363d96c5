"""Evaluation speed: `scribe eval` against lm-evaluation-harness's `hf` model, same weights,
same task files, same batch size.

    python benchmarks/evaluate.py                          # 5-shot multiple choice + rolling bpb
    python benchmarks/evaluate.py --limit 100 --batch-size 32 --threads 2
    python benchmarks/evaluate.py --device cuda --d-model 1024 --layers 12

Builds a random-init `transformers.LlamaForCausalLM` with a byte-level BPE trained on the
bundled corpus, saved as a Hugging Face directory, and scores the bundled tasks with both:

    kjv_mc   multiple choice, few-shot (a long shared context, four short endings: where
             sharing the context's keys/values across the choices pays)
    kjv_bpb  rolling log-likelihood of whole chapters (tokens/s)

Per-sample log-likelihoods are checked to agree (1e-3) before any time is reported.
Both take turns; the best of `--repeats` runs is kept. On the CPU the time is this
process's CPU time (other jobs on a shared machine do not count; both run in this
process), on a GPU wall time. Prints requests/s (tokens/s for rolling) and the
scribelm / lm-eval ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import scribelm  # noqa: E402
from scribelm.evaluate import evaluate, load_tasks  # noqa: E402
from scribelm.evaluate.kjv_tasks import TASK_DIR  # noqa: E402


def build_model(directory: Path, args) -> Path:
    import transformers

    from scribelm.data.corpora import kjv_chapters
    from scribelm.lm import LM

    tokenizer = scribelm.Tokenizer.train(kjv_chapters()[:300], vocab_size=args.vocab, min_frequency=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers, num_attention_heads=args.d_model // 64, num_key_value_heads=args.d_model // 64,
        max_position_embeddings=args.context, tie_word_embeddings=False))
    hf.save_pretrained(directory / "weights")
    return LM(model=scribelm.load(directory / "weights").model, tokenizer=tokenizer).save(directory / "model", format="hf")


def task_files(directory: Path) -> Path:
    """The bundled YAML with absolute data paths (lm-eval reads relative ones from the working directory)."""
    out = directory / "tasks"
    out.mkdir()
    for yaml in TASK_DIR.glob("*.yaml"):
        text = yaml.read_text()
        for data in TASK_DIR.glob("*.jsonl"):
            text = text.replace(f" {data.name}", f" {data}")
        (out / yaml.name).write_text(text.replace("tag: kjv\n", ""))
    return out


def clock(args) -> float:
    return time.process_time() if args.device == "cpu" else time.perf_counter()


def run_lm_eval(model_dir: Path, tasks_dir: Path, name: str, args):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hflm = HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device=args.device, dtype="float32")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    started = clock(args)
    out = lm_eval.simple_evaluate(model=hflm, tasks=[name], num_fewshot=args.shots if name == "kjv_mc" else None,
                                  limit=args.limit, task_manager=manager, log_samples=True, bootstrap_iters=0)
    seconds = clock(args) - started
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    if name == "kjv_bpb":  # one request per document: resps = [[loglikelihood]]
        return seconds, [[float(s["resps"][0][0])] for s in samples]
    return seconds, [[float(r[0][0]) for r in s["resps"]] for s in samples]


def run_scribe(model_dir: Path, tasks_dir: Path, name: str, args):
    lm = scribelm.load(model_dir, device=args.device)
    started = clock(args)
    (result,) = evaluate(lm, load_tasks([name], [tasks_dir]), num_fewshot=args.shots if name == "kjv_mc" else None,
                         limit=args.limit, batch_size=args.batch_size)
    seconds = clock(args) - started
    if name == "kjv_mc":
        return seconds, [s["loglikelihoods"] for s in result.samples], None
    return seconds, [[s["loglikelihood"]] for s in result.samples], sum(s["tokens"] for s in result.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--shots", type=int, default=5, help="few-shot examples for the multiple-choice task")
    parser.add_argument("--limit", type=int, default=40, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", default="kjv_mc,kjv_bpb", help="which of kjv_mc, kjv_bpb to time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)  # lm-eval's per-request warnings would bury the table

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp, args)
        tasks_dir = task_files(tmp)
        print(f"model: Llama d_model={args.d_model} layers={args.layers} vocab={args.vocab}, device {args.device}, "
              f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.limit} documents per task")
        for name in args.tasks.split(","):
            best_theirs = best_ours = float("inf")
            for _ in range(args.repeats):
                t_theirs, theirs = run_lm_eval(model_dir, tasks_dir, name, args)
                t_ours, ours, tokens = run_scribe(model_dir, tasks_dir, name, args)
                worst = max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x, y))
                if worst > 1e-3:
                    sys.exit(f"{name}: log-likelihoods differ by {worst:.2e}; not timing a different computation")
                best_theirs, best_ours = min(best_theirs, t_theirs), min(best_ours, t_ours)
            requests = sum(len(x) for x in ours)
            if name == "kjv_mc":
                print(f"{name} ({args.shots}-shot, {requests} requests): scribelm {requests / best_ours:8.1f} req/s   "
                      f"lm-eval hf {requests / best_theirs:8.1f} req/s   ratio {best_theirs / best_ours:.2f}x")
            else:
                print(f"{name} (rolling, {tokens} tokens): scribelm {tokens / best_ours:8.0f} tok/s   "
                      f"lm-eval hf {tokens / best_theirs:8.0f} tok/s   ratio {best_theirs / best_ours:.2f}x")


if __name__ == "__main__":
    main()
