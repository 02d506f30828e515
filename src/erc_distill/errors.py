"""Errors that a user can act on: one family, printed by the CLI as one line.

Every subclass of :class:`UserError` means "the input or the setting is wrong, here is what and
where"; the CLI prints ``erc-distill COMMAND: error: <message>`` and exits 1. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Base of the errors a user can fix (bad data, config, bundle, export, training settings)."""


class DataError(UserError, ValueError):
    """Bad input data, located as precisely as possible.

    ``str(err)`` reads ``<file>:<line>: field '<field>': <message>``; parts that are unknown
    are left out. ``line`` is the 1-based physical line in the file (the header is line 1).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        if self.field is not None:
            where += f": field {self.field!r}"
        return f"{where}: {self.message}"


class ConfigError(UserError, ValueError):
    """A bad setting: ``<source>: <field>: <message>`` (source: the experiment file, or the command line)."""

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None) -> None:
        self.message, self.field, self.source = message, field, source
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, None if self.field is None else f"{self.field}") if p]
        return ": ".join([*parts, self.message])


class ModelNotFoundError(ConfigError, OSError):
    """A teacher / student / tokenizer name that resolves to no local folder, package or hub copy."""


class BundleError(UserError, ValueError):
    """An inference bundle that cannot be trusted: a missing, truncated or altered file, or a graph
    that does not match ``bundle.json``. The message names the file."""


class ExportError(UserError, RuntimeError):
    """An exported or quantized artifact failed its check; the message carries the measured numbers."""


class TrainingError(UserError, RuntimeError):
    """Training produced something unusable (a non-finite loss or weight): the stage is not marked done."""
