"""`scribe generate MODEL "prompt"`: write a continuation, streamed to the terminal.

    scribe generate my-model "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1
    scribe generate my-model "Once" --beams 4 --max-new-tokens 40
    scribe generate my-model "Once" --json --logprobs 3      # text, ids, finish reason, log-probs
    scribe generate my-model "Once" --show-probs             # each token with its top candidates
    echo "Once" | scribe generate my-model -                 # prompt from stdin
    scribe generate my-model "Once" --stats                  # prefill and decode speed, GB/s of weights
    scribe generate my-model "Once" --threads 1              # fewer CPU threads when other jobs share the cores
    scribe generate my-model "Once" --adapter runs/lora/adapter   # LoRA adapters on top, unmerged
    scribe generate my-model "Quote: ..." --speculative prompt-lookup   # guess tokens from the prompt, check in one pass
    scribe generate my-model "Once" --draft small-model --num-draft 4   # a smaller model with the same tokenizer guesses

Sampling flags left unset take the model's generation.json, then the library's defaults.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch

from scribelm.cli.common import add_speculative_arguments, console, err_console, print_json
from scribelm.errors import ScribeError


def _fallback(name: str) -> Any:
    from dataclasses import fields

    from scribelm.sampling import SamplingSettings

    return next(f.default for f in fields(SamplingSettings) if f.name == name)


def _from_model(name: str, what: str = "") -> str:
    """Help text for a setting whose default is the model's (argparse's default stays None, so
    generation.json wins over the library's fallback)."""
    return f"{what}default: the model's generation.json, else {_fallback(name)}"


def add_sampling_arguments(p) -> None:
    """The sampling flags `generate` and `chat` share (None = the model's default)."""
    g = p.add_argument_group("sampling", "Unset flags take the model's generation.json (the settings its maker chose), "
                                         "then the values shown.")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=_from_model("max_new_tokens", "most tokens to generate (at least 1); "))
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=_from_model("temperature", "0 = greedy, higher = more random; "))
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=_from_model("top_k", "keep the k most likely tokens, 0 = off; "))
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help=_from_model("top_p", "nucleus sampling: keep the smallest set with mass >= p; "))
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help=_from_model("min_p", "keep tokens with p >= min_p x the top probability; "))
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help=_from_model("repetition_penalty", "> 1 discourages repeats; "))
    g.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help=_from_model("presence_penalty", "OpenAI presence penalty, in [-2, 2]; "))
    g.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help=_from_model("frequency_penalty", "OpenAI frequency penalty, in [-2, 2]; "))
    g.add_argument("--seed", type=int, default=None, help="make a sampled generation reproducible")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable; replaces the model's stop strings)")
    g.add_argument("--slide", action="store_true", help="when the context fills, drop the oldest tokens instead of stopping")
    r = p.add_argument_group("model and machine")
    r.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply LoRA adapters (a `scribe finetune lora` result, or a peft adapter directory) "
                        "without merging them into the model")
    r.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps, or auto (default cpu)")
    r.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice, one per core); fewer can be faster "
                        "when other jobs share the machine")


def sampling_overrides(args) -> dict[str, Any]:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop")
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise ScribeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "slide", False):
        out["context_overflow"] = "slide"
    return out


