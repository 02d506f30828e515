"""Stale build locks of NNCF's C++ extension: never wait on them for ever, and say what is waited for.

torch builds an extension under a ``lock`` file (``torch.utils.file_baton``) and waits, silently and
without limit, while that file exists. A process killed mid-build leaves it behind, and every later
NNCF run then hangs at "Compiling and loading torch extension". Before NNCF loads its extension,
:func:`clear_stale_build_locks` takes an OS lock of ours (``fcntl.flock``: released by the kernel
when its holder dies, so it can never be stale), then treats a torch ``lock`` as stale once no build
has touched its folder for ``stale_after_s``; a younger one is waited on with a message saying which
file, for how long at most.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def extensions_root() -> Path:
    """torch's extension build root (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/py<ver>_<cpu|cuXY>``)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("nncf", verbose=False))


def _last_activity(lock: Path) -> float:
    """Newest mtime in the lock's build folder (a live build keeps writing objects and logs)."""
    folder = lock.parent
    times = [lock.stat().st_mtime]
    times += [p.stat().st_mtime for p in folder.iterdir() if p.is_file()]
    return max(times)


@contextlib.contextmanager
def _flock(path: Path, timeout_s: float, log: Callable[[str], None]) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    log(f"waiting for another erc-distill process building NNCF's extension (lock {path}), "
                        f"at most {timeout_s:.0f} s")
                    told = True
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"another process has held {path} for {timeout_s:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def clear_stale_build_locks(root: Path | None = None, stale_after_s: float = 300.0, wait_s: float = 600.0,
                            log: Callable[[str], None] = print, poll_s: float = 1.0) -> list[Path]:
    """Remove torch build ``lock`` files under ``root`` that no live build holds; returns those removed.

    A lock whose build folder saw no write for ``stale_after_s`` is stale (a real compile writes
    within seconds); a fresher one is waited on (at most ``wait_s``, then treated as stale), with a
    message naming it.
    """
    root = root or extensions_root()
    removed: list[Path] = []
    with _flock(root / ".erc-distill.flock", wait_s, log):
        for lock in sorted(root.rglob("lock")):
            start, told = time.monotonic(), False
            while lock.exists():
                idle = time.time() - _last_activity(lock)
                if idle >= stale_after_s or time.monotonic() - start >= wait_s:
                    lock.unlink(missing_ok=True)
                    removed.append(lock)
                    log(f"removed a stale build lock {lock} (no build activity for {idle:.0f} s: a killed "
                        "earlier run left it)")
                    break
                if not told:
                    log(f"waiting on build lock {lock} (written {idle:.0f} s ago by a build in progress?); "
                        f"treated as stale after {stale_after_s:.0f} s without activity")
                    told = True
                time.sleep(poll_s)
    return removed


def guard_nncf_extension(log: Callable[[str], None] = print) -> None:
    """Call before NNCF first loads its extension: stale locks go, and a slow first build is not a failure."""
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    try:
        clear_stale_build_locks(log=log)
    except ImportError:  # no torch cpp_extension: nothing to guard
        pass
