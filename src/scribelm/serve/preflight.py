"""Start-up checks of the served models' files: a broken model is reported before serving starts.

Models load lazily (on their first request) so that a server with many models
starts at once; but a corrupt file must not wait for a user to find it.
`check_model_files` reads what is cheap to read, without loading weights:

    config.json         a JSON object
    *.safetensors       each header readable and consistent with the file's size
    tokenizer.json      present (serving turns text into ids) and a JSON object
    generation.json,    when present, JSON objects
    generation_config.json

and raises a `ScribeError` naming the model, the file and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from scribelm.errors import ScribeError
from scribelm.io import read_json_object
from scribelm.store import ModelInfo, describe_model


class ModelFilesError(ScribeError):
    """A served model whose files are missing or corrupt."""


def _json_object(file: Path, name: str) -> None:
    try:
        read_json_object(file, ScribeError, missing=f"{file} is missing")
    except (ScribeError, OSError) as err:
        raise ModelFilesError(f"model {name!r}: {err}") from None


def check_model_files(name: str, path: str | Path) -> ModelInfo:
    """Check a served model's files without loading its weights; returns what the registry knows of it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        info = describe_model(path)  # config.json is an object; safetensors headers parse
    except ScribeError as err:
        raise ModelFilesError(f"model {name!r}: {err}") from None
    if info.format == "gguf":  # its header, read in full above, holds the tokenizer too
        return info
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:  # checks the header against the file's size
                handle.keys()
        except Exception as err:  # safetensors raises its own error types
            raise ModelFilesError(f"model {name!r}: {weights} is corrupt ({str(err).splitlines()[0][:200]})") from None
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        raise ModelFilesError(f"model {name!r}: {path} has no tokenizer.json; serving needs one to turn text into ids")
    _json_object(tokenizer, name)
    for side in ("generation.json", "generation_config.json"):
        if (path / side).is_file():
            _json_object(path / side, name)
    return info
