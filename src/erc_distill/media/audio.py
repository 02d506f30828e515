"""Audio in, one mono float32 signal at the models' rate out: files, video tracks and raw PCM.

- wav / flac (and the other formats libsndfile reads) are read with ``soundfile``; anything else
  (mp4, mkv, avi, m4a, ...) through PyAV, which ships its own FFmpeg and reads the first audio
  track of a video; a file soundfile cannot open is tried with PyAV before it is called unreadable;
- channels are mixed to mono by averaging them (not by keeping the first);
- a source at another rate is resampled with soxr at its very-high-quality setting (band-limited:
  nothing above the new Nyquist frequency folds back); samples end up clipped to [-1, 1];
- ``start`` / ``end`` select a segment in seconds (IEMOCAP's session recordings); ``max_seconds``
  keeps the first ``max_seconds`` of the clip (or segment) and records what was dropped in
  :attr:`AudioClip.cut_seconds`: a long clip is cut and counted, never silently zeroed.

soundfile, soxr and PyAV are the ``audio`` extra (``pip install "erc-distill[audio]"``) and are
imported only when a clip is decoded; importing this module costs numpy only. Raw 16-bit PCM at
the target rate (the robot's microphone, :func:`audio_from_pcm16`) needs none of them.

A missing or undecodable file is a :class:`MediaError` (a :class:`DataError` naming the file) with
``reason`` ``"missing"`` or ``"unreadable"``; :func:`erc_distill.media.load_turn_audio` turns it
into a masked turn and a count in its report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from erc_distill.errors import DataError
from erc_distill.optional import optional_import

TARGET_RATE = 16_000
"""The rate every audio model of the project reads (Whisper, wav2vec2, data2vec, HuBERT)."""

SOUNDFILE_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".aifc", ".au", ".snd", ".w64", ".caf",
     ".rf64"}
)
"""File types read with soundfile; any other goes to PyAV."""

RESAMPLE_QUALITY = "VHQ"
"""soxr's very-high-quality setting (the one the shared 16 kHz RAVDESS copy was made with)."""

MediaFailure = Literal["missing", "unreadable"]


class MediaError(DataError):
    """A clip that cannot be had: ``reason`` is ``"missing"`` (no such file) or ``"unreadable"``
    (no decoder could read it, it has no audio track, no samples, or the segment is outside it)."""

    def __init__(self, message: str, *, file: str | Path | None = None, reason: MediaFailure = "unreadable") -> None:
        self.reason: MediaFailure = reason
        super().__init__(message, file=file)


class _CannotOpen(MediaError):
    """soundfile does not know the file's format (PyAV is tried next)."""


@dataclass(frozen=True)
class MediaSource:
    """A media file and, optionally, the segment of it that is one turn (seconds from its start).

    :func:`erc_distill.media.locate_clip` makes these from a turn, knowing whether the corpus's
    times are positions in this file (IEMOCAP session recordings) or in an episode the file was
    already cut from (MELD): only in the first case are ``start`` / ``end`` set.
    """

    path: Path
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True, eq=False)
class AudioClip:
    """A decoded clip: mono float32 samples in [-1, 1] at ``sample_rate``.

    ``source`` is the file it came from (None for PCM handed over in memory), ``original_rate``
    and ``channels`` describe the source before mixing and resampling, ``start_s`` is where the
    samples begin in the source, ``source_seconds`` the length of what was asked for (the whole
    file, or the segment) and ``cut_seconds`` how much of it ``max_seconds`` dropped.
    """

    samples: np.ndarray
    sample_rate: int
    source: str | None
    original_rate: int
    channels: int
    source_seconds: float
    start_s: float = 0.0
    cut_seconds: float = 0.0

    @property
    def duration_s(self) -> float:
        """Length of :attr:`samples` in seconds."""
        return len(self.samples) / self.sample_rate

    @property
    def cut(self) -> bool:
        """Whether ``max_seconds`` shortened the clip."""
        return self.cut_seconds > 0

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        cut = f", cut {self.cut_seconds:.3f} s" if self.cut else ""
        return (f"AudioClip({self.duration_s:.3f} s at {self.sample_rate} Hz from {self.source or '<memory>'}, "
                f"source {self.original_rate} Hz x {self.channels} ch{cut})")


# ----------------------------------------------------------------------------- public functions


