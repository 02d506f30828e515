"""The inference server's settings: one frozen dataclass, read from a YAML file and the command line.

Fields use the run config's :func:`~erc_distill.config.opt` metadata and are checked by the same
:func:`~erc_distill.config.validate_value`, so a bad value is a :class:`~erc_distill.errors.ConfigError`
naming the file (or ``command line``) and the field. Imports nothing of the web stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erc_distill.config import leaves, opt, read_yaml_mapping, validate_value
from erc_distill.errors import ConfigError, DataError


def _check_model_file(value: str) -> str | None:
    if "/" in value or "\\" in value or value in (".", ".."):
        return f"must be a file name inside the bundle folder, got {value!r}"
    return None


@dataclass(frozen=True)
class ServeConfig:
    """How ``erc-distill serve`` listens, batches and bounds what it keeps."""

    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "TCP port (0: any free port; the URL line says which)", ge=0, le=65535)
    max_batch: int = opt(8, "most turns run in one model call", ge=1, le=1024)
    max_wait_ms: float = opt(0.0, "longest a turn waits for others to fill its batch (0: none; a batch is what queued "
                             "while the model ran)", ge=0, le=1000)
    queue_size: int = opt(64, "turns waiting for the model; a turn beyond gets 503 + Retry-After", ge=1, le=100_000)
    max_body_bytes: int = opt(65536, "largest request body or WebSocket frame (bytes); larger: 413 / close 1009",
                              ge=256, le=64 << 20)
    max_text_chars: int = opt(2000, "longest turn text (characters); longer: 422", ge=1, le=1_000_000)
    max_conversations: int = opt(1000, "live conversations kept (least recently used evicted)", ge=1, le=10_000_000)
    idle_ttl_s: float | None = opt(3600.0, "seconds before an idle conversation is forgotten (null: never)", gt=0)
    threads: int | None = opt(None, "ONNX Runtime intra-op threads (null: its default)", ge=1, le=1024)
    model_file: str | None = opt(None, "graph in the bundle, e.g. model-int8-ort-dynamic.onnx (null: bundle.json's)",
                                 check=_check_model_file)


FIELDS = {leaf.path: leaf for leaf in leaves(ServeConfig)}


def serve_config(values: dict[str, Any], source: str, base: ServeConfig | None = None) -> ServeConfig:
    """``base`` (default: the defaults) with ``values`` applied; each one coerced and checked.

    Unknown keys and bad values are a :class:`ConfigError` naming ``source`` and the field."""
    changes = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown setting; known: {', '.join(FIELDS)}", field=str(key), source=source)
        try:
            changes[name] = validate_value(FIELDS[name], value)
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err), field=str(key), source=source) from None
    return dataclasses.replace(base or ServeConfig(), **changes)


def load_serve_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """The settings of a YAML file (a mapping of field: value; every field optional), then ``overrides``
    (the command line's flags; None values are left out).

    A missing or unreadable file, bad YAML or a non-mapping is a :class:`DataError` naming the file; an
    unknown key or a bad value a :class:`ConfigError` naming the file and the field.
    """
    cfg = ServeConfig()
    if path is not None:
        if not Path(path).is_file():
            raise DataError("serve config file not found", file=path)
        values, source = read_yaml_mapping(Path(path), "erc_distill.serve", "serve config")
        cfg = serve_config(values, source, cfg)
    return serve_config({k: v for k, v in overrides.items() if v is not None}, "command line", cfg)
