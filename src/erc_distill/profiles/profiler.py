"""The latency profiler: the real per-turn path on real conversations, against a device profile.

The profile's ``batch`` sets how many conversations run at once. Batch 1: each timed iteration is one
:meth:`StreamingRecognizer.push` on the next turn of real test dialogues (MELD by default), in spoken
order: rolling-context build + tokenization + ONNX Runtime inference + softmax. Batch N: N
conversations run side by side (a finished one is replaced by the next dialogue); each timed iteration
builds the next turn of each (their rolling contexts) and classifies them in one padded call, so its
latency is what every turn of the batch waits. The first ``warmup`` turns are run and discarded.

Reported: p50 / p95 / p99 / mean latency per call, turns per second (throughput), p50 / p99 per
input-length bucket of the profile's ``sequence_lengths``, peak resident memory of the process, model
size on disk, parameters, mean input tokens, the variant's precision, the pass / fail verdict of the
profile's budgets, and the machine (CPU model, cores, ISA: :func:`erc_distill.machine.machine_info`).

Runs without torch (peak RSS is then the runtime's own); the pipeline calls it in a subprocess.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.data.types import Dialogue
from erc_distill.errors import ConfigError, DataError
from erc_distill.machine import machine_info
from erc_distill.profiles.spec import DeviceProfile, variant_precision
from erc_distill.runtime import Bundle, StreamingRecognizer


@dataclass(frozen=True)
class ProfileResult:
    variant: str
    model_file: str
    profile: str
    backend: str
    threads: int
    precision: str
    """The variant's precision (from its name / graph file); the verdict compares it with the profile's."""
    batch: int
    """Turns per timed call; latencies below are per call."""
    turns: int
    warmup: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    turns_per_s: float
    mean_tokens: float | None
    """Mean input tokens per turn (text bundles; None for audio)."""
    by_length: list[dict[str, Any]]
    """Per bucket of the profile's sequence_lengths: tokens "lo-hi" (">L" past the longest), calls, p50, p99
    (audio: ``seconds`` "lo-hi" of :data:`AUDIO_SECONDS` instead of ``tokens``)."""
    peak_rss_mb: float
    model_size_mb: float
    params: int | None
    verdict: dict[str, Any]
    machine: dict[str, Any]
    """:func:`erc_distill.machine.machine_info`: platform, CPU model, cores, ISA."""
    date: str
    mean_seconds: float | None = None
    """Mean clip length in seconds (audio bundles)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (this program's own high-water mark).
    ``getrusage``'s ``ru_maxrss`` is not used there: it survives ``execve``, so a profiler started by a
    2 GB pipeline process reported the parent's 2 GB for every variant. Elsewhere ``ru_maxrss``
    (macOS reports bytes).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


Step = list[tuple[str, str, str]]
"""One timed call: (conversation, speaker, text) of up to ``batch`` turns, each of another conversation."""


def batch_steps(dialogues: Sequence[Dialogue], batch: int) -> list[Step]:
    """The turns of ``dialogues`` as ``batch`` conversations running side by side: step k holds the next
    turn of each running conversation; a finished one is replaced by the next dialogue. Batch 1 is
    every turn in spoken order. Only the last steps can be short (no dialogue left to start)."""
    queue = deque(dialogues)
    lanes: list[Any] = [None] * batch
    steps: list[Step] = []
    while True:
        step: Step = []
        for i in range(batch):
            while True:
                if lanes[i] is None:
                    if not queue:
                        break
                    d = queue.popleft()
                    lanes[i] = (str(d.dialogue_id), iter(d.turns))
                turn = next(lanes[i][1], None)
                if turn is None:
                    lanes[i] = None
                    continue
                step.append((lanes[i][0], turn.speaker, turn.text))
                break
        if not step:
            return steps
        steps.append(step)


def length_table(device: DeviceProfile, latencies: Sequence[float], widths: Sequence[int]) -> list[dict[str, Any]]:
    """p50 / p99 of the calls per input-length bucket of ``device.sequence_lengths`` (a call's length:
    its longest input, which the batch is padded to); calls longer than the longest bucket go to a last
    ``">L"`` bucket, present only when there are such calls."""
    lat, width = np.asarray(latencies, dtype=float), np.asarray(widths)
    buckets = [(lo, hi, f"{lo}-{hi}") for lo, hi in device.length_buckets()]
    longest = device.sequence_lengths[-1]
    if (width > longest).any():
        buckets.append((longest + 1, None, f">{longest}"))
    return _bucket_rows(lat, width, buckets, "tokens")


AUDIO_SECONDS = (2.0, 4.0, 6.0, 12.0)
"""Upper edges of the clip-length buckets (seconds) of an audio profile's by-length table."""


def _bucket_rows(lat: np.ndarray, width: np.ndarray, buckets: Sequence[tuple[float, float | None, str]],
                 unit: str) -> list[dict[str, Any]]:
    rows = []
    for lo, hi, label in buckets:
        picked = lat[(width >= lo) & ((width <= hi) if hi is not None else True)]
        rows.append({unit: label, f"max_{unit}": hi, "calls": int(picked.size),
                     "p50_ms": round(float(np.percentile(picked, 50)), 3) if picked.size else None,
                     "p99_ms": round(float(np.percentile(picked, 99)), 3) if picked.size else None})
    return rows


def profile_bundle(bundle_dir: str | Path, device: DeviceProfile, dialogues: Sequence[Dialogue],
                   model_file: str | None = None, warmup: int = 20, max_turns: int | None = None,
                   variant: str | None = None) -> ProfileResult:
    """Time the per-turn path of a bundle's graph (``model_file``; default the float one) on ``device``:
    its threads, batch, length buckets, budgets and precision. ``warmup`` and ``max_turns`` count turns."""
    if device.backend != "onnxruntime-cpu":
        raise ConfigError(f"profile {device.name!r} needs backend {device.backend}, which this profiler runs only "
                          "where it is installed; use a CPU profile here (e.g. cpu-2core)",
                          field="backend", source=device.source or device.name)
    bundle = Bundle.load(bundle_dir, threads=device.threads, model_file=model_file)
    steps = batch_steps(dialogues, device.batch)
    total = sum(len(s) for s in steps)
    if total < 2:
        raise DataError(f"{total} turn(s) are too few to profile")
    warmup = min(warmup, total // 2)  # small data sets: at least half the turns are timed
    warmup_steps = -(-warmup // device.batch)
    timed = steps[warmup_steps:]
    if max_turns is not None:
        kept, left = [], max_turns
        for step in timed:
            if left <= 0:
                break
            kept.append(step[:left])
            left -= len(kept[-1])
        timed = kept
    if not timed:
        raise DataError(f"no turns left to time after {warmup} warm-up turn(s) (max_turns {max_turns})")
    latencies, widths, tokens = [], [], []
    if device.batch == 1:  # the real per-turn API, as the robot calls it
        recognizer = StreamingRecognizer(bundle)
        for step in steps[:warmup_steps]:
            for conversation, speaker, text in step:
                recognizer.push(speaker, text, "warmup/" + conversation)
        start = time.perf_counter()
        for [(conversation, speaker, text)] in timed:
            p = recognizer.push(speaker, text, conversation)
            latencies.append(p.latency_ms)
            widths.append(p.tokens)
            tokens.append(p.tokens)
        wall = time.perf_counter() - start
    else:  # the same work for N conversations at once: N rolling contexts, one padded call
        builder = bundle.builder()
        contexts: dict[str, Any] = {}

        def call(step: Step, prefix: str = "") -> list[int]:
            inputs = [contexts.setdefault(prefix + c, builder.stream()).push(speaker, text) for c, speaker, text in step]
            bundle.probabilities(inputs)
            return [len(x) for x in inputs]

        for step in steps[:warmup_steps]:
            call(step, "warmup/")
        wall = _time_calls(timed, call, latencies, widths, tokens)
    lat = np.array(latencies)
    p99 = float(np.percentile(lat, 99))
    rss = peak_rss_mb()
    path = bundle.folder / (model_file or bundle.meta["model"])
    name = variant or Path(model_file or "model.onnx").stem
    precision = variant_precision(variant, model_file or bundle.meta["model"])
    return ProfileResult(
        variant=name,
        model_file=str(path),
        profile=device.name,
        backend=device.backend,
        threads=device.threads,
        precision=precision,
        batch=device.batch,
        turns=len(tokens),
        warmup=warmup,
        p50_ms=round(float(np.percentile(lat, 50)), 3),
        p95_ms=round(float(np.percentile(lat, 95)), 3),
        p99_ms=round(p99, 3),
        mean_ms=round(float(lat.mean()), 3),
        turns_per_s=round(len(tokens) / wall, 1),
        mean_tokens=round(float(np.mean(tokens)), 1),
        by_length=length_table(device, latencies, widths),
        peak_rss_mb=round(rss, 1),
        model_size_mb=round(path.stat().st_size / 2**20, 2),
        params=bundle.meta.get("params"),
        verdict=device.verdict(p99, rss, precision),
        machine=machine_info(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _time_calls(calls: Sequence[Any], run: Callable[[Any], list[Any]], latencies: list[float], widths: list[Any],
                sizes: list[Any]) -> float:
    """Run each call, appending its milliseconds to ``latencies``, its longest input to ``widths`` and every
    input's size (tokens or seconds, as ``run`` returns them) to ``sizes``; returns the wall seconds."""
    start = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        lengths = run(call)
        latencies.append(1000 * (time.perf_counter() - t0))
        widths.append(max(lengths))
        sizes.extend(lengths)
    return time.perf_counter() - start


def profile_audio_bundle(bundle_dir: str | Path, device: DeviceProfile, clips: Sequence[Any],
                         model_file: str | None = None, warmup: int = 20, max_clips: int | None = None,
                         variant: str | None = None, max_seconds: float | None = None) -> ProfileResult:
    """Time an audio bundle per clip on ``device``: decode the file (or segment) and resample to 16 kHz
    (:func:`erc_distill.media.load_audio`), the numpy log-mel, ONNX Runtime on the clip's own length and
    the softmax; ``device.batch`` clips per call. ``clips``: :class:`~erc_distill.media.MediaSource` (or
    paths), in order; the first ``warmup`` are run untimed. Lengths are bucketed by :data:`AUDIO_SECONDS`."""
    from erc_distill.media.audio import load_audio
    from erc_distill.runtime.audio_bundle import AudioBundle

    if device.backend != "onnxruntime-cpu":
        raise ConfigError(f"profile {device.name!r} needs backend {device.backend}, which this profiler runs only "
                          "where it is installed; use a CPU profile here (e.g. cpu-2core)",
                          field="backend", source=device.source or device.name)
    bundle = AudioBundle.load(bundle_dir, threads=device.threads, model_file=model_file)
    clips = list(clips)
    if len(clips) < 2:
        raise DataError(f"{len(clips)} clip(s) are too few to profile")
    warmup = min(warmup, len(clips) // 2)
    timed = clips[warmup:][:max_clips] if max_clips is not None else clips[warmup:]
    calls = [timed[i : i + device.batch] for i in range(0, len(timed), device.batch)]

    def run(sources: Sequence[Any]) -> list[float]:
        samples = [load_audio(src, max_seconds=max_seconds).samples for src in sources]
        bundle.probabilities(samples)
        return [len(x) / 16000 for x in samples]

    for i in range(0, warmup, device.batch):
        run(clips[i : min(i + device.batch, warmup)])
    latencies: list[float] = []
    widths: list[float] = []
    seconds: list[float] = []
    wall = _time_calls(calls, run, latencies, widths, seconds)
    lat = np.array(latencies)
    p99 = float(np.percentile(lat, 99))
    edges = (0.0, *AUDIO_SECONDS)
    buckets: list[tuple[float, float | None, str]] = [(lo + 1e-9 if lo else 0.0, hi, f"{lo:g}-{hi:g}")
                                                      for lo, hi in zip(edges, edges[1:])]
    if max(widths) > AUDIO_SECONDS[-1]:
        buckets.append((AUDIO_SECONDS[-1] + 1e-9, None, f">{AUDIO_SECONDS[-1]:g}"))
    rss = peak_rss_mb()
    path = bundle.folder / (model_file or bundle.meta["model"])
    precision = variant_precision(variant, model_file or bundle.meta["model"])
    return ProfileResult(
        variant=variant or Path(model_file or "model.onnx").stem, model_file=str(path), profile=device.name,
        backend=device.backend, threads=device.threads, precision=precision, batch=device.batch, turns=len(seconds),
        warmup=warmup, p50_ms=round(float(np.percentile(lat, 50)), 3), p95_ms=round(float(np.percentile(lat, 95)), 3),
        p99_ms=round(p99, 3), mean_ms=round(float(lat.mean()), 3), turns_per_s=round(len(seconds) / wall, 1),
        mean_tokens=None, by_length=_bucket_rows(lat, np.asarray(widths), buckets, "seconds"),
        peak_rss_mb=round(rss, 1), model_size_mb=round(path.stat().st_size / 2**20, 2), params=bundle.meta.get("params"),
        verdict=device.verdict(p99, rss, precision), machine=machine_info(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), mean_seconds=round(float(np.mean(seconds)), 2))
