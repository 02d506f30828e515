"""Device profiles: where a model must run and what it may cost there.

A profile is a YAML file: the shipped ones (``cpu-2core``, ``jetson-orin-nx``, ``ameca-onboard``,
``server-gpu``) by name, or a path to the user's own. Fields are those of :class:`DeviceProfile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from erc_distill.config import packaged_names, read_yaml_mapping
from erc_distill.errors import DataError

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    backend: str
    threads: int
    precision: str
    p99_budget_ms: float
    memory_budget_mb: float
    batch: int = 1
    sequence_lengths: tuple[int, ...] = (256,)
    network_rtt_ms: float = 0.0
    """Added to the measured latency (a backend reached over the network)."""
    description: str = ""
    source: str = field(default="", compare=False)

    def verdict(self, p99_ms: float, peak_rss_mb: float) -> dict[str, object]:
        """Pass/fail against the budgets: p99 + round trip <= p99 budget, peak RSS <= memory budget."""
        latency = p99_ms + self.network_rtt_ms
        return {
            "p99_budget_ms": self.p99_budget_ms,
            "memory_budget_mb": self.memory_budget_mb,
            "p99_with_network_ms": round(latency, 3),
            "latency_ok": latency <= self.p99_budget_ms,
            "memory_ok": peak_rss_mb <= self.memory_budget_mb,
            "pass": latency <= self.p99_budget_ms and peak_rss_mb <= self.memory_budget_mb,
        }


def profile_names() -> list[str]:
    return packaged_names("erc_distill.profiles")


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or the user's YAML file; errors name the file and the field."""
    raw, source = read_yaml_mapping(name_or_path, "erc_distill.profiles", "device profile")
    known = {f.name for f in fields(DeviceProfile)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DataError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", file=source, field=unknown[0])
    required = ("name", "backend", "threads", "precision", "p99_budget_ms", "memory_budget_mb")
    for name in required:
        if name not in raw:
            raise DataError("missing required field", file=source, field=name)
    if raw["backend"] not in BACKENDS:
        raise DataError(f"backend {raw['backend']!r} is not one of {', '.join(BACKENDS)}", file=source, field="backend")
    if raw["precision"] not in PRECISIONS:
        raise DataError(f"precision {raw['precision']!r} is not one of {', '.join(PRECISIONS)}", file=source, field="precision")
    for name in ("threads", "batch", "p99_budget_ms", "memory_budget_mb", "network_rtt_ms"):
        if name in raw and not (isinstance(raw[name], (int, float)) and raw[name] >= 0):
            raise DataError(f"must be a non-negative number, got {raw[name]!r}", file=source, field=name)
    raw["sequence_lengths"] = tuple(raw.get("sequence_lengths", (256,)))
    return DeviceProfile(**raw, source=source)
