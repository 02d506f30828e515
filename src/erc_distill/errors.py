"""Errors that a user can act on."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
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


class ExportError(RuntimeError):
    """An exported or quantized artifact failed its check; the message carries the measured numbers."""