def load_audio(
    source: str | os.PathLike[str] | MediaSource,
    *,
    sample_rate: int = TARGET_RATE,
    max_seconds: float | None = None,
    start: float | None = None,
    end: float | None = None,
) -> AudioClip:
    """Decode a clip to mono float32 at ``sample_rate`` (see the module doc for every step).

    ``source``: a path, or a :class:`MediaSource` whose segment is used unless ``start`` / ``end``
    are given here. ``start`` / ``end``: seconds from the file's start (``end`` past the end of the
    file is the end of the file). ``max_seconds``: keep at most this much; the rest is counted in
    :attr:`AudioClip.cut_seconds`. Raises :class:`MediaError` for a missing or undecodable file,
    ImportError (naming the ``audio`` extra) when a needed decoder is not installed, ValueError
    for bad arguments (a bad ``start`` / ``end`` is a MediaError, itself a ValueError).
    """
    if isinstance(source, MediaSource):
        path = Path(source.path)
        start = source.start if start is None else start
        end = source.end if end is None else end
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
    else:
        raise TypeError(
            f"load_audio takes a path or a MediaSource, not {type(source).__name__}; for a turn's clip "
            "use erc_distill.media.locate_clip(turn, media_dir), which knows the corpus's conventions"
        )
    _check_rate(sample_rate, "sample_rate")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 (or None for no limit), got {max_seconds}")
    if not path.is_file():
        reason = "is a folder, not a file" if path.is_dir() else "file not found"
        raise MediaError(reason, file=path, reason="missing")
    start, end = _check_segment(start, end, path)

    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            raw = _read_soundfile(path, start, end, max_seconds)
        except _CannotOpen as err:
            try:  # e.g. a .wav that holds a codec libsndfile lacks: FFmpeg may still read it
                raw = _read_av(path, start, end, max_seconds)
            except MediaError as av_err:
                raise MediaError(f"{err.message}; then {av_err.message}", file=path) from None
            except ImportError:
                raise MediaError(err.message, file=path) from None
    else:
        raw = _read_av(path, start, end, max_seconds)
    return _finish(raw, sample_rate, str(path), max_seconds)


def audio_from_pcm16(
    data: bytes | bytearray | memoryview | np.ndarray,
    sample_rate: int,
    *,
    target_rate: int = TARGET_RATE,
    max_seconds: float | None = None,
) -> AudioClip:
    """Raw 16-bit mono PCM (little-endian bytes, or an int16 array) at ``sample_rate`` -> a clip at
    ``target_rate`` (resampled with soxr when the rates differ; at the target rate nothing beyond
    numpy is needed). An odd byte count, a non-int16 array or no samples is a :class:`MediaError`."""
    _check_rate(sample_rate, "sample_rate")
    _check_rate(target_rate, "target_rate")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 (or None for no limit), got {max_seconds}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        buffer = memoryview(data).cast("B")
        if len(buffer) % 2:
            raise MediaError(f"16-bit PCM has 2 bytes a sample; got an odd number of bytes ({len(buffer)})",
                             file="<pcm16>")
        ints = np.frombuffer(buffer, dtype="<i2")
    elif isinstance(data, np.ndarray):
        if data.dtype.kind != "i" or data.dtype.itemsize != 2:
            raise MediaError(f"expected int16 samples, got an array of {data.dtype}", file="<pcm16>")
        if data.ndim == 2 and 1 in data.shape:
            data = data.reshape(-1)
        if data.ndim != 1:
            raise MediaError(f"expected mono samples (one dimension), got shape {data.shape}", file="<pcm16>")
        ints = data
    else:
        raise TypeError(f"audio_from_pcm16 takes bytes or an int16 numpy array, not {type(data).__name__}")
    if ints.size == 0:
        raise MediaError("no samples", file="<pcm16>")
    samples = ints.astype(np.float32) / np.float32(32768.0)
    total = len(samples)
    cut = 0
    if max_seconds is not None:
        keep = max(1, int(math.floor(max_seconds * sample_rate)))
        if keep < total:
            samples, cut = samples[:keep], total - keep
    raw = _Raw(samples[:, None], sample_rate, 1, total / sample_rate, 0.0, cut / sample_rate)
    return _finish(raw, target_rate, None, max_seconds)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 ``samples`` from ``orig_rate`` to ``target_rate`` with soxr (very high quality,
    band-limited). The output has ``round(len * target / orig)`` samples, give or take one."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if orig_rate == target_rate or samples.size == 0:
        return samples
    soxr = optional_import("soxr")
    return np.asarray(soxr.resample(samples, orig_rate, target_rate, quality=RESAMPLE_QUALITY), dtype=np.float32)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``(frames, channels)`` -> ``(frames,)`` float32, the mean over channels (1-D input is returned as is)."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.shape[1] == 1:
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32)


# ----------------------------------------------------------------------------- decoders


@dataclass
class _Raw:
    """What a decoder read, before mixing and resampling."""

    data: np.ndarray  # (frames, channels) float32
    rate: int
    channels: int
    source_seconds: float
    start_s: float
    cut_seconds: float


def _frames(seconds: float, rate: int) -> int:
    return int(round(seconds * rate))


def _plan(total: int, rate: int, start: float | None, end: float | None, max_seconds: float | None,
          path: Path) -> tuple[int, int, int]:
    """First frame, frames asked for (the segment) and frames to keep (after ``max_seconds``)."""
    first = 0 if start is None else _frames(start, rate)
    last = total if end is None else min(total, _frames(end, rate))
    if first >= total:
        raise MediaError(f"segment starts at {start:g} s, past the end of the clip ({total / rate:.3f} s)", file=path)
    if last <= first:
        raise MediaError(f"segment {start or 0:g}-{end:g} s is empty", file=path)
    wanted = last - first
    keep = wanted if max_seconds is None else min(wanted, max(1, int(math.floor(max_seconds * rate))))
    return first, wanted, keep


