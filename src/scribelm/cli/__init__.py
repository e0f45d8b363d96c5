"""The `scribe` command: one verb per job.

Each verb group lives in its own module with a `register(subparsers)`
function that adds its parser and sets `handler`. This is the only package
that prints; library code returns values. User errors (`ScribeError`)
become one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from scribelm.errors import ScribeError

# Verb modules, in the order `scribe --help` lists them. A module that is not
# present yet (a later feature) is skipped.
VERB_MODULES = [
    "quickstart",
    "tokenizer",
    "prepare",
    "pretrain",
    "finetune",
    "generate",
    "chat",
    "serve",
    "models",
    "eval",
    "convert",
    "quantize",
    "params",
    "embed",
    "explain",
    "rag",
    "sweep",
]


def build_parser() -> argparse.ArgumentParser:
    from scribelm import __version__

    parser = argparse.ArgumentParser(prog="scribe", description="scribelm: build, train, run and inspect language models.")
    parser.add_argument("--version", action="version", version=f"scribelm {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(f"scribelm.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"scribelm.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Verbs that take free-form `--section.key value` overrides (pretrain) collect the rest.
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "takes_overrides", False):
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        if getattr(args, "device", None) is not None:  # every verb's --device, checked before any work
            from scribelm.devices import check_device

            check_device(args.device, allow_auto=True)
        result = args.handler(args)
    except ScribeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `scribe ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