def apply_threads(args) -> None:
    """--threads N: the size of torch's CPU thread pool for this process."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ScribeError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt (streams to the terminal)")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("prompt", nargs="?", default="-", help="the prompt ('-' or nothing: read standard input)")
    add_sampling_arguments(p)
    p.add_argument("--beams", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=None, help="beam score = logprob sum / length ** this")
    p.add_argument("-n", "--num-return-sequences", type=int, default=None, help="how many outputs")
    p.add_argument("--logprobs", type=int, default=None, metavar="N", help="report each token's log-probability and N alternatives")
    p.add_argument("--json", action="store_true", help="print text, token ids, finish reason (and log-probs) as JSON")
    p.add_argument("--show-probs", action="store_true", help="print each generated token with its top candidates")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one torch.compile graph (compiling takes a while first; "
                        "for GPUs: on a CPU the default step is faster)")
    add_speculative_arguments(p, "guess several tokens, check them in one pass: the same output (greedy) or the "
                              "same distribution (sampling), sooner when the guesses are right")
    p.add_argument("--stats", action="store_true",
                   help="after the text, print prefill and decode speed (tokens/s, GB/s of weights read) to stderr")
    p.set_defaults(handler=run)


def load_model(path: str, device: str = "cpu", adapter: str | None = None):
    from scribelm import load

    return load(path, device=device, adapter=adapter)


def run(args) -> int:
    from scribelm.generate import (
        BatchGeneration, generate, make_speculator, prompt_token_ids, resolve_settings, seq2seq_generation,
    )

    if args.prompt == "-":
        if sys.stdin.isatty():
            raise ScribeError('give a prompt: scribe generate MODEL "text" (or pipe it in with "-")')
        prompt = sys.stdin.read()
    else:
        prompt = args.prompt
    overrides = sampling_overrides(args)  # flag mistakes before the model is loaded
    method = speculative_method(args)
    load_before = machine_load()  # before our own threads add to it
    apply_threads(args)
    lm = load_model(args.model, args.device, args.adapter)
    if args.beams is not None:
        overrides["num_beams"] = args.beams
    if args.length_penalty is not None:
        overrides["length_penalty"] = args.length_penalty
    if args.num_return_sequences is not None:
        overrides["num_return_sequences"] = args.num_return_sequences
    top_n = args.logprobs if args.logprobs is not None else (5 if args.show_probs else 0)
    if args.logprobs is not None or args.show_probs:
        overrides.update(logprobs=True, top_logprobs=top_n)
    settings = resolve_settings(lm, **overrides)
    one_stream = settings.num_beams == 1 and settings.num_return_sequences == 1
    speculation = _speculation(args, method)

    seq2seq = getattr(lm.model, "is_encoder_decoder", False)
    if args.json or not one_stream or (seq2seq and args.stats) or (seq2seq and speculation):  # T5: no speed line
        out = generate(lm, prompt, settings=settings, return_details=True, compile=args.compile, **speculation)
        choices = out if isinstance(out, list) else [out]
        if args.json:
            dicts = [_completion_json(c, settings.logprobs) for c in choices]
            print_json(dicts[0] if len(dicts) == 1 else {"choices": dicts})
            return 0
        for i, c in enumerate(choices):
            label = f"[{i + 1}]" + (f" score {c.score:.4f}" if c.score is not None else "")
            console.print(f"[bold]{label}[/bold] " if len(choices) > 1 else "", end="")
            sys.stdout.write(c.text + "\n")
        sys.stdout.flush()
        return 0

    ids = prompt_token_ids(lm, prompt)
    lm.model.eval()
    if seq2seq:  # T5: the prompt goes to the encoder, the decoder's tokens stream
        gen = seq2seq_generation(lm, ids, settings, (), True)
    else:
        gen = BatchGeneration(lm.model, lm.tokenizer, [ids], settings, compile=args.compile,
                              speculator=make_speculator(lm, **speculation))
    if args.show_probs or args.logprobs is not None:
        _print_probs(gen, lm.tokenizer, top_n)
        return 0
    if sys.stdout.isatty():
        console.print(prompt, style="dim", end="")
    stamps = [time.perf_counter()]  # start, then one per generated token
    for events in gen:
        stamps.extend([time.perf_counter()] * len(events))  # a speculative step gives several tokens at once
        for e in events:
            if e.text:
                sys.stdout.write(e.text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    c = gen.completions[0]
    if c is not None and args.stats:
        err_console.print(_speed_line(lm.model, len(ids), stamps), markup=False, soft_wrap=True)
    if c is not None and (args.stats or sys.stderr.isatty()):
        accepted = f", {c.accepted_draft_tokens}/{c.draft_tokens} drafted tokens accepted" if c.draft_tokens else ""
        err_console.print(f"[dim]{len(c.token_ids)} tokens, finish reason: {c.finish_reason}{accepted}[/dim]")
    if c is not None and args.stats and next(lm.model.parameters()).is_cpu:
        note = busy_machine_note(load_before, os.cpu_count() or 1, torch.get_num_threads())
        if note:
            err_console.print(note, markup=False, soft_wrap=True)
    return 0


def speculative_method(args) -> str | None:
    """The speculative method --speculative / --draft / --num-draft ask for (checked before any model loads)."""
    method = args.speculative.replace("-", "_") if args.speculative else None
    if args.draft is not None and method == "prompt_lookup":
        raise ScribeError("--draft goes with --speculative draft (or alone), not prompt-lookup")
    if method == "draft" and args.draft is None:
        raise ScribeError("--speculative draft needs --draft MODEL, a smaller model with the same tokenizer")
    if args.num_draft is not None and method is None and args.draft is None:
        raise ScribeError("--num-draft goes with --speculative or --draft")
    return "draft" if args.draft is not None else method


def _speculation(args, method: str | None) -> dict[str, Any]:
    """generate()'s speculative keywords, the draft model loaded."""
    if method is None:
        return {}
    draft = load_model(args.draft, args.device) if args.draft is not None else None
    return {"speculative": method, "draft": draft, "num_draft": args.num_draft}


