"""Errors a user can cause.

Every mistake a user can make (a missing file, an unknown preset, a config
whose heads do not divide its width) raises a `ScribeError` whose message
says what went wrong and what to do. The CLI prints that message on one line
and exits non-zero; it never shows a traceback for these.
"""


from __future__ import annotations

import dataclasses
from collections.abc import Iterable


class ScribeError(Exception):
    """A problem the user can fix; the message says how."""


def reject_unknown_fields(names: Iterable[str], dataclass_type: type, what: str, error: type[ScribeError]) -> None:
    """Raise `error` naming the entries of `names` that are not fields of `dataclass_type`
    (a typo in a config file or a keyword), with the fields that exist."""
    known = {f.name for f in dataclasses.fields(dataclass_type)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise error(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")


class ConfigError(ScribeError, ValueError):
    """A model or run configuration that cannot work."""


class CheckpointError(ScribeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class TokenizerError(ScribeError, ValueError):
    """Text or a tokenizer file the tokenizer cannot handle."""
