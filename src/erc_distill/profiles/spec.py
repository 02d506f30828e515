"""Device profiles: where a model must run and what it may cost there.

A profile is a YAML file: the shipped ones (``cpu-2core``, ``jetson-orin-nx``, ``ameca-onboard``,
``server-gpu``) by name, or a path to the user's own. Fields are those of :class:`DeviceProfile`; every
one is type-checked (a :class:`DataError` names the file and the field) and every one acts:

- ``name``, ``description``: recorded in results; the description says what the device is.
- ``backend``: where the graph runs; the profiler here runs ``onnxruntime-cpu`` and refuses the others.
- ``threads``: ONNX Runtime intra-op threads.
- ``precision``: the precision this device deploys (fp32 / fp16 / int8). Each result records its
  variant's precision and ``verdict["precision_ok"]``; the report names, per profile, the most accurate
  variant *of that precision* within the budgets as the one to deploy.
- ``batch``: turns per inference call. 1 = one turn at a time (a robot's own conversation); N > 1 = N
  concurrent conversations batched into one call (e.g. a server serving several robots). Latencies are
  per call (what each turn in it waits); ``turns_per_s`` is the throughput.
- ``sequence_lengths``: the input-length buckets (tokens) the profiler reports latency for: p50 / p99 of
  the turns of 1..L1 tokens, L1+1..L2, ... (and of any longer ones, counted apart).
- ``p99_budget_ms``, ``memory_budget_mb``, ``network_rtt_ms``: the verdict (p99 + round trip <= the
  p99 budget, peak RSS <= the memory budget).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from erc_distill.config import packaged_names, read_yaml_mapping
from erc_distill.errors import DataError

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
MAX_SEQUENCE_LENGTH = 8192
REQUIRED = ("name", "backend", "threads", "precision", "p99_budget_ms", "memory_budget_mb")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    backend: str
    threads: int
    precision: str
    """The precision this device deploys: the report's pick for it is the best variant of this precision."""
    p99_budget_ms: float
    memory_budget_mb: float
    batch: int = 1
    """Turns per inference call (N concurrent conversations batched); latency is per call."""
    sequence_lengths: tuple[int, ...] = (256,)
    """Upper bounds (tokens) of the input-length buckets latency is reported for; kept sorted."""
    network_rtt_ms: float = 0.0
    """Added to the measured latency (a backend reached over the network)."""
    description: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "source":
                value = _check(f.name, getattr(self, f.name), self.source or "<DeviceProfile>")
                object.__setattr__(self, f.name, value)

    def verdict(self, p99_ms: float, peak_rss_mb: float, precision: str | None = None) -> dict[str, object]:
        """Pass/fail against the budgets: p99 + round trip <= p99 budget, peak RSS <= memory budget.

        ``precision``: the timed variant's; ``precision_ok`` says whether it is the one this device
        deploys (None when unknown). ``pass`` is the budgets alone, so an fp32 reference row still shows
        whether it would fit."""
        latency = p99_ms + self.network_rtt_ms
        return {
            "p99_budget_ms": self.p99_budget_ms,
            "memory_budget_mb": self.memory_budget_mb,
            "p99_with_network_ms": round(latency, 3),
            "latency_ok": latency <= self.p99_budget_ms,
            "memory_ok": peak_rss_mb <= self.memory_budget_mb,
            "profile_precision": self.precision,
            "precision_ok": None if precision is None else precision == self.precision,
            "pass": latency <= self.p99_budget_ms and peak_rss_mb <= self.memory_budget_mb,
        }

    def length_buckets(self) -> list[tuple[int, int]]:
        """``[(1, L1), (L1 + 1, L2), ...]``: the token ranges latency is reported for."""
        lows = (1, *(n + 1 for n in self.sequence_lengths[:-1]))
        return list(zip(lows, self.sequence_lengths))


def variant_precision(*names: str | None) -> str:
    """The precision of a variant, from its name or graph file (``student-int8-static``,
    ``model-int8-dynamic.onnx``, ``model-fp16.onnx``): the first of int8 / fp16 / fp32 found as a word;
    fp32 when none is (``model.onnx`` is the float graph)."""
    for name in names:
        for word in re.split(r"[^a-z0-9]+", (name or "").lower()):
            if word in PRECISIONS:
                return word
    return "fp32"


def _fail(message: str, source: str, name: str) -> DataError:
    return DataError(message, file=source, field=name)


def _int(name: str, value: Any, source: str, low: int, high: int | None = None) -> int:
    # bool is an int subclass: `threads: true` must not read as 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"must be a whole number, got {value!r} ({type(value).__name__})", source, name)
    if value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise _fail(f"must be {bound}, got {value}", source, name)
    return value


def _number(name: str, value: Any, source: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"must be a number, got {value!r} ({type(value).__name__})", source, name)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise _fail(f"must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}", source, name)
    return float(value)


def _check(name: str, value: Any, source: str) -> Any:
    """The value of field ``name``, checked (and normalised: sequence lengths as a sorted tuple)."""
    if name in ("name", "description"):
        if not isinstance(value, str) or (name == "name" and not value.strip()):
            raise _fail(f"must be {'a non-empty' if name == 'name' else 'a'} string, got {value!r}", source, name)
        return value
    if name == "backend" and value not in BACKENDS:
        raise _fail(f"backend {value!r} is not one of {', '.join(BACKENDS)}", source, name)
    if name == "precision" and value not in PRECISIONS:
        raise _fail(f"precision {value!r} is not one of {', '.join(PRECISIONS)}", source, name)
    if name in ("threads", "batch"):
        return _int(name, value, source, 1)
    if name in ("p99_budget_ms", "memory_budget_mb"):
        return _number(name, value, source, positive=True)
    if name == "network_rtt_ms":
        return _number(name, value, source, positive=False)
    if name == "sequence_lengths":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # `sequence_lengths: 256` reads as one bucket
        if not isinstance(value, (list, tuple)) or not value:
            raise _fail(f"must be a non-empty list of token lengths, e.g. [128, 256]; got {value!r}", source, name)
        lengths = [_int(name, n, source, 1, MAX_SEQUENCE_LENGTH) for n in value]
        return tuple(sorted(set(lengths)))
    return value


def profile_names() -> list[str]:
    return packaged_names("erc_distill.profiles")


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or the user's YAML file; errors name the file and the field."""
    raw, source = read_yaml_mapping(name_or_path, "erc_distill.profiles", "device profile")
    known = {f.name for f in fields(DeviceProfile)} - {"source"}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        raise DataError(f"unknown field(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}",
                        file=source, field=str(unknown[0]))
    for name in REQUIRED:
        if name not in raw:
            raise DataError("missing required field", file=source, field=name)
    return DeviceProfile(**raw, source=source)
