"""The machine a number came from: CPU model, cores and the vector / matrix ISA that decide speed.

The same latency bench gives teacher ÷ best INT8 19.3x on an AVX-512 VNNI host and 12.2x on an
AVX2-only one, so every profile result, bench output and run manifest records :func:`machine_info`.
:func:`resolve_precision` picks the training precision from the same facts: bf16 only where the
hardware runs it natively (on a CPU without AVX512-BF16 / AMX, bf16 is emulated and ~10x slower).

Standard library only; torch is imported lazily, and only to ask about a CUDA GPU.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")

# /proc/cpuinfo flag -> display name, in display order. x86 ("flags") and aarch64 ("Features").
X86_ISA = {
    "avx2": "AVX2",
    "avx512f": "AVX-512F",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}
ARM_ISA = {"asimd": "ASIMD", "asimddp": "DOTPROD", "bf16": "BF16", "i8mm": "I8MM", "sve": "SVE"}
NATIVE_BF16 = ("AVX-512 BF16", "AMX-BF16", "BF16")

BF16_WARNING = "bf16 is emulated on it, ~10x slower"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    """The "model name" of /proc/cpuinfo (else ``platform.processor()`` / ``platform.machine()``)."""
    logical_cores: int
    """Logical CPUs listed (``processor`` entries; else ``os.cpu_count()``)."""
    isa: tuple[str, ...]
    """The speed-relevant extensions present, e.g. ``("AVX2", "AVX-512F", "AVX-512 VNNI")``."""
    arch: str = ""

    @property
    def summary(self) -> str:
        """One line, e.g. ``AMD EPYC 7B13, 2 cores, AVX2``."""
        isa = ", ".join(self.isa) if self.isa else "no AVX2/AVX-512/AMX"
        return f"{self.model}, {self.logical_cores} cores, {isa}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "isa": list(self.isa), "summary": self.summary}


def parse_cpuinfo(text: str, arch: str | None = None) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (x86 ``flags`` or aarch64 ``Features``)."""
    model = ""
    processors = 0
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        elif key in ("model name", "hardware", "cpu model") and not model:
            model = " ".join(value.split())
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if arch is None:
        arch = "aarch64" if "asimd" in flags else ("x86_64" if "avx" in flags or "sse2" in flags else platform.machine())
    table = ARM_ISA if arch in ("aarch64", "arm64") else X86_ISA
    isa = tuple(name for flag, name in table.items() if flag in flags)
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU",
                   processors or os.cpu_count() or 1, isa, arch)


def cpu_info(path: str | Path = CPUINFO) -> CpuInfo:
    """This machine's CPU (``path``: a cpuinfo file to read instead, e.g. a test fixture)."""
    path = Path(path)
    if path == CPUINFO:
        return _this_cpu()
    return parse_cpuinfo(path.read_text(errors="replace"))


@lru_cache(maxsize=1)
def _this_cpu() -> CpuInfo:
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:  # macOS, Windows: no /proc
        text = ""
    return parse_cpuinfo(text, arch=platform.machine().lower())


def native_bf16(cpu: CpuInfo | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16, AMX-BF16, or Arm BF16)."""
    cpu = cpu or cpu_info()
    return any(name in cpu.isa for name in NATIVE_BF16)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's limit shows here)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """What a manifest, profile result or bench output records about the machine that produced it."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_info().to_dict(), "cpus": usable_cpus()}


def machine_summary(machine: Any) -> str:
    """One readable line for a recorded machine: a :func:`machine_info` dict, or the plain string
    older results carry (returned as it is); ``"not recorded"`` for None."""
    if isinstance(machine, dict):
        cpu = machine.get("cpu") or {}
        line = cpu.get("summary") or ", ".join(str(x) for x in (cpu.get("model"), cpu.get("isa")) if x) or "unknown CPU"
        extra = [f"{machine['cpus']} usable" if machine.get("cpus") else "", machine.get("platform", "")]
        return line + "".join(f"; {x}" for x in extra if x)
    return str(machine) if machine else "not recorded"


def _cuda_bf16() -> tuple[bool, str] | None:
    """(bf16 supported, GPU name) for CUDA device 0; None when torch is missing or sees no CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        return bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name(0)
    except Exception:  # a broken driver is "no GPU" here; the trainer reports it properly
        return None


def resolve_precision(precision: str, accelerator: str, *, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """The training precision to use and why: ``(precision, reason)``.

    ``"auto"``: ``"bf16-mixed"`` on a CUDA GPU that supports bf16 (asked only when ``accelerator`` is
    gpu / cuda / auto and torch imports) or on a CPU with native bf16; else ``"32-true"``. Any other value
    is returned as it is, with reason ``"as configured"`` -- or, for a bf16 precision that will run on a
    CPU without native bf16, a reason starting with ``"warning: "``. ``cpu``: the CPU to judge (default:
    this one).
    """
    accelerator = (accelerator or "auto").lower()
    gpu = _cuda_bf16() if accelerator in ("gpu", "cuda", "auto") else None
    on_cpu = gpu is None and accelerator in ("cpu", "auto")
    if precision == "auto":
        if gpu is not None:
            ok, name = gpu
            if ok:
                return "bf16-mixed", f"bf16-mixed: the CUDA GPU ({name}) supports bf16"
            return "32-true", (f"fp32: the CUDA GPU ({name}) has no bf16; set precision 16-mixed for fp16 "
                               "mixed precision")
        if not on_cpu:
            return "32-true", f"fp32: no CUDA GPU found for accelerator {accelerator!r}"
        cpu = cpu or cpu_info()
        if native_bf16(cpu):
            return "bf16-mixed", f"bf16-mixed: this CPU ({cpu.summary}) has native bf16"
        return "32-true", (f"fp32: this CPU ({cpu.summary}) has no native bf16 (AVX512-BF16/AMX); "
                           "bf16-mixed would be emulated, ~10x slower")
    if precision.startswith("bf16") and on_cpu:
        cpu = cpu or cpu_info()
        if not native_bf16(cpu):
            return precision, (f"warning: {precision} as configured, but this CPU ({cpu.summary}) has no native "
                               f"bf16 (AVX512-BF16/AMX): {BF16_WARNING}; 32-true (or auto) is faster")
    return precision, "as configured"
