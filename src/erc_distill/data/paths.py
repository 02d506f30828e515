"""Where the corpora live: ``--data-dir``, else ``$ERC_DISTILL_DATA``, else a per-user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "ERC_DISTILL_DATA"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/erc-distill`` (default ``~/.cache/erc-distill``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "erc-distill"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: the argument, else ``$ERC_DISTILL_DATA``, else ``<user cache>/data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return user_cache_dir() / "data"
