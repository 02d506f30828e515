"""Device profiles (shipped and user YAML) and the latency profiler on a real bundle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from erc_distill.cli import main
from erc_distill.data import context_preset
from erc_distill.errors import DataError
from erc_distill.export.bundle import write_bundle
from erc_distill.modeling import load_encoder
from erc_distill.profiles import load_profile, profile_names
from erc_distill.profiles.profiler import ProfileResult


def test_every_shipped_profile_loads():
    assert profile_names() == ["ameca-onboard", "cpu-2core", "jetson-orin-nx", "server-gpu"]
    for name in profile_names():
        p = load_profile(name)
        assert p.name == name and p.p99_budget_ms > 0 and p.memory_budget_mb > 0 and p.description
    assert load_profile("server-gpu").network_rtt_ms > 0


def test_verdict_adds_the_network_round_trip():
    p = load_profile("server-gpu")
    assert p.verdict(p99_ms=50, peak_rss_mb=100)["pass"]
    assert not p.verdict(p99_ms=70, peak_rss_mb=100)["pass"]  # 70 + 40 > 100
    assert not p.verdict(p99_ms=1, peak_rss_mb=10**5)["memory_ok"]


def test_user_profile_and_its_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nbackend: onnxruntime-cpu\nthreads: 1\nprecision: int8\np99_budget_ms: 5\n"
                    "memory_budget_mb: 300\nsequence_lengths: [64]\n")
    assert load_profile(good).sequence_lengths == (64,)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("onnxruntime-cpu", "potato"))
    with pytest.raises(DataError, match="field 'backend'.*potato"):
        load_profile(bad)
    bad.write_text(good.read_text() + "colour: red\n")
    with pytest.raises(DataError, match="field 'colour'"):
        load_profile(bad)
    bad.write_text(good.read_text().replace("threads: 1\n", ""))
    with pytest.raises(DataError, match="field 'threads': missing"):
        load_profile(bad)
    with pytest.raises(ValueError, match="unknown device profile 'nope'"):
        load_profile("nope")


@pytest.fixture
def bundle(tmp_path):
    model, tok = load_encoder("tiny", ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"))
    return write_bundle(model.eval(), tok, context_preset("spcl"), tmp_path / "bundle")


def test_profile_command_writes_every_field(bundle, fixture_data, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--bundle", str(bundle), "--profile", "cpu-2core", "--data", "meld", "--data-dir",
                 str(fixture_data), "--split", "train", "--warmup", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(ProfileResult.__dataclass_fields__)
    assert result["turns"] == 7 and result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["turns_per_s"] > 0 and result["peak_rss_mb"] > 0 and result["params"] > 0
    assert set(result["verdict"]) == {"p99_budget_ms", "memory_budget_mb", "p99_with_network_ms", "latency_ok",
                                      "memory_ok", "pass"}
    assert "PASS" in capsys.readouterr().out or not result["verdict"]["pass"]


def test_gpu_profiles_are_refused_clearly_on_a_cpu_machine(bundle, fixture_data, capsys):
    code = main(["profile", "--bundle", str(bundle), "--profile", "jetson-orin-nx", "--data-dir", str(fixture_data),
                 "--split", "train", "--warmup", "2"])
    assert code == 1 and "needs backend tensorrt" in capsys.readouterr().err


@pytest.mark.realdata
def test_profiler_runs_without_torch_on_real_meld(bundle, real_data, tmp_path):
    out = tmp_path / "p.json"
    code = f"""
import sys
from erc_distill.cli import main
main(["profile", "--bundle", {str(bundle)!r}, "--data-dir", {str(real_data)!r}, "--turns", "50", "--json", {str(out)!r}])
assert "torch" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["turns"] == 50


def test_peak_rss_is_the_programs_own_not_its_parents():
    """ru_maxrss survives execve on Linux: a profiler started by a big pipeline process reported the
    parent's peak for every variant. The child must report its own."""
    import subprocess
    import sys

    import numpy as np

    from erc_distill.profiles.profiler import peak_rss_mb

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    parent = peak_rss_mb()
    child = float(subprocess.run([sys.executable, "-c", "from erc_distill.profiles.profiler import peak_rss_mb; "
                                  "print(peak_rss_mb())"], capture_output=True, text=True, check=True).stdout)
    assert ballast.sum() > 0 and parent > 400
    assert 0 < child < parent - 300
