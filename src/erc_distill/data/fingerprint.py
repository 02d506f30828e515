"""What data a run reads, as one hash: part of the teacher, cache and student keys.

:func:`corpus_fingerprint` hashes each split file's name (relative to the data directory) and
content, never an absolute path: the same files give the same fingerprint on any machine or in
any folder, and a teacher trained on fixture or tiny data is never taken for one trained on the
real corpus. File hashes are memoised per (path, size, mtime) within the process.

A clip-folder corpus (RAVDESS, ``layout="clips"``: 1440 files shared by all splits) is not hashed
byte by byte on every run. Its digest (:func:`clips_digest`) lists every file under the folder by
relative name and size, with the SHA-256 that a ``SHA256SUMS`` manifest (``sha256sum`` format, in
the clip folder or a folder above it inside the corpus folder) records for it; a file the manifest
does not list enters with its modification time instead. So a copy elsewhere with its manifest
keeps the fingerprint, and any added, removed, renamed or resized clip changes it; a clip
rewritten in place to the same size changes it only when it has no manifest entry (trusting the
manifest is the price: ``sha256sum -c SHA256SUMS`` checks it). Without a manifest, names, sizes
and mtimes (a copy then gets a new fingerprint: the safe direction). Measured on the shared 16 kHz
RAVDESS (1440 FLACs, 52 MB, 2 cores): the digest ~30 ms, hashing every byte ~240 ms (the authors'
48 kHz WAVs are ~4x larger, their full audio-video release ~25 GB).
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
MANIFEST_NAME = "SHA256SUMS"
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
    :func:`resolve_data_dir`), as an absolute path (for a clip-folder corpus, the folder, the same
    for every split). A missing one is a :class:`DataError` that names
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
    the SHA-256 of its bytes (of a clip folder: its :func:`clips_digest`). Stable across machines
    and folders; changes with any byte of a file (of a clip folder: see the module doc).
    A missing file is a :class:`DataError` (see :func:`corpus_files`)."""
    spec = _spec(corpus)
    wanted = set(check_splits(splits))
    ordered = [split for split in SPLITS if split in wanted]
    h = hashlib.sha256(f"erc-distill corpus fingerprint v{FINGERPRINT_VERSION}\n{spec.name}\n".encode())
    root = resolve_data_dir(data_dir)
    digests: dict[Path, str] = {}
    for split, path in zip(ordered, corpus_files(spec, data_dir, ordered)):
        if spec.layout == "clips":
            if path not in digests:  # all splits share the folder
                digests[path] = clips_digest(path, manifest_root=(root / spec.folder).absolute())
            digest = digests[path]
        else:
            digest = file_sha256(path)
        h.update(f"{split}\t{spec.folder}/{path.name}\t{digest}\n".encode())
    return h.hexdigest()


def clips_digest(folder: str | Path, manifest_root: str | Path | None = None) -> str:
    """Hex SHA-256 over the files under ``folder`` (hidden ones left out): each one's relative
    name, size and either the SHA-256 a ``SHA256SUMS`` manifest lists for it or its mtime (see the
    module doc). The manifest is looked for in ``folder``, then in each parent up to
    ``manifest_root`` (default: ``folder`` only); the nearest one is used."""
    folder = Path(folder).absolute()
    listed = _manifest_sums(folder, None if manifest_root is None else Path(manifest_root).absolute())
    h = hashlib.sha256(b"erc-distill clips digest v1\n")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        st = path.stat()
        known = listed.get(rel)
        content = f"sha256:{known}" if known else f"mtime_ns:{st.st_mtime_ns}"
        h.update(f"{rel}\t{st.st_size}\t{content}\n".encode())
    return h.hexdigest()


def _manifest_sums(folder: Path, manifest_root: Path | None) -> dict[str, str]:
    """``relative name under folder -> sha256`` from the nearest manifest (empty when there is none)."""
    here = folder
    while True:
        manifest = here / MANIFEST_NAME
        if manifest.is_file():
            break
        if manifest_root is None or here == manifest_root or here.parent == here or manifest_root not in here.parents:
            return {}
        here = here.parent
    sums = {}
    for line in manifest.read_text("utf-8", errors="replace").splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            continue  # not a sha256sum line
        name = parts[1].lstrip("*")  # sha256sum's binary-mode marker
        rel = os.path.relpath(os.path.normpath(here / name), folder)
        if rel == os.curdir or rel.split(os.sep)[0] == os.pardir:
            continue  # a file outside the clip folder (e.g. the corpus's other copy)
        sums[Path(rel).as_posix()] = parts[0].lower()
    return sums
