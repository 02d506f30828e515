"""Write an inference bundle (see :mod:`erc_distill.runtime.bundle`) from a trained model."""

from __future__ import annotations

import copy

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from erc_distill.atomic import atomic_path, write_json
from erc_distill.data.context import ContextConfig
from erc_distill.export.onnx_export import AUDIO_INPUT_NAMES, INPUT_NAMES, export_audio_onnx, export_onnx
from erc_distill.modeling import PromptedClassifier
from erc_distill.runtime.bundle import BUNDLE_FORMAT, file_record, record_bundle_file

__all__ = ["record_bundle_file", "write_audio_bundle", "write_bundle"]


def write_bundle(model: PromptedClassifier, tokenizer: Any, context: ContextConfig, folder: str | Path,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Export ``model`` to ``folder/model.onnx`` and write the tokenizer and ``bundle.json`` beside it.

    Every file is written atomically, ``bundle.json`` last, with the size and SHA-256 of ``model.onnx``
    and ``tokenizer.json`` in its ``files`` (checked by :meth:`~erc_distill.runtime.Bundle.load`): a kill
    mid-export leaves either the old bundle or one that fails to load with a message naming the file.
    Graphs added to the folder later are recorded with :func:`record_bundle_file`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the bundle needs a fast tokenizer (tokenizers library); this one is slow")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with atomic_path(folder / "model.onnx") as tmp:
        export_onnx(model, tmp, pad_id=pad)
    backend = copy.deepcopy(tokenizer.backend_tokenizer)  # saved without padding / truncation: the builder does both
    backend.no_padding()
    backend.no_truncation()
    with atomic_path(folder / "tokenizer.json") as tmp:
        backend.save(str(tmp))
    special = {
        "cls": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
        "sep": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
        "mask": tokenizer.mask_token_id,
        "pad": pad,
    }
    meta = {
        "format": BUNDLE_FORMAT,
        "model": "model.onnx",
        "tokenizer": "tokenizer.json",
        "labels": list(model.labels),
        "context": asdict(context),
        "special_ids": special,
        "inputs": list(INPUT_NAMES),
        "source": model.source,
        "params": sum(p.numel() for p in model.parameters()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"provenance": provenance} if provenance else {}),
        "files": {name: file_record(folder / name) for name in ("model.onnx", "tokenizer.json")},
    }
    write_json(folder / "bundle.json", meta)
    return folder


def write_audio_bundle(model: Any, folder: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Export an :class:`~erc_distill.audio.model.AudioClassifier` to ``folder/model.onnx`` and write
    ``bundle.json`` (:mod:`erc_distill.runtime.audio_bundle`): labels, the log-mel settings, checksums."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.onnx") as tmp:
        export_audio_onnx(model, tmp)
    meta = {
        "format": BUNDLE_FORMAT,
        "modality": "audio",
        "model": "model.onnx",
        "labels": list(model.labels),
        "preprocessing": model.preprocessing,
        "inputs": list(AUDIO_INPUT_NAMES),
        "source": model.source,
        "params": sum(p.numel() for p in model.parameters()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"provenance": provenance} if provenance else {}),
        "files": {"model.onnx": file_record(folder / "model.onnx")},
    }
    write_json(folder / "bundle.json", meta)
    return folder