def _read_soundfile(path: Path, start: float | None, end: float | None, max_seconds: float | None) -> _Raw:
    sf = optional_import("soundfile")
    try:
        handle = sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError, OSError, TypeError, ValueError) as err:
        raise _CannotOpen(f"cannot open with soundfile: {_why(err)}", file=path) from None
    with handle:
        rate, channels, total = int(handle.samplerate), int(handle.channels), int(handle.frames)
        if total <= 0:
            raise MediaError("no audio samples", file=path)
        first, wanted, keep = _plan(total, rate, start, end, max_seconds, path)
        try:
            if first:
                handle.seek(first)
            data = handle.read(keep, dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError, OSError, ValueError) as err:
            raise MediaError(f"cannot decode: {_why(err)}", file=path) from None
    if len(data) == 0:
        raise MediaError("no audio samples could be decoded", file=path)
    return _Raw(data, rate, channels, wanted / rate, first / rate, (wanted - keep) / rate)


def _read_av(path: Path, start: float | None, end: float | None, max_seconds: float | None) -> _Raw:
    """The first audio track through FFmpeg: decoded from the start, the segment sliced by sample
    count (a clip's own times, not its container timestamps), trailing codec padding dropped when
    the container states the track's length."""
    av = optional_import("av")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise MediaError(f"cannot open with PyAV: {_why(err)}", file=path) from None
    with container:
        if not container.streams.audio:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise MediaError(f"no audio track (streams: {kinds})", file=path)
        stream = container.streams.audio[0]
        converter = av.AudioResampler(format="fltp")  # sample format only: layout and rate are kept
        chunks: list[np.ndarray] = []
        rate = channels = 0
        stop: int | None = None  # frames after which nothing more is needed (the segment's end)
        decoded = 0
        try:
            for frame in container.decode(stream):
                for planar in converter.resample(frame):
                    if not rate:
                        rate, channels = int(planar.sample_rate), len(planar.layout.channels)
                        stop = None if end is None else _frames(end, rate)
                    chunks.append(planar.to_ndarray())
                    decoded += planar.samples
                if stop is not None and decoded >= stop:
                    break
            else:
                for planar in converter.resample(None):
                    chunks.append(planar.to_ndarray())
                    decoded += planar.samples
        except (av.error.FFmpegError, OSError, ValueError) as err:
            if not decoded:
                raise MediaError(f"cannot decode the audio track: {_why(err)}", file=path) from None
            # a damaged tail: keep what decoded (like a player would)
        declared = _declared_frames(stream, rate)
    if not decoded or not rate:
        raise MediaError("the audio track has no samples", file=path)
    data = np.concatenate(chunks, axis=1).T  # (frames, channels)
    if declared is not None and len(data) > declared:
        data = data[:declared]  # encoder padding past the stated length (AAC's last frame)
    first, wanted, keep = _plan(len(data), rate, start, end, max_seconds, path)
    data = np.ascontiguousarray(data[first:first + keep], dtype=np.float32)
    return _Raw(data, rate, channels, wanted / rate, first / rate, (wanted - keep) / rate)


def _declared_frames(stream, rate: int) -> int | None:
    """The track length the container states, in frames at ``rate`` (None when it states none)."""
    try:
        if stream.duration and stream.time_base and rate:
            return int(round(float(stream.duration * stream.time_base) * rate))
    except (TypeError, ValueError, AttributeError):
        pass
    return None


def _finish(raw: _Raw, sample_rate: int, source: str | None, max_seconds: float | None) -> AudioClip:
    if not np.isfinite(raw.data).all():
        raise MediaError("the clip holds NaN or infinite samples", file=source or "<pcm16>")
    mono = resample(to_mono(raw.data), raw.rate, sample_rate)
    if max_seconds is not None:
        limit = max(1, int(math.floor(max_seconds * sample_rate)))
        mono = mono[:limit]  # resampling may add a sample past the limit
    np.clip(mono, -1.0, 1.0, out=mono)
    if mono.size == 0:
        raise MediaError("no audio samples", file=source or "<pcm16>")
    return AudioClip(
        samples=mono,
        sample_rate=sample_rate,
        source=source,
        original_rate=raw.rate,
        channels=raw.channels,
        source_seconds=raw.source_seconds,
        start_s=raw.start_s,
        cut_seconds=raw.cut_seconds,
    )


def _check_rate(rate: int, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer (Hz), got {rate!r}")


def _check_segment(start: float | None, end: float | None, path: Path) -> tuple[float | None, float | None]:
    """A bad segment is a MediaError (a ValueError): a corpus row's times are data, not fatal."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise MediaError(f"segment {name} must be a finite number of seconds >= 0, got {value}", file=path)
    if start is not None and end is not None and end <= start:
        raise MediaError(f"segment end ({end:g} s) is not after its start ({start:g} s)", file=path)
    return (None if not start else float(start)), (None if end is None else float(end))


def _why(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
