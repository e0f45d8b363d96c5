"""`scribe convert SRC DST --to scribe|hf|gguf|onnx`: one model, another format.

SRC is anything `scribelm.load` reads (a scribelm checkpoint or a Hugging Face
directory). `scribe` and `hf` write directories; `gguf` and `onnx` write one
file. Every output is written atomically. An existing DST is replaced only
with --force, and only if scribelm wrote it (a directory with scribelm's
marker and nothing else, or a GGUF / ONNX file of that format): --force never
deletes a user's other files.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

from scribelm.cli.common import console, err_console, human_bytes
from scribelm.errors import ScribeError
from scribelm.io import claim_output_directory, claim_output_file

FORMATS = ("scribe", "hf", "gguf", "onnx")
DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a model between scribelm, Hugging Face, GGUF and ONNX")
    p.add_argument("src", help="scribelm checkpoint, Hugging Face model directory or GGUF file")
    p.add_argument("dst", help="output directory (scribe, hf) or file (gguf, onnx)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the source's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="hf: largest weight file before sharding (default 5GB)")
    p.add_argument("--architecture", help="hf: force the family, e.g. LlamaForCausalLM (default: picked from the config)")
    p.add_argument("--gguf-type", "--type", dest="gguf_type", default="f32",
                   help="gguf: tensor type f32, f16 or q8_0 (default f32)")
    p.add_argument("--force", action="store_true",
                   help="replace DST if scribelm wrote it (a directory holding other files is never replaced)")
    p.add_argument("--merge-lora", metavar="ADAPTER_DIR",
                   help="fold LoRA adapters (from `scribe finetune lora`) into SRC's weights before writing")
    p.set_defaults(handler=run)


def _exporter(module: str, function: str, what: str):
    """The export function of an optional interop module, or a clear error if it is absent."""
    try:
        return getattr(importlib.import_module(f"scribelm.interop.{module}"), function)
    except ModuleNotFoundError as err:
        if err.name == f"scribelm.interop.{module}":
            raise ScribeError(f"{what} export is not available in this scribelm installation") from None
        raise ScribeError(f"{what} export needs the package '{err.name}': pip install 'scribelm[{module}]'") from None


def convert(src: str | Path, dst: str | Path, to: str, *, dtype: str | None = None, max_shard_size: str = "5GB",
            architecture: str | None = None, gguf_type: str = "f32", force: bool = False,
            merge_lora: str | Path | None = None) -> Path:
    import torch

    import scribelm

    src, dst = Path(src), Path(dst)
    if to not in FORMATS:
        raise ScribeError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ScribeError("DST is the same as SRC; write the converted model somewhere else")
    if src.exists() and src.resolve() in dst.resolve().parents:
        raise ScribeError(f"DST {dst} lies inside SRC {src}; write the converted model outside the source model")
    if dtype is not None and dtype not in DTYPES:
        raise ScribeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if to in ("scribe", "hf"):
        dst = claim_output_directory(dst, force=force, kind="model directory")
    else:
        dst = claim_output_file(dst, force=force, kind=f"{to.upper()} file", looks_like=_LOOKS_LIKE[to])
    lm = scribelm.load(src, dtype=getattr(torch, dtype) if dtype else None)
    if merge_lora is not None:
        from scribelm.adapters import merge_lora as merge

        lm.apply_adapter(merge_lora)  # also carries the adapters' "chat_tuned" into generation.json
        merge(lm.model)
    if to == "scribe":
        return lm.save(dst)
    if to == "hf":
        return lm.save(dst, format="hf", max_shard_size=max_shard_size, architecture=architecture)
    if dst.is_dir():
        raise ScribeError(f"{dst} is a directory; {to} export writes a single file")
    if to == "gguf":
        _exporter("gguf", "export_gguf", "GGUF")(lm, dst, type=gguf_type)
    else:
        _exporter("onnx", "export_onnx", "ONNX")(lm, dst)
    return dst


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


# What an earlier export of each single-file format looks like, so --force replaces
# only such a file: GGUF's magic; an ONNX model is a protobuf whose first field
# (ir_version, field 1, varint) is the byte 0x08.
_LOOKS_LIKE = {
    "gguf": lambda path: _starts_with(path, b"GGUF"),
    "onnx": lambda path: path.suffix.lower() == ".onnx" and _starts_with(path, b"\x08"),
}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def run(args) -> int:
    with warnings.catch_warnings(record=True) as caught:  # one readable line each, not Python's format
        warnings.simplefilter("always", UserWarning)
        out = convert(
            args.src, args.dst, args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
            architecture=args.architecture, gguf_type=args.gguf_type, force=args.force, merge_lora=args.merge_lora,
        )
    for warning in caught:
        err_console.print(f"warning: {warning.message}")
    console.print(f"wrote {out} ({args.to}, {human_bytes(_size(Path(out)))})")
    return 0
