"""`scribe explain MODEL "text" [-o DIR] [--layer L --head H] [--json]`: see inside a model.

Writes one self-contained HTML page (and PNGs) showing the text's tokens, embeddings,
attention patterns, residual stream, logit lens, MLP neurons and next-token
distribution; prints where the page is (with --json, the numbers instead).

Further explanations are sub-verbs, `scribe explain NAME ...`: each is a module
listed in SUB_VERB_MODULES with a `register(subparsers)` like the top-level verbs; a
module that is not present is skipped. A first argument that names none of them is
the MODEL of the page.
"""

from __future__ import annotations

import argparse
import importlib

from scribelm.cli.common import print_json

#: sub-verb modules of `scribe explain` (in scribelm.cli), in the order the help lists them
SUB_VERB_MODULES = ["explain_embeddings", "explain_superposition", "explain_sae"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="see inside a model: attention, logit lens, neurons, next-token probabilities (an HTML page)",
        description=__doc__.split("\n\n")[1] + " Usage: scribe explain MODEL TEXT [options]; scribe explain MODEL --help for the options.",
    )
    # Everything after `explain` goes to the page's parser or a sub-verb's (see the module docstring).
    p.add_argument("arguments", nargs=argparse.PARSER, metavar="MODEL TEXT | SUBVERB ...")
    p.set_defaults(handler=run)


def page_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scribe explain", description="Write an HTML page that shows one text going through the model.")
    p.add_argument("model", help="checkpoint directory, Hugging Face model directory or stored model name")
    p.add_argument("text", help="the text to explain (it must fit in the model's context)")
    p.add_argument("-o", "--output", default="explain", help="directory to write the page into (default ./explain)")
    p.add_argument("--force", action="store_true", help="replace an earlier page in that directory")
    p.add_argument("--layer", type=int, help="the layer whose attention head is shown first (default: the last)")
    p.add_argument("--head", type=int, help="the head shown first (default 0)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of writing the page")
    p.add_argument("--sae", metavar="DIR", help="also show a sparse autoencoder's features (a `scribe explain sae` directory)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps, or auto (default cpu)")
    p.set_defaults(handler=run_page)
    return p


def sub_verb_parser() -> tuple[argparse.ArgumentParser, set[str]]:
    p = argparse.ArgumentParser(prog="scribe explain")
    subparsers = p.add_subparsers(dest="explain_verb", metavar="SUBVERB")
    for name in SUB_VERB_MODULES:
        try:
            module = importlib.import_module(f"scribelm.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"scribelm.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return p, set(subparsers.choices)


def run(args) -> int:
    sub_verbs, names = sub_verb_parser()
    first = args.arguments[0] if args.arguments else None
    inner = sub_verbs.parse_args(args.arguments) if first in names else page_parser().parse_args(args.arguments)
    if getattr(inner, "device", None) is not None:
        from scribelm.devices import check_device

        check_device(inner.device, allow_auto=True)
    return inner.handler(inner)


def run_page(args) -> int:
    import scribelm
    from scribelm.cli.common import console
    from scribelm.inspect.explain import check_layer_head, explain_data
    from scribelm.inspect.explain_page import write_explain_page

    lm = scribelm.load(args.model, device=args.device)
    check_layer_head(lm, args.layer, args.head)
    if lm.tokenizer is None:
        from scribelm.errors import ScribeError

        raise ScribeError(f"{args.model} has no tokenizer (tokenizer.json), so its text cannot be explained")
    data = explain_data(lm, args.text, layer=args.layer, head=args.head, sae=args.sae)
    if args.json:
        print_json(data)
        return 0
    page = write_explain_page(data, args.output, force=args.force)
    console.print(f"wrote {page} (open it in a browser); figures beside it")
    return 0
