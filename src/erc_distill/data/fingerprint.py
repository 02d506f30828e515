"""What data a run reads, as one hash: part of the teacher, cache and student keys.

:func:`corpus_fingerprint` hashes each split file's name (relative to the data directory) and
content, never an absolute path: the same files give the same fingerprint on any machine or in
any folder, and a teacher trained on fixture or tiny data is never taken for one trained on the
real corpus. File hashes are memoised per (path, size, mtime) within the process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from erc_distill.atomic import sha256_file
from erc_distill.data.corpora import CorpusSpec, check_splits, get_corpus, missing_split_error
from erc_distill.data.paths import resolve_data_dir
from erc_distill.data.types import SPLITS, Split

FINGERPRINT_VERSION = 1
_RACY_NS = 2_000_000_000
"""A file modified this recently (ns) is hashed again each time: a second write in the same clock
tick would leave its size and mtime unchanged (git's "racy clean" rule)."""


def _spec(corpus: str | CorpusSpec) -> CorpusSpec:
    return corpus if isinstance(corpus, CorpusSpec) else get_corpus(corpus)


def corpus_files(
    corpus: str | CorpusSpec, data_dir: str | Path | None = None, splits: Iterable[Split] = SPLITS
) -> list[Path]:
    """The files the split reader reads for ``splits`` of ``corpus``, one a split in that order:
    for each, the first of its candidate names that exists in the data directory (see
    :func:`resolve_data_dir`), as an absolute path. A missing one is a :class:`DataError` that names
    the file and how to get it."""
    spec = _spec(corpus)
    root = resolve_data_dir(data_dir)
    files = []
    for split in check_splits(splits):
        path = spec.find(root, split)
        if path is None:
            raise missing_split_error(spec, root, split)
        files.append(path.absolute())
    return files


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, memoised per (resolved path, size, mtime_ns) within the process."""
    path = Path(path).resolve()
    st = os.stat(path)
    if time.time_ns() - st.st_mtime_ns < _RACY_NS:
        return sha256_file(path)
    return _hash_once(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hash_once(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def corpus_fingerprint(
    corpus: str | CorpusSpec, data_dir: str | Path | None = None, splits: Iterable[Split] = SPLITS
) -> str:
    """Hex SHA-256 over the corpus name and, for each split in ``splits`` (in the order train, dev,
    test), the split, the file's name inside the data directory (``meld/train_sent_emo.csv``) and
    the SHA-256 of its bytes. Stable across machines and folders; changes with any byte of a file.
    A missing file is a :class:`DataError` (see :func:`corpus_files`)."""
    spec = _spec(corpus)
    wanted = set(check_splits(splits))
    ordered = [split for split in SPLITS if split in wanted]
    h = hashlib.sha256(f"erc-distill corpus fingerprint v{FINGERPRINT_VERSION}\n{spec.name}\n".encode())
    for split, path in zip(ordered, corpus_files(spec, data_dir, ordered)):
        h.update(f"{split}\t{spec.folder}/{path.name}\t{file_sha256(path)}\n".encode())
    return h.hexdigest()
