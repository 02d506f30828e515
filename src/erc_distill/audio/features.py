"""What the audio encoders read, computed with numpy alone (no torch: the robot bundle uses this too).

**Whisper's log-mel spectrogram** (:func:`log_mel_spectrogram`), on the clip's own length:

- 16 kHz mono samples; a periodic Hann window of ``n_fft = 400`` samples (25 ms), a hop of 160
  (10 ms), frames centred on ``0, 160, 320, ...`` with the signal reflected at both ends (what
  ``torch.stft(center=True)`` does); the power spectrum through 80 Slaney-style mel filters
  (0–8 kHz, Slaney area normalisation, as librosa and ``WhisperFeatureExtractor`` build them);
- the last STFT frame is dropped, as in Whisper, so a clip of ``n`` samples gives ``n // 160``
  frames (3 s -> 300);
- ``log10(max(mel, 1e-10))``, floored at the clip's maximum minus 8 (80 dB of range), then
  ``(x + 4) / 4``.

Whisper itself pads (or cuts) every clip to 30 s *before* this, so the floor is taken over 30 s of
which most is silence, and the frames at the clip's end see zeros where we reflect the signal.
Here nothing is padded: the features are the same as ``WhisperFeatureExtractor`` gives for the
unpadded clip (``padding="longest"``), and the same as its 30 s output on every frame whose
window ends inside the clip: all of them but, when the clip's length is less than 40 samples
past a multiple of 160, the last one (and the floor is the same unless that frame is the loudest).

Batches (:func:`pad_features`) are zero-padded to the longest clip with the frame counts beside
them: zeros are what the encoder's first convolution pads with, so a clip's valid frames come out
the same whatever it is batched with (see :mod:`erc_distill.audio.encoders`).

**Waveform encoders** (wav2vec2, HuBERT, data2vec-audio) read the samples themselves, normalised
to zero mean and unit variance per clip when their preprocessor asks for it
(:func:`normalize_waveform`, :func:`pad_waveforms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
MAX_SECONDS = 30
"""Whisper's window: its encoder has positions for 30 s (3000 frames -> 1500 encoder frames)."""
MAX_FRAMES = MAX_SECONDS * SAMPLE_RATE // HOP_LENGTH


@dataclass(frozen=True, eq=False)
class LogMel:
    """A clip's log-mel spectrogram: ``features`` float32 ``[n_mels, frames]``, ``frames`` valid
    frames (all of them: nothing is padded; kept beside the array for batching)."""

    features: np.ndarray
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames * HOP_LENGTH / SAMPLE_RATE


def hz_to_mel(freq: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel / 200 Hz), logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    mels = 3.0 * freq / 200.0
    above = freq >= min_log_hz
    return np.where(above, min_log_mel + np.log(np.maximum(freq, min_log_hz) / min_log_hz) / logstep, mels)


def mel_to_hz(mels: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    freqs = 200.0 * mels / 3.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (float64, read-only) from 0 Hz to the
    Nyquist frequency, Slaney scale and area normalisation (``librosa.filters.mel`` defaults, the
    filters Whisper ships in ``mel_filters.npz``)."""
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic, as torch.hann_window
    window.setflags(write=False)
    return window


def frame_count(num_samples: int) -> int:
    """Log-mel frames of a clip of ``num_samples`` (``num_samples // 160``)."""
    return int(num_samples) // HOP_LENGTH


def log_mel_spectrogram(samples: np.ndarray, n_mels: int = N_MELS) -> LogMel:
    """Whisper's log-mel features of mono 16 kHz ``samples`` on their own length (module doc).

    A clip shorter than one hop (160 samples, 10 ms) has no frame: ValueError. So does a clip
    longer than Whisper's 30 s (the encoder has no positions past them): cut it first
    (``load_audio(..., max_seconds=30)``).
    """
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected mono samples (one dimension), got shape {x.shape}")
    frames = frame_count(len(x))
    if frames < 1:
        raise ValueError(f"clip too short for log-mel features: {len(x)} samples, needs at least {HOP_LENGTH} "
                         f"({HOP_LENGTH / SAMPLE_RATE * 1000:.0f} ms at {SAMPLE_RATE} Hz)")
    if frames > MAX_FRAMES:
        raise ValueError(f"clip too long for Whisper: {len(x) / SAMPLE_RATE:.2f} s, at most {MAX_SECONDS} s "
                         "(cut it first, e.g. load_audio(..., max_seconds=30))")
    x = x.astype(np.float64)
    padded = np.pad(x, N_FFT // 2, mode="reflect")  # a clip shorter than the pad is reflected repeatedly
    # frames 0 .. frames-1 (Whisper drops the last of the frames + 1 centred STFT frames)
    windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[: frames * HOP_LENGTH: HOP_LENGTH]
    power = np.abs(np.fft.rfft(windows * _hann(N_FFT), axis=-1)) ** 2  # [frames, n_fft // 2 + 1]
    mel = mel_filters(n_mels) @ power.T  # [n_mels, frames]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return LogMel(((log_spec + 4.0) / 4.0).astype(np.float32), frames)


def pad_features(items: Sequence[LogMel | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of several clips -> ``(batch [B, n_mels, T_max] float32, lengths [B] int64)``,
    zero-padded after each clip's frames."""
    arrays = [item.features if isinstance(item, LogMel) else np.asarray(item, dtype=np.float32) for item in items]
    if not arrays:
        raise ValueError("no clips to batch")
    n_mels = {a.shape[0] for a in arrays}
    if len(n_mels) != 1 or any(a.ndim != 2 for a in arrays):
        raise ValueError(f"expected [n_mels, frames] arrays with one n_mels, got shapes {[a.shape for a in arrays]}")
    lengths = np.array([a.shape[1] for a in arrays], dtype=np.int64)
    batch = np.zeros((len(arrays), arrays[0].shape[0], int(lengths.max())), dtype=np.float32)
    for row, a in zip(batch, arrays):
        row[:, : a.shape[1]] = a
    return batch, lengths


def normalize_waveform(samples: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (``(x - mean) / sqrt(var + 1e-7)``, as ``Wav2Vec2FeatureExtractor``), float32."""
    x = np.asarray(samples, dtype=np.float64)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def pad_waveforms(items: Sequence[np.ndarray], normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Samples of several clips -> ``(batch [B, N_max] float32, lengths [B] int64)``, each clip
    normalised on its own samples first (when ``normalize``), zero-padded after them."""
    arrays = [np.asarray(a, dtype=np.float32).reshape(-1) for a in items]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("no clips to batch" if not arrays else "a clip has no samples")
    if normalize:
        arrays = [normalize_waveform(a) for a in arrays]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    batch = np.zeros((len(arrays), int(lengths.max())), dtype=np.float32)
    for row, a in zip(batch, arrays):
        row[: a.size] = a
    return batch, lengths
