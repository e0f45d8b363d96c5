"""Errors a user can cause.

Every mistake a user can make (a missing file, an unknown preset, a config
whose heads do not divide its width) raises a `ScribeError` whose message
says what went wrong and what to do. The CLI prints that message on one line
and exits non-zero; it never shows a traceback for these.
"""


class ScribeError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(ScribeError, ValueError):
    """A model or run configuration that cannot work."""


class CheckpointError(ScribeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class TokenizerError(ScribeError, ValueError):
    """Text or a tokenizer file the tokenizer cannot handle."""
