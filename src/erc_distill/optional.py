"""Optional dependencies, imported lazily with an error that says how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType

_HINTS = {
    "torchvision": (
        "vision",
        "PyPI's torchvision does not import beside the CPU torch 2.13.0 wheel; on x86-64 use "
        "`pip install torch==2.14.1 torchvision==0.29.1` (a CUDA build), on aarch64 "
        "`pip install torch==2.9.1 torchvision==0.24.1`",
    ),
    "tensorrt": ("tensorrt", "TensorRT needs an NVIDIA GPU and its driver"),
    "soundfile": ("audio", "soundfile reads wav / flac clips (it bundles libsndfile)"),
    "soxr": ("audio", "soxr resamples audio to the models' rate"),
    "av": ("audio", "PyAV (it bundles FFmpeg) reads the audio track of video clips (mp4, mkv)"),
}


def optional_import(module: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming the extra to install and known pitfalls."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # torchvision fails with RuntimeError, not ImportError, on a mismatched torch
        extra, hint = _HINTS.get(module.split(".")[0], (None, ""))
        msg = f"{module} is needed here but cannot be imported ({err.__class__.__name__}: {err})."
        if extra:
            msg += f' Install it with `pip install "erc-distill[{extra}]"`. {hint}.'
        raise ImportError(msg) from err
