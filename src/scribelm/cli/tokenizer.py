"""`scribe tokenizer train|encode|decode`."""

from __future__ import annotations

from rich.table import Table

from scribelm.cli.common import console, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer, encode and decode text")
    verbs = p.add_subparsers(dest="tokenizer_verb", metavar="ACTION", required=True)

    train = verbs.add_parser("train", help="train on text files or folders of them")
    train.add_argument("files", nargs="+", metavar="INPUT",
                       help="UTF-8 text, JSONL or Parquet files, or folders of them (read as `scribe prepare` reads them)")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("-o", "--output", required=True,
                       help="directory to write tokenizer.json into: new, empty, or one scribelm wrote (with --force)")
    train.add_argument("--force", action="store_true",
                       help="replace OUTPUT if scribelm wrote it (a directory holding other files is never replaced)")
    train.set_defaults(handler=run_train)

    enc = verbs.add_parser("encode", help="show the tokens and ids of a text")
    enc.add_argument("tokenizer", help="tokenizer directory, tokenizer.json, or model directory")
    enc.add_argument("text")
    enc.add_argument("--json", action="store_true")
    enc.set_defaults(handler=run_encode)

    dec = verbs.add_parser("decode", help="turn ids back into text")
    dec.add_argument("tokenizer")
    dec.add_argument("ids", nargs="+", type=int)
    dec.set_defaults(handler=run_decode)


def run_train(args) -> int:
    from scribelm.tokenizer import Tokenizer, training_files

    from scribelm.io import atomic_directory, claim_output_directory

    files = training_files(args.files)  # folders as `scribe prepare` reads them; every file checked first
    output = claim_output_directory(args.output, force=args.force, kind="tokenizer")
    tok = Tokenizer.train(files, args.vocab_size, min_frequency=args.min_frequency, files=True, show_progress=False)
    with atomic_directory(output, kind="tokenizer") as tmp:
        tok.save(tmp)
    console.print(f"trained a byte-level BPE with {tok.vocab_size} tokens on {len(files)} file(s) -> {args.output}")
    return 0


def run_encode(args) -> int:
    from scribelm.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    pieces = [tok.token_bytes(i) for i in ids]
    if args.json:
        print_json({"ids": ids, "tokens": [p.decode("utf-8", errors="replace") for p in pieces], "count": len(ids)})
        return 0
    table = Table(show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    for n, (piece, i) in enumerate(zip(pieces, ids)):
        try:
            shown = repr(piece.decode("utf-8"))[1:-1]
        except UnicodeDecodeError:
            shown = " ".join(f"<0x{b:02X}>" for b in piece)  # part of a multi-byte character
        table.add_row(str(n), shown, str(i))
    console.print(table)
    console.print(f"{len(ids)} tokens, {len(args.text.encode('utf-8'))} bytes ({len(args.text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token)")
    return 0


def run_decode(args) -> int:
    from scribelm.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(tok.decode(args.ids))
    return 0
