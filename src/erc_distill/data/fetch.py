"""``erc-distill fetch-data``: get the authors' public CSVs, verified against known SHA-256 sums.

Either downloads them (declare-lab/MELD on GitHub) or copies them from a local folder
(``--from DIR``: the corpus folder itself, or a folder that holds it). Files are written
atomically and re-used when already present with the right checksum.

:func:`ensure_corpus` is the start-up check of a run: the corpus is there, or it is fetched now
(when it can be downloaded and the network answers within seconds), or a :class:`DataError` says
which file is missing and how to get it.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from erc_distill.atomic import sha256_file
from erc_distill.data.corpora import CorpusSpec, check_splits, get_corpus, missing_split_error
from erc_distill.data.paths import resolve_data_dir
from erc_distill.data.types import SPLITS, Split
from erc_distill.errors import DataError

ENSURE_TIMEOUT = 5.0
"""Seconds :func:`ensure_corpus` waits for the network (connect, and each read) before giving up."""


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
    """Hex SHA-256 of a file's bytes."""
    return sha256_file(path)


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
    splits: Iterable[Split] = SPLITS,
) -> list[FetchedFile]:
    """Place the split CSVs of corpus ``name`` (all three by default) in ``data_dir/<folder>/``, verified.

    ``source_dir``: copy from this folder instead of downloading. ``base_url``: download from
    here instead of the authors' repository (a mirror, or a ``file://`` URL; ``{file}`` is filled in).
    A checksum mismatch or a failed download is a :class:`DataError` and leaves nothing behind.
    """
    spec = get_corpus(name)
    if spec.layout != "csv":  # a folder of clips (RAVDESS): its license rules out fetching
        how = spec.obtain.format(folder=Path(data_dir) / spec.folder) if spec.obtain else "place its files yourself"
        raise DataError(f"{spec.name} cannot be fetched: {how}")
    if source_dir is None and spec.source_url is None and base_url is None:
        raise DataError(f"{spec.name} cannot be downloaded (its license needs a signed form); use --from DIR")
    splits = check_splits(splits)
    sums = known_checksums()
    target = Path(data_dir) / spec.folder
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for split in splits:
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
                src = _find_in(Path(source_dir), spec, split)
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


def _find_in(source_dir: Path, spec: CorpusSpec, split: Split) -> Path:
    names = spec.candidates(split)
    for folder in (source_dir, source_dir / spec.folder):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        f"{' or '.join(names)} not found in {source_dir} or {source_dir / spec.folder}", file=source_dir / names[0]
    )


def _download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as fh:
            shutil.copyfileobj(response, fh)
    # URLError, HTTPError and timeouts are OSErrors; a cut-off body is an HTTPException;
    # a URL urllib cannot open at all is a ValueError
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise DataError(f"download failed: {err}; copy the files instead with --from DIR", file=url) from None


def ensure_corpus(
    corpus: str,
    data_dir: str | Path | None = None,
    splits: Iterable[Split] = SPLITS,
    fetch: bool = True,
    log: Callable[[str], object] | None = print,
    *,
    base_url: str | None = None,
    timeout: float = ENSURE_TIMEOUT,
) -> Path:
    """Make sure the ``splits`` of ``corpus`` are in the data directory; return that directory.

    Every file present: nothing is done. Some missing: when ``fetch`` is on and the corpus can be
    downloaded (it has a ``source_url``, or ``base_url`` names a mirror), the missing splits are
    downloaded and verified against the known SHA-256 sums (files already there are left alone),
    and ``log`` says what was done. Otherwise, or when the download fails (no network: it gives up
    after ``timeout`` seconds without an answer), a :class:`DataError` names the missing file, the
    ``erc-distill fetch-data`` command, ``--data-dir`` / ``$ERC_DISTILL_DATA`` and why the
    automatic fetch failed. IEMOCAP and RAVDESS (licenses) fail straight away, saying where to get them.
    """
    spec = get_corpus(corpus)
    splits = check_splits(splits)
    root = resolve_data_dir(data_dir)
    missing = [split for split in dict.fromkeys(splits) if spec.find(root, split) is None]
    if not missing:
        return root
    url = base_url or spec.source_url
    if url is None:
        raise missing_split_error(spec, root, missing[0])
    if not fetch:
        raise missing_split_error(spec, root, missing[0], "automatic fetching is off")
    say = log or (lambda _message: None)
    where = url.replace("{file}", "*")
    say(f"{spec.name}: {', '.join(missing)} split file(s) missing in {root / spec.folder}; fetching from {where}")
    try:
        unreachable = _probe(url, timeout)
        if unreachable:
            raise DataError(unreachable, file=where)
        files = fetch_corpus(spec.name, root, base_url=base_url, timeout=timeout, splits=missing)
    except (DataError, OSError) as err:
        why = err.message if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
        raise missing_split_error(spec, root, missing[0], f"the automatic fetch from {where} failed: {why}") from err
    sums = known_checksums()
    for f in files:
        verified = "verified" if sums.get(f"{spec.folder}/{f.path.name}") == f.sha256 else "no known checksum"
        say(f"{spec.name}: {f.action} {f.path} (sha256 {f.sha256[:16]}…, {verified})")
    return root


def _probe(url: str, timeout: float) -> str | None:
    """None when the host (or the proxy) of an http(s) ``url`` accepts a connection within
    ``timeout`` seconds in all (name lookup included, which ``urlopen``'s timeout does not bound),
    else why not. Other schemes (``file://``) are not probed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "//" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            host, port = proxy_parts.hostname, proxy_parts.port or 80
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, name="erc-distill-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout:g} s (offline?)"
    if outcome[0] is not None:
        return f"cannot reach {host}:{port}: {outcome[0]}"
    return None
