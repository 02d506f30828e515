"""``erc-distill fetch-data``: get the authors' public CSVs, verified against known SHA-256 sums.

Either downloads them (declare-lab/MELD on GitHub) or copies them from a local folder
(``--from DIR``: the corpus folder itself, or a folder that holds it). Files are written
atomically and re-used when already present with the right checksum.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from erc_distill.data.corpora import CorpusSpec, get_corpus
from erc_distill.data.types import SPLITS
from erc_distill.errors import DataError


def known_checksums() -> dict[str, str]:
    """``'<folder>/<file>' -> sha256`` for every public CSV the project knows (package data)."""
    text = resources.files("erc_distill.data").joinpath("checksums.txt").read_text("utf-8")
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FetchedFile:
    path: Path
    sha256: str
    action: str  # "kept" (already there and verified), "copied", "downloaded"


def fetch_corpus(
    name: str,
    data_dir: Path,
    source_dir: Path | None = None,
    base_url: str | None = None,
    timeout: float = 60.0,
) -> list[FetchedFile]:
    """Place the three split CSVs of corpus ``name`` in ``data_dir/<folder>/``, verified.

    ``source_dir``: copy from this folder instead of downloading. ``base_url``: download from
    here instead of the authors' repository (a mirror; ``{file}`` is filled in).
    A checksum mismatch is a :class:`DataError` and leaves nothing behind.
    """
    spec = get_corpus(name)
    if source_dir is None and spec.source_url is None and base_url is None:
        raise DataError(f"{spec.name} cannot be downloaded (its license needs a signed form); use --from DIR")
    sums = known_checksums()
    target = data_dir / spec.folder
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for split in SPLITS:
        file = spec.files[split]
        expected = sums.get(f"{spec.folder}/{file}")
        dest = target / file
        if dest.is_file() and expected and sha256(dest) == expected:
            out.append(FetchedFile(dest, expected, "kept"))
            continue
        with tempfile.NamedTemporaryFile(dir=target, prefix=f".{file}.", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        try:
            if source_dir is not None:
                src = _find_in(source_dir, spec, file)
                shutil.copyfile(src, tmp_path)
                action, origin = "copied", str(src)
            else:
                url = (base_url or spec.source_url).format(file=file)
                _download(url, tmp_path, timeout)
                action, origin = "downloaded", url
            digest = sha256(tmp_path)
            if expected and digest != expected:
                raise DataError(f"checksum mismatch for {origin}: sha256 {digest}, expected {expected}", file=origin)
            os.replace(tmp_path, dest)
        finally:
            tmp_path.unlink(missing_ok=True)
        out.append(FetchedFile(dest, digest, action))
    return out


def _find_in(source_dir: Path, spec: CorpusSpec, file: str) -> Path:
    for candidate in (source_dir / file, source_dir / spec.folder / file):
        if candidate.is_file():
            return candidate
    raise DataError(f"{file} not found in {source_dir} or {source_dir / spec.folder}", file=source_dir / file)


def _download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as fh:
            shutil.copyfileobj(response, fh)
    except OSError as err:  # URLError, HTTPError and timeouts are OSErrors
        raise DataError(f"download failed: {err}; copy the files instead with --from DIR", file=url) from None
