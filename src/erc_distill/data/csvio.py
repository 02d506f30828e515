"""Strict CSV reading: every record keeps its line number, every failure is a :class:`DataError`."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from erc_distill.errors import DataError


@dataclass(frozen=True)
class CsvRecord:
    """One data row: its first physical line (1-based; the header is line 1) and its fields."""

    line: int
    fields: dict[str, str]


def read_text(path: Path) -> str:
    """Read ``path`` as UTF-8 (a leading BOM is dropped); non-UTF-8 bytes are a DataError with their line."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"bytes {raw[err.start:err.end]!r} at column {column} are not UTF-8 ({err.reason}); "
            "re-save the file as UTF-8",
            file=path,
            line=line,
        ) from None


def read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[CsvRecord]]:
    """Parse a headed CSV file; check that the ``required`` columns exist and every row is complete.

    Returns the header and the records. Quoted fields may span lines; ``CsvRecord.line`` is the
    line where the record starts.
    """
    text = read_text(path)
    if not text.strip():
        raise DataError("file is empty (expected a header line and rows)", file=path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"missing column(s) {', '.join(map(repr, missing))}; the header has: {', '.join(header)}",
                file=path,
                line=1,
                field=missing[0],
            )
        records = list(_records(reader, header, path))
    except csv.Error as err:
        raise DataError(f"malformed CSV: {err}", file=path, line=reader.line_num) from None
    if not records:
        raise DataError("file has a header but no rows", file=path, line=1)
    return header, records


def _records(reader: "csv._reader", header: list[str], path: Path) -> Iterator[CsvRecord]:
    previous_end = reader.line_num
    for row in reader:
        line = previous_end + 1
        previous_end = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise DataError(
                f"row has {len(row)} fields but the header has {len(header)}",
                file=path,
                line=line,
            )
        yield CsvRecord(line, dict(zip(header, row)))
