"""The machine record (CPU model, cores, ISA) and the precision it implies for training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from erc_distill import machine
from erc_distill.machine import (
    CpuInfo,
    cpu_info,
    machine_info,
    machine_summary,
    native_bf16,
    parse_cpuinfo,
    resolve_precision,
)

# trimmed /proc/cpuinfo of a 2-vCPU AVX2-only host (Zen 3: no AVX-512, no bf16)
AVX2_ONLY = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2 sha_ni
bogomips\t: 4899.99

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2 sha_ni
bogomips\t: 4899.99
"""

# a Sapphire Rapids vCPU: AVX-512 VNNI, AVX-VNNI, AVX512-BF16 and AMX
AMX = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum   8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_bf16 \
avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum   8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_bf16 \
avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 2
processor\t: 3
"""

# aarch64 (Neoverse V1 style): no "model name", a "Features" line
ARM = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


@pytest.fixture
def cpus(tmp_path):
    files = {}
    for name, text in {"avx2": AVX2_ONLY, "amx": AMX, "arm": ARM}.items():
        files[name] = tmp_path / f"cpuinfo-{name}"
        files[name].write_text(text)
    return {name: cpu_info(path) for name, path in files.items()}


def test_parses_model_cores_and_isa(cpus):
    avx2, amx, arm = cpus["avx2"], cpus["amx"], cpus["arm"]
    assert avx2 == CpuInfo("AMD EPYC 7B13", 2, ("AVX2",), "x86_64")
    assert avx2.summary == "AMD EPYC 7B13, 2 cores, AVX2"
    assert amx.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"  # whitespace collapsed
    assert amx.logical_cores == 4
    assert amx.isa == ("AVX2", "AVX-512F", "AVX-512 VNNI", "AVX-VNNI", "AVX-512 BF16", "AMX-BF16", "AMX-INT8")
    assert arm.arch == "aarch64" and arm.isa == ("ASIMD", "DOTPROD", "BF16", "I8MM", "SVE")
    assert arm.model  # no "model name" on Arm: falls back to the platform's processor / machine name
    d = amx.to_dict()
    assert d["isa"] == list(amx.isa) and d["summary"] == amx.summary and json.loads(json.dumps(d)) == d


def test_no_isa_and_no_cpuinfo_still_give_a_summary():
    bare = parse_cpuinfo("processor\t: 0\nmodel name\t: Old CPU\nflags\t: fpu sse sse2\n")
    assert bare.isa == () and bare.summary == "Old CPU, 1 cores, no AVX2/AVX-512/AMX"
    empty = parse_cpuinfo("")  # macOS, Windows: nothing to read
    assert empty.model and empty.logical_cores >= 1 and empty.isa == ()


def test_native_bf16(cpus):
    assert not native_bf16(cpus["avx2"])
    assert native_bf16(cpus["amx"])
    assert native_bf16(cpus["arm"])
    only_bf16 = parse_cpuinfo("processor: 0\nmodel name: X\nflags: avx2 avx512f avx512_bf16\n")
    assert native_bf16(only_bf16) and not native_bf16(parse_cpuinfo("processor: 0\nflags: avx2 avx512_vnni\n"))


def test_auto_precision_follows_the_cpu(cpus):
    precision, reason = resolve_precision("auto", "cpu", cpu=cpus["avx2"])
    assert precision == "32-true"
    assert reason.startswith("fp32: this CPU (AMD EPYC 7B13, 2 cores, AVX2) has no native bf16")
    assert "emulated" in reason
    precision, reason = resolve_precision("auto", "cpu", cpu=cpus["amx"])
    assert precision == "bf16-mixed" and "native bf16" in reason and "AMX-BF16" in reason


def test_auto_on_a_machine_without_cuda_judges_the_cpu(cpus, monkeypatch):
    monkeypatch.setattr(machine, "_cuda_bf16", lambda: None)
    assert resolve_precision("auto", "auto", cpu=cpus["avx2"])[0] == "32-true"
    assert resolve_precision("auto", "auto", cpu=cpus["amx"])[0] == "bf16-mixed"
    # a GPU was asked for and there is none: fp32, not a CPU verdict
    precision, reason = resolve_precision("auto", "gpu", cpu=cpus["amx"])
    assert precision == "32-true" and "no CUDA GPU" in reason


def test_auto_on_a_cuda_gpu(cpus, monkeypatch):
    monkeypatch.setattr(machine, "_cuda_bf16", lambda: (True, "NVIDIA H100"))
    precision, reason = resolve_precision("auto", "gpu", cpu=cpus["avx2"])  # the GPU decides, not the CPU
    assert precision == "bf16-mixed" and "NVIDIA H100" in reason
    monkeypatch.setattr(machine, "_cuda_bf16", lambda: (False, "Tesla T4"))
    precision, reason = resolve_precision("auto", "cuda", cpu=cpus["amx"])
    assert precision == "32-true" and "Tesla T4" in reason and "16-mixed" in reason
    # accelerator cpu: the GPU is not asked at all
    monkeypatch.setattr(machine, "_cuda_bf16", lambda: pytest.fail("CUDA asked for accelerator cpu"))
    assert resolve_precision("auto", "cpu", cpu=cpus["avx2"])[0] == "32-true"


def test_explicit_precisions_pass_through(cpus, monkeypatch):
    monkeypatch.setattr(machine, "_cuda_bf16", lambda: None)
    for value in ("32-true", "16-mixed", "bf16-mixed", "64-true"):
        assert resolve_precision(value, "cpu", cpu=cpus["amx"]) == (value, "as configured")
    assert resolve_precision("32-true", "cpu", cpu=cpus["avx2"]) == ("32-true", "as configured")
    # bf16 asked for explicitly on a CPU that emulates it: kept, with a warning
    for value in ("bf16-mixed", "bf16-true"):
        precision, reason = resolve_precision(value, "cpu", cpu=cpus["avx2"])
        assert precision == value and reason.startswith("warning: ") and "AMD EPYC 7B13" in reason
        assert "~10x slower" in reason
    # on a bf16 GPU the same request is fine
    monkeypatch.setattr(machine, "_cuda_bf16", lambda: (True, "NVIDIA A100"))
    assert resolve_precision("bf16-mixed", "gpu", cpu=cpus["avx2"]) == ("bf16-mixed", "as configured")


def test_machine_info_of_this_machine():
    info = machine_info()
    assert set(info) == {"platform", "python", "cpu", "cpus"}
    assert info["cpus"] >= 1 and info["cpu"]["logical_cores"] >= 1 and info["cpu"]["model"]
    assert json.loads(json.dumps(info)) == info
    assert info["cpu"]["summary"] in machine_summary(info) and info["platform"] in machine_summary(info)
    # older results carried a plain string; missing means not recorded
    assert machine_summary("Linux-6 (x86_64)") == "Linux-6 (x86_64)"
    assert machine_summary(None) == "not recorded"


def test_importing_and_recording_the_machine_needs_no_torch():
    code = ("import sys; from erc_distill.machine import machine_info, resolve_precision; machine_info(); "
            "resolve_precision('auto', 'cpu'); assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
