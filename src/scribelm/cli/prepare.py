"""`scribe prepare INPUT... -o DATA_DIR --tokenizer TOK`: text to token shards.

DATA_DIR must be new, empty, or a data directory scribelm wrote (replaced
only with --force, and only once the new one is complete); it may not be,
contain or lie inside an input.
"""

from __future__ import annotations

from pathlib import Path

from scribelm.cli.common import console, human_bytes, human_count


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="clean, dedupe and tokenize text/JSONL/Parquet into token shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text, JSONL or Parquet files, or directories of them")
    p.add_argument("-o", "--output", required=True,
                   help="data directory to write: new, empty, or one scribelm wrote (replaced with --force)")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it holds earlier shards (a directory with other files is never replaced)")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json; omit to train one with --vocab-size")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer trained when --tokenizer is omitted")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--text-unit", choices=["paragraph", "file"], default="paragraph",
                   help="documents of plain-text files: blank-line separated paragraphs, or whole files")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.set_defaults(handler=run)


def progress_bar(description: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def run(args) -> int:
    from scribelm.data.prepare import check_output_apart, prepare, train_tokenizer_on
    from scribelm.io import claim_output_directory
    from scribelm.tokenizer import Tokenizer

    # Before any work: a refused output should not cost a tokenizer's training first.
    check_output_apart(args.inputs, args.output)
    output = claim_output_directory(args.output, force=args.force, kind="data directory")
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    else:
        with console.status(f"training a {args.vocab_size}-token byte-level BPE on the training split"):
            tokenizer = train_tokenizer_on(args.inputs, args.vocab_size, val_fraction=args.val_fraction,
                                           text_field=args.text_field, text_unit=args.text_unit)
    with progress_bar("tokenizing") as bar:
        task = bar.add_task("tokenize", total=None)
        manifest = prepare(
            args.inputs, output, tokenizer, val_fraction=args.val_fraction, text_field=args.text_field,
            text_unit=args.text_unit, shard_tokens=args.shard_tokens,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print_summary(manifest, Path(args.output))
    return 0


def print_summary(manifest, output: Path) -> None:
    splits = manifest["splits"]
    parts = []
    for name, split in splits.items():
        parts.append(f"{name} {human_count(split['tokens'])} tokens ({split['documents']} docs, "
                     f"{len(split['shards'])} shard{'s' if len(split['shards']) != 1 else ''})")
    console.print(f"wrote {output}: " + "; ".join(parts))
    source_bytes = sum(s["bytes"] for s in manifest["sources"])
    console.print(
        f"{len(manifest['sources'])} source file(s), {human_bytes(source_bytes)}; {manifest['documents']} documents kept, "
        f"{manifest['duplicates_dropped']} duplicates and {manifest['empty_dropped']} empty dropped; "
        f"{manifest['bytes_per_token']:.2f} bytes/token, ids as {manifest['dtype']} (vocab {manifest['vocab_size']})"
    )
