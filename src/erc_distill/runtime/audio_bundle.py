"""The audio inference bundle: a speech-emotion model the robot runs on raw 16 kHz samples.

Folder layout::

    model.onnx        the graph (features [B, n_mels, T] float32, lengths [B] int64 -> logits [B, C])
    bundle.json       ``"modality": "audio"``, labels, ``preprocessing`` (the log-mel settings the
                      model was trained on), input names, provenance, and ``files`` (size + SHA-256
                      of every graph, as in the text bundle)

No tokenizer and no torch: the features are computed with numpy (:mod:`erc_distill.audio.features`),
the graph runs in ONNX Runtime on the clip's own length. :meth:`AudioBundle.load` checks what the
text bundle checks (every failure a :class:`~erc_distill.errors.BundleError` naming the file), and
that the preprocessing is one this runtime computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.errors import BundleError
from erc_distill.runtime.bundle import (
    BUNDLE_FORMAT,
    REEXPORT,
    _check_file,
    _check_name,
    _open_session,
    _read_meta,
    json_type,
)

AUDIO_INPUTS = ("features", "lengths")
REQUIRED_KEYS = ("format", "modality", "model", "labels", "preprocessing")


def supported_preprocessing(n_mels: int) -> dict[str, Any]:
    """The log-mel settings :func:`~erc_distill.audio.features.log_mel_spectrogram` computes."""
    from erc_distill.audio import features as F

    return {"input": "log-mel", "sample_rate": F.SAMPLE_RATE, "n_mels": n_mels, "n_fft": F.N_FFT,
            "hop_length": F.HOP_LENGTH, "normalisation": "whisper", "padding": "own-length"}


@dataclass
class AudioBundle:
    folder: Path
    labels: tuple[str, ...]
    preprocessing: dict[str, Any]
    session: Any
    meta: dict[str, Any]
    model_file: str = "model.onnx"
    modality = "audio"

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, model_file: str | None = None,
             verify: bool = True, spin: bool = True) -> "AudioBundle":
        """Open and check an audio bundle (arguments as :meth:`erc_distill.runtime.Bundle.load`)."""
        folder = Path(folder)
        meta_file = folder / "bundle.json"
        meta = _read_meta(folder, meta_file)
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{meta_file}: bundle format {meta.get('format')!r}, this erc-distill reads "
                              f"{BUNDLE_FORMAT}; {REEXPORT}")
        if meta.get("modality") != "audio":
            raise BundleError(f"{meta_file}: a {meta.get('modality', 'text')} bundle, not an audio one; open it "
                              "with erc_distill.runtime.Bundle (or open_bundle, which picks)")
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise BundleError(f"{meta_file}: missing key(s) {', '.join(map(repr, missing))}; {REEXPORT}")
        labels = meta["labels"]
        if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels)
                or len(set(labels)) != len(labels)):
            raise BundleError(f"{meta_file}: labels must be a non-empty list of distinct non-empty strings, "
                              f"got {labels!r}")
        pre = meta["preprocessing"]
        if not isinstance(pre, dict):
            raise BundleError(f"{meta_file}: preprocessing must be an object, got {json_type(pre)}")
        n_mels = pre.get("n_mels")
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or pre != supported_preprocessing(n_mels):
            raise BundleError(f"{meta_file}: preprocessing {pre} is not one this runtime computes "
                              f"({supported_preprocessing(80)}, any n_mels); {REEXPORT}")
        model_name = _check_name(meta_file, "model_file" if model_file else "model", model_file or meta["model"])
        files = meta.get("files") or {}
        if not isinstance(files, dict):
            raise BundleError(f"{meta_file}: files must be an object, got {json_type(files)}")
        model_path = folder / model_name
        _check_file(model_path, files.get(model_name), verify)
        session = _open_session(model_path, threads, spin)
        names = sorted(i.name for i in session.get_inputs())
        if names != sorted(AUDIO_INPUTS):
            raise BundleError(f"{model_path}: the graph's inputs are {names}, the audio runtime feeds "
                              f"{sorted(AUDIO_INPUTS)}; {REEXPORT}")
        bundle = cls(folder, tuple(labels), pre, session, meta, model_name)
        width = bundle.logits([np.zeros(1600, dtype=np.float32)]).shape[-1]  # 0.1 s of silence
        if width != len(bundle.labels):
            raise BundleError(f"{model_path}: the graph outputs {width} logits per clip but {meta_file} lists "
                              f"{len(bundle.labels)} labels; {REEXPORT}")
        return bundle

    def features(self, clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Mono 16 kHz float32 samples of clips -> (log-mel ``[N, n_mels, T]``, frames ``[N]``), zero-padded."""
        from erc_distill.audio.features import log_mel_spectrogram, pad_features

        return pad_features([log_mel_spectrogram(np.asarray(c, dtype=np.float32), self.preprocessing["n_mels"])
                             for c in clips])

    def logits(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Logits ``[N, C]`` of clips (mono 16 kHz samples), in one padded call."""
        features, lengths = self.features(clips)
        return self.session.run(None, {"features": features, "lengths": lengths.astype(np.int64)})[0]

    def probabilities(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        z = self.logits(clips)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


def open_bundle(folder: str | Path, threads: int | None = None, model_file: str | None = None,
                verify: bool = True) -> Any:
    """A text :class:`~erc_distill.runtime.Bundle` or an :class:`AudioBundle`, whichever ``folder`` holds."""
    from erc_distill.runtime.bundle import Bundle

    folder = Path(folder)
    meta = _read_meta(folder, folder / "bundle.json")
    kind = AudioBundle if meta.get("modality") == "audio" else Bundle
    return kind.load(folder, threads=threads, model_file=model_file, verify=verify)
