"""The latency profiler: the real per-turn path on real conversations, against a device profile.

Each timed iteration is one :meth:`StreamingRecognizer.push` on the next turn of real test
dialogues (MELD by default), in spoken order: rolling-context build + tokenization + ONNX Runtime
inference + softmax, batch 1. The first ``warmup`` turns are run and discarded. Reported: p50 / p95
/ p99 / mean latency, turns per second, peak resident memory of the process, model size on disk,
parameters, mean input tokens, and the pass / fail verdict of the profile's budgets.

Runs without torch (peak RSS is then the runtime's own); the pipeline calls it in a subprocess.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.data.types import Dialogue
from erc_distill.profiles.spec import DeviceProfile
from erc_distill.runtime import Bundle, StreamingRecognizer


@dataclass(frozen=True)
class ProfileResult:
    variant: str
    model_file: str
    profile: str
    backend: str
    threads: int
    turns: int
    warmup: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    turns_per_s: float
    mean_tokens: float
    peak_rss_mb: float
    model_size_mb: float
    params: int | None
    verdict: dict[str, Any]
    machine: str
    date: str

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


def profile_bundle(bundle_dir: str | Path, device: DeviceProfile, dialogues: Sequence[Dialogue],
                   model_file: str | None = None, warmup: int = 20, max_turns: int | None = None,
                   variant: str | None = None) -> ProfileResult:
    """Time the per-turn path of a bundle's graph (``model_file``; default the float one)."""
    if device.backend != "onnxruntime-cpu":
        raise ValueError(f"profile {device.name!r} needs backend {device.backend}, which this profiler runs only "
                           "where it is installed; use a CPU profile here (e.g. cpu-2core)")
    bundle = Bundle.load(bundle_dir, threads=device.threads, model_file=model_file)
    turns = [(f"{d.dialogue_id}", t.speaker, t.text) for d in dialogues for t in d.turns]
    if len(turns) < 2:
        raise ValueError(f"{len(turns)} turn(s) are too few to profile")
    warmup = min(warmup, len(turns) // 2)  # small data sets: at least half the turns are timed
    recognizer = StreamingRecognizer(bundle)
    for conversation, speaker, text in turns[:warmup]:
        recognizer.push(speaker, text, "warmup/" + conversation)
    timed = turns[warmup:] if max_turns is None else turns[warmup : warmup + max_turns]
    latencies, tokens = [], []
    start = time.perf_counter()
    for conversation, speaker, text in timed:
        p = recognizer.push(speaker, text, conversation)
        latencies.append(p.latency_ms)
        tokens.append(p.tokens)
    wall = time.perf_counter() - start
    lat = np.array(latencies)
    p99 = float(np.percentile(lat, 99))
    rss = peak_rss_mb()
    path = bundle.folder / (model_file or bundle.meta["model"])
    return ProfileResult(
        variant=variant or Path(model_file or "model.onnx").stem,
        model_file=str(path),
        profile=device.name,
        backend=device.backend,
        threads=device.threads,
        turns=len(timed),
        warmup=warmup,
        p50_ms=round(float(np.percentile(lat, 50)), 3),
        p95_ms=round(float(np.percentile(lat, 95)), 3),
        p99_ms=round(p99, 3),
        mean_ms=round(float(lat.mean()), 3),
        turns_per_s=round(len(timed) / wall, 1),
        mean_tokens=round(float(np.mean(tokens)), 1),
        peak_rss_mb=round(rss, 1),
        model_size_mb=round(path.stat().st_size / 2**20, 2),
        params=bundle.meta.get("params"),
        verdict=device.verdict(p99, rss),
        machine=f"{platform.platform()} ({platform.processor() or platform.machine()})",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