def machine_load() -> float | None:
    """The one-minute load average (runnable processes), where the system reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_machine_note(load: float | None, cores: int, threads: int) -> str | None:
    """A hint when other work competes for the cores: decode threads wait for one another
    at every product, so one thread on a busy core slows them all."""
    if load is None or load + threads < cores + 0.75:
        return None
    idle = max(1, cores - math.ceil(load - 0.25))
    advice = (f"try --threads {idle}" if idle < threads else "expect lower speeds than on an idle machine")
    return (f"note: the machine looks busy (load average {load:.1f} on {cores} cores, "
            f"{threads} thread{'s' if threads != 1 else ''} here); {advice}")


def _speed_line(model, prompt_tokens: int, stamps: list[float]) -> str:
    """Prefill is the time to the first token; decode the time per token after it (every
    decode step reads every weight once, hence GB/s)."""
    from scribelm.inspect.decode_traffic import weight_bytes_per_token

    prefill = stamps[1] - stamps[0]
    line = f"prefill: {prompt_tokens} tokens in {prefill * 1e3:.0f} ms ({prompt_tokens / prefill:.0f} tokens/s)"
    steps = len(stamps) - 2
    if steps > 0:
        per_token = (stamps[-1] - stamps[1]) / steps
        gbs = weight_bytes_per_token(model) / per_token / 1e9
        line += f"; decode: {steps} tokens at {1 / per_token:.1f} tokens/s ({gbs:.2f} GB/s of weights)"
    if next(model.parameters()).is_cpu:
        from scribelm.accel import native_status

        line += f"; native CPU kernels {native_status()}"
    return line


def _completion_json(c, with_logprobs: bool) -> dict[str, Any]:
    d: dict[str, Any] = {
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "prompt_tokens": c.prompt_tokens,
    }
    if c.score is not None:
        d["score"] = c.score
    if c.draft_tokens is not None:
        d["draft_tokens"], d["accepted_draft_tokens"] = c.draft_tokens, c.accepted_draft_tokens
    if with_logprobs and c.logprobs is not None:
        d["logprobs"] = [
            {"token_id": t.token_id, "token": t.token, "logprob": t.logprob, "top_logprobs": t.top} for t in c.logprobs
        ]
    return d


def _print_probs(gen, tokenizer, top_n: int) -> None:
    """One line per generated token: the token, its probability, and the top candidates."""
    from scribelm.generate import token_text

    console.print(f"[dim]{'token':>16}  {'prob':>6}   top candidates[/dim]")
    for events in gen:
        for e in events:
            token = token_text(tokenizer, e.token_id)
            alternatives = "  ".join(
                f"{token_text(tokenizer, i)!r} {math.exp(lp):.3f}" for i, lp in (e.top_logprobs or [])[:top_n]
            )
            prob = math.exp(e.logprob) if e.logprob is not None else float("nan")
            console.print(f"{token!r:>16}  {prob:6.3f}   {alternatives}", markup=False)
    c = gen.completions[0]
    console.print("[bold]text:[/bold] ", end="")
    sys.stdout.write(c.text + "\n")
    console.print(f"[dim]finish reason: {c.finish_reason}[/dim]")
