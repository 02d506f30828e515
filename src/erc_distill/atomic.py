"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half.

Every file a stage writes goes through :func:`atomic_path` (write to a hidden temporary sibling,
flush, ``os.replace``) or one of its wrappers. A kill mid-write leaves at most a ``.*.tmp-<pid>``
file, which the next write replaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` in one step.

    >>> with atomic_path("out.onnx") as tmp:
    ...     onnx.save(model, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a string from a temp name) is running; False for garbage."""
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # our own leftover from an earlier failed attempt
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path, exclude: frozenset[str] = frozenset()) -> str:
    """Hex SHA-256 of a file, or of a folder: its files' relative paths and contents, in sorted order
    (hidden temporary files and top-level names in ``exclude`` left out)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".tmp" not in p.name
                    and p.relative_to(path).parts[0] not in exclude):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on a clean exit it takes ``path``'s place.

    A kill leaves either the old folder or the new one complete (plus a hidden ``.*.tmp-<pid>`` or
    ``.*.old-<pid>`` folder, cleared by the next call), never a half-written ``path``.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in list(path.parent.glob(f".{path.name}.tmp-*")) + list(path.parent.glob(f".{path.name}.old-*")):
        if not _alive(stale.name.rpartition("-")[2]):  # another live process may be writing its own
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
