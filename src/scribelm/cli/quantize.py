"""`scribe quantize MODEL --bits 8|4 [--group-size N] -o OUT`: a smaller, faster copy of a model.

Loads the model, measures its bits per byte on held-out text, quantizes the
linear layers of its transformer blocks (see `scribelm.quant`), measures
again, and writes the quantized checkpoint (atomically). The table shows
what the smaller file costs in prediction quality.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from scribelm.cli.common import console, human_bytes, print_json
from scribelm.errors import ScribeError
from scribelm.io import claim_output_directory


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="weight-only int8 / int4 quantization of a model")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8: per-channel int8; 4: per-group int4")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 only: inputs sharing one scale (32, 64 or 128; default 32)")
    p.add_argument("--unembedding", action="store_true",
                   help="also quantize the output projection (read in full for every generated token)")
    p.add_argument("-o", "--output", required=True,
                   help="directory to write the quantized checkpoint to: new, empty, or one scribelm wrote (with --force)")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if scribelm wrote it (a directory holding other files is never replaced)")
    p.add_argument("--eval-text", default=None,
                   help="UTF-8 text file to measure bits per byte on (default: a built-in English sample)")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after measurement")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    import scribelm
    from scribelm.quant import (
        DEFAULT_EVAL_TEXT, DEFAULT_GROUP_SIZE, bits_per_byte, check_scheme, quantize_model, weight_bytes,
    )

    group = args.group_size if args.bits == 8 or args.group_size is not None else DEFAULT_GROUP_SIZE
    check_scheme(args.bits, group)  # fail before loading a large model
    if Path(args.output).resolve() == Path(args.model).resolve():
        raise ScribeError("the output directory is the model itself; write the quantized copy elsewhere with -o")
    output = claim_output_directory(args.output, force=args.force, kind="quantized checkpoint")
    text = DEFAULT_EVAL_TEXT
    if args.eval_text is not None:
        path = Path(args.eval_text)
        if not path.is_file():
            raise ScribeError(f"evaluation text not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ScribeError(f"{path} is not UTF-8 text; give a plain text file") from None
    lm = scribelm.load(args.model)
    evaluate = not args.no_eval and lm.tokenizer is not None
    report = {"bits": args.bits, "group_size": args.group_size, "bytes_before": weight_bytes(lm.model)}
    if evaluate:
        report["before"] = bits_per_byte(lm.model, lm.tokenizer, text)
    quantize_model(lm.model, args.bits, args.group_size, unembedding=args.unembedding)
    report["group_size"] = lm.model.quantization["group_size"]
    report["bytes_after"] = weight_bytes(lm.model)
    if evaluate:
        report["after"] = bits_per_byte(lm.model, lm.tokenizer, text)
    lm.save(output)
    report["output"] = str(args.output)
    if args.json:
        print_json(report)
        return 0
    scheme = "int8 per channel" if args.bits == 8 else f"int4, groups of {report['group_size']}"
    table = Table(show_edge=False)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column(scheme, justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("weights in memory", human_bytes(report["bytes_before"]), human_bytes(report["bytes_after"]),
                  f"{report['bytes_after'] / report['bytes_before']:.2f}×")
    if evaluate:
        b, a = report["before"], report["after"]
        table.add_row("bits per byte", f"{b['bits_per_byte']:.4f}", f"{a['bits_per_byte']:.4f}",
                      f"{a['bits_per_byte'] / b['bits_per_byte']:.3f}×")
        table.add_row("perplexity (per token)", f"{b['perplexity']:.3f}", f"{a['perplexity']:.3f}",
                      f"{a['perplexity'] / b['perplexity']:.3f}×")
    console.print(table)
    if evaluate:
        source = args.eval_text or "the built-in sample"
        console.print(f"measured on {report['after']['tokens']} tokens ({report['after']['bytes']} bytes) of {source}")
    console.print(f"wrote {args.output}")
    return 0
