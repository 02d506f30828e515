"""Device profiles (shipped and user YAML) and the latency profiler on a real bundle."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
from conftest import make_dialogue

from erc_distill.cli import main
from erc_distill.data import context_preset, load_corpus
from erc_distill.errors import DataError
from erc_distill.export.bundle import write_bundle
from erc_distill.machine import cpu_info
from erc_distill.modeling import load_encoder
from erc_distill.profiles import DeviceProfile, load_profile, profile_names
from erc_distill.profiles.profiler import ProfileResult, batch_steps, profile_bundle
from erc_distill.profiles.spec import variant_precision


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


GOOD = ("name: mine\nbackend: onnxruntime-cpu\nthreads: 1\nprecision: int8\np99_budget_ms: 5\n"
        "memory_budget_mb: 300\nsequence_lengths: [64]\n")


@pytest.mark.parametrize("field, line, message", [
    ("threads", "threads: 1.5", "whole number, got 1.5"),
    ("threads", "threads: true", "whole number, got True"),  # bool is an int subclass: not a thread count
    ("threads", "threads: 0", ">= 1, got 0"),
    ("threads", "threads: '2'", "whole number, got '2'"),
    ("batch", "batch: 0", ">= 1, got 0"),
    ("batch", "batch: 2.0", "whole number, got 2.0"),
    ("batch", "batch: false", "whole number, got False"),
    ("sequence_lengths", "sequence_lengths: abc", "non-empty list of token lengths"),
    ("sequence_lengths", "sequence_lengths: []", "non-empty list"),
    ("sequence_lengths", "sequence_lengths: [0]", "in 1..8192, got 0"),
    ("sequence_lengths", "sequence_lengths: [128, 9000]", "in 1..8192, got 9000"),
    ("sequence_lengths", "sequence_lengths: [128, abc]", "whole number, got 'abc'"),
    ("sequence_lengths", "sequence_lengths: [true]", "whole number, got True"),
    ("p99_budget_ms", "p99_budget_ms: .nan", "finite positive number, got nan"),
    ("p99_budget_ms", "p99_budget_ms: -1", "finite positive number, got -1"),
    ("p99_budget_ms", "p99_budget_ms: 0", "finite positive number, got 0"),
    ("p99_budget_ms", "p99_budget_ms: fast", "must be a number, got 'fast'"),
    ("memory_budget_mb", "memory_budget_mb: .inf", "finite positive number, got inf"),
    ("memory_budget_mb", "memory_budget_mb: true", "must be a number, got True"),
    ("network_rtt_ms", "network_rtt_ms: -5", "finite non-negative number, got -5"),
    ("network_rtt_ms", "network_rtt_ms: .nan", "finite non-negative number, got nan"),
    ("name", "name: 42", "string, got 42"),
    ("name", "name: ''", "non-empty string"),
    ("description", "description: [a, b]", "string, got ['a', 'b']"),
    ("precision", "precision: bf16", "precision 'bf16' is not one of fp32, fp16, int8"),
    ("colour", "colour: red", "unknown field"),
])
def test_every_bad_field_is_named_with_its_file(tmp_path, field, line, message):
    key = line.split(":")[0]
    lines = [l for l in GOOD.splitlines() if not l.startswith(key + ":")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("\n".join([*lines, line]) + "\n")
    with pytest.raises(DataError) as err:
        load_profile(bad)
    assert err.value.file == str(bad) and err.value.field == field
    assert message in str(err.value) and str(err.value).startswith(f"{bad}: field {field!r}: ")


def test_good_values_are_normalised(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(GOOD.replace("[64]", "[256, 64, 128, 64]") + "batch: 4\nnetwork_rtt_ms: 0\n")
    p = load_profile(mine)
    assert p.sequence_lengths == (64, 128, 256) and p.batch == 4 and p.network_rtt_ms == 0.0
    assert p.length_buckets() == [(1, 64), (65, 128), (129, 256)]
    assert isinstance(p.p99_budget_ms, float) and p.source == str(mine)
    mine.write_text(GOOD.replace("[64]", "96"))  # one length: one bucket
    assert load_profile(mine).sequence_lengths == (96,)
    mine.write_text(GOOD.replace("sequence_lengths: [64]\n", ""))  # defaults
    assert load_profile(mine).sequence_lengths == (256,) and load_profile(mine).batch == 1


def test_a_profile_built_in_code_is_checked_too():
    good = load_profile("cpu-2core")
    with pytest.raises(DataError, match="'threads': must be a whole number, got True"):
        dataclasses.replace(good, threads=True)
    with pytest.raises(DataError, match="<DeviceProfile>: field 'batch'"):
        DeviceProfile("x", "onnxruntime-cpu", 1, "int8", 5, 100, batch=0)
    assert dataclasses.replace(good, sequence_lengths=[32, 16]).sequence_lengths == (16, 32)


def test_shipped_profiles_use_every_field():
    """No dead fields: each shipped file sets every field the profiler / report acts on."""
    import yaml
    from importlib import resources

    for name in profile_names():
        raw = yaml.safe_load(resources.files("erc_distill.profiles").joinpath(f"{name}.yaml").read_text())
        assert {"precision", "batch", "sequence_lengths", "threads", "description"} <= set(raw), name
    assert load_profile("server-gpu").batch == 8  # a server batching several robots' turns
    assert load_profile("ameca-onboard").sequence_lengths == (64, 128, 256)


def test_variant_precision():
    assert variant_precision("student-int8-static") == "int8"
    assert variant_precision(None, "model-int8-dynamic.onnx") == "int8"
    assert variant_precision("model-fp16") == "fp16"
    assert variant_precision("teacher-fp32", "model.onnx") == "fp32"
    assert variant_precision(None, "model.onnx") == variant_precision("model-fused") == "fp32"
    assert variant_precision("mint8y") == "fp32"  # a word, not a substring


def test_batch_steps_run_conversations_side_by_side():
    a = make_dialogue([("A", "a0"), ("B", "a1"), ("A", "a2")], "a")
    b = make_dialogue([("C", "b0")], "b")
    c = make_dialogue([("D", "c0"), ("E", "c1")], "c")
    texts = lambda steps: [[t for _, _, t in s] for s in steps]  # noqa: E731
    assert texts(batch_steps([a, b, c], 1)) == [["a0"], ["a1"], ["a2"], ["b0"], ["c0"], ["c1"]]
    steps = batch_steps([a, b, c], 2)
    assert texts(steps) == [["a0", "b0"], ["a1", "c0"], ["a2", "c1"]]  # b ends, c takes its lane
    assert [[conv for conv, _, _ in s] for s in steps] == [["a", "b"], ["a", "c"], ["a", "c"]]
    assert texts(batch_steps([a, b, c], 8)) == [["a0", "b0", "c0"], ["a1", "c1"], ["a2"]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model, tok = load_encoder("tiny", ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"))
    return write_bundle(model.eval(), tok, context_preset("spcl"), tmp_path_factory.mktemp("profiles") / "bundle")


@pytest.fixture
def dialogues(fixture_data):
    return load_corpus("meld", "train", fixture_data).dialogues


def cpu_profile(**changes) -> DeviceProfile:
    return dataclasses.replace(load_profile("cpu-2core"), **changes)


def test_batch_times_calls_of_that_many_turns(bundle, dialogues):
    total = sum(len(d.turns) for d in dialogues)
    one = profile_bundle(bundle, cpu_profile(), dialogues, warmup=2)
    assert one.batch == 1 and one.turns == total - 2
    assert sum(b["calls"] for b in one.by_length) == one.turns  # batch 1: one call per turn
    assert len(dialogues) == 2  # the fixture: two conversations side by side at batch 2
    two = profile_bundle(bundle, cpu_profile(batch=2), dialogues, warmup=2)
    timed = batch_steps(dialogues, 2)[1:]  # 2 warm-up turns: the first call of 2
    assert [len(s) for s in timed] == [2, 2, 2, 1]
    assert two.batch == 2 and two.turns == 7 == total - 2
    assert sum(b["calls"] for b in two.by_length) == len(timed) == 4  # 4 calls for 7 turns
    assert two.turns_per_s > 0 and 0 < two.p50_ms <= two.p99_ms
    capped = profile_bundle(bundle, cpu_profile(batch=2), dialogues, warmup=0, max_turns=5)
    assert capped.turns == 5 and sum(b["calls"] for b in capped.by_length) == 3  # 2 + 2 + 1
    wide = profile_bundle(bundle, cpu_profile(batch=4), dialogues, warmup=0)  # more lanes than conversations
    assert wide.turns == total and sum(b["calls"] for b in wide.by_length) == 5


def test_sequence_lengths_are_the_reported_buckets(bundle, dialogues):
    result = profile_bundle(bundle, cpu_profile(sequence_lengths=(32, 64, 4096)), dialogues, warmup=2)
    assert [b["tokens"] for b in result.by_length] == ["1-32", "33-64", "65-4096"]
    assert [b["max_tokens"] for b in result.by_length] == [32, 64, 4096]
    assert sum(b["calls"] for b in result.by_length) == result.turns
    for b in result.by_length:
        assert (b["p50_ms"] is None) == (b["calls"] == 0)
        assert b["calls"] == 0 or 0 < b["p50_ms"] <= b["p99_ms"]
    # inputs longer than the longest length land in a bucket of their own, not silently in the last
    short = profile_bundle(bundle, cpu_profile(sequence_lengths=(8,)), dialogues, warmup=2)
    assert [b["tokens"] for b in short.by_length] == ["1-8", ">8"]
    assert short.by_length[0]["calls"] == 0 and short.by_length[1]["calls"] == short.turns
    assert short.by_length[1]["max_tokens"] is None


def test_precision_is_the_variants_and_checked_against_the_profile(bundle, dialogues):
    fp32 = profile_bundle(bundle, cpu_profile(), dialogues, warmup=2)  # cpu-2core deploys int8
    assert fp32.precision == "fp32" and fp32.verdict["profile_precision"] == "int8"
    assert fp32.verdict["precision_ok"] is False
    assert fp32.verdict["pass"] == (fp32.verdict["latency_ok"] and fp32.verdict["memory_ok"])  # budgets only
    shutil.copyfile(bundle / "model.onnx", bundle / "model-int8-copy.onnx")  # named as an INT8 graph
    int8 = profile_bundle(bundle, cpu_profile(), dialogues, model_file="model-int8-copy.onnx", warmup=2)
    assert int8.precision == "int8" and int8.verdict["precision_ok"] is True and int8.variant == "model-int8-copy"
    named = profile_bundle(bundle, cpu_profile(precision="fp32"), dialogues, warmup=2, variant="student-fp32")
    assert named.precision == "fp32" and named.verdict["precision_ok"] is True


def test_verdict_keys_and_precision_argument():
    p = load_profile("cpu-2core")
    assert p.verdict(1, 1)["precision_ok"] is None and p.verdict(1, 1, "int8")["precision_ok"] is True
    assert not p.verdict(1, 1, "fp16")["precision_ok"] and p.verdict(1, 1, "fp16")["pass"]


def test_profile_command_writes_every_field(bundle, fixture_data, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--bundle", str(bundle), "--profile", "cpu-2core", "--data", "meld", "--data-dir",
                 str(fixture_data), "--split", "train", "--warmup", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == set(ProfileResult.__dataclass_fields__)
    assert result["turns"] == 7 and result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["turns_per_s"] > 0 and result["peak_rss_mb"] > 0 and result["params"] > 0
    assert set(result["verdict"]) == {"p99_budget_ms", "memory_budget_mb", "p99_with_network_ms", "latency_ok",
                                      "memory_ok", "profile_precision", "precision_ok", "pass"}
    assert "PASS" in capsys.readouterr().out or not result["verdict"]["pass"]
    # the machine that produced the numbers: CPU model, cores and ISA, as this machine reports them
    here = cpu_info()
    assert result["machine"]["cpu"]["model"] == here.model and result["machine"]["cpu"]["isa"] == list(here.isa)
    assert result["machine"]["cpu"]["summary"] == here.summary and result["machine"]["cpus"] >= 1
    assert result["precision"] == "fp32" and result["batch"] == 1
    assert [b["tokens"] for b in result["by_length"]] == ["1-128", "129-256"]  # cpu-2core's sequence_lengths


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


def _report_run(tmp_path, bundle, dialogues):
    """A run folder as the pipeline leaves it: metrics.json and a profile JSON per variant."""
    from erc_distill.report import compute_metrics

    labels = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
    gold = [0, 1, 2, 3, 4, 5, 6, 0, 1, 0]
    metrics = {"student": {"test": compute_metrics(gold, gold, labels).to_dict(), "params": 43377},
               "student-int8-copy": {"test": compute_metrics([0] * 3 + gold[3:], gold, labels).to_dict()}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    shutil.copyfile(bundle / "model.onnx", bundle / "model-int8-copy.onnx")
    generous = cpu_profile(p99_budget_ms=10_000, memory_budget_mb=10**6)
    for name, model_file in (("student-fp32", None), ("student-int8-copy", "model-int8-copy.onnx")):
        result = profile_bundle(bundle, generous, dialogues, model_file=model_file, warmup=2, variant=name)
        (run / f"profile_{name}.json").write_text(result.to_json())
    return run


def test_report_names_the_machine_the_deploy_pick_and_the_length_buckets(bundle, dialogues, tmp_path):
    from erc_distill.report.accuracy_speed import write_report

    run = _report_run(tmp_path, bundle, dialogues)
    write_report(run)
    md = (run / "report.md").read_text()
    here = cpu_info()
    assert f"- machine (all variants): {here.summary}" in md
    assert "- deploy on cpu-2core (int8, batch 1): student-int8-copy, the most accurate int8 variant" in md
    assert "| variant | p99 ms, 1-128 tokens | p99 ms, 129-256 tokens |" in md
    assert here.summary in (run / "report.html").read_text()
    # variants timed on different machines: each line says which
    other = json.loads((run / "profile_student-int8-copy.json").read_text())
    other["machine"] = {"platform": "Linux", "cpus": 2,
                        "cpu": {"model": "AMD EPYC 7B13", "logical_cores": 2, "isa": ["AVX2"],
                                "summary": "AMD EPYC 7B13, 2 cores, AVX2"}}
    (run / "profile_student-int8-copy.json").write_text(json.dumps(other))
    write_report(run)
    md = (run / "report.md").read_text()
    assert "- machine for student-int8-copy: AMD EPYC 7B13, 2 cores, AVX2; 2 usable; Linux" in md
    assert f"- machine for student-fp32: {here.summary}" in md
    # budgets the int8 variant misses: no deploy pick, said so
    other["verdict"]["pass"] = False
    (run / "profile_student-int8-copy.json").write_text(json.dumps(other))
    write_report(run)
    assert "- deploy on cpu-2core (int8, batch 1): no int8 variant meets the budgets" in (run / "report.md").read_text()


def test_report_reads_profile_jsons_from_before_the_machine_record(bundle, dialogues, tmp_path):
    from erc_distill.report.accuracy_speed import write_report

    run = _report_run(tmp_path, bundle, dialogues)
    for f in run.glob("profile_*.json"):
        old = json.loads(f.read_text())
        for key in ("precision", "batch", "by_length"):
            del old[key]
        del old["verdict"]["profile_precision"], old["verdict"]["precision_ok"]
        old["machine"] = "Linux-6.1-x86_64-with-glibc2.36 (x86_64)"  # the old plain string
        f.write_text(json.dumps(old))
    write_report(run)
    md = (run / "report.md").read_text()
    assert "- machine (all variants): Linux-6.1-x86_64-with-glibc2.36 (x86_64)" in md
    assert "deploy on" not in md and "tokens |" not in md  # nothing invented for old files
    assert "| student-fp32 |" in md and "| student-int8-copy |" in md
    for f in run.glob("profile_*.json"):
        old = json.loads(f.read_text())
        del old["machine"]
        f.write_text(json.dumps(old))
    write_report(run)
    assert "- machine (all variants): not recorded" in (run / "report.md").read_text()


def test_profiler_refusals_are_user_errors(bundle, dialogues):
    from erc_distill.errors import ConfigError

    with pytest.raises(ConfigError, match="jetson-orin-nx.yaml: backend: profile 'jetson-orin-nx' needs backend tensorrt"):
        profile_bundle(bundle, load_profile("jetson-orin-nx"), dialogues)
    with pytest.raises(DataError, match="1 turn\\(s\\) are too few"):
        profile_bundle(bundle, cpu_profile(), [make_dialogue([("A", "hi")])])


def test_report_names_an_ensemble_teacher_and_compares_against_it(tmp_path):
    from erc_distill.report.accuracy_speed import _rows, load_variants

    def row(f1):
        return {"test": {"weighted_f1": f1, "macro_f1": 0.3, "accuracy": 0.6}}

    metrics = {"teacher": {**row(0.64), "teachers": ["spcl", "utt"]}, "teacher:spcl": {**row(0.63), "teachers": ["spcl"]},
               "student": row(0.60)}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    names = [v.name for v in load_variants(tmp_path)]
    assert names == ["teacher-ensemble (2)", "teacher:spcl", "student-fp32"]
    rows = {r[0]: r for r in _rows(load_variants(tmp_path), set())}
    assert rows["student-fp32"][4] == f"{100 * 60 / 64:.1f}"  # % of the ensemble, the KD target
    metrics = {"teacher": {**row(0.615), "teachers": ["mpnet-utterance-4ep"]}, "student": row(0.60)}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))  # one outputs file: named by it
    assert [v.name for v in load_variants(tmp_path)][0] == "teacher (mpnet-utterance-4ep)"
