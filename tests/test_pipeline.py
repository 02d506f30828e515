"""The whole command on tiny models and the fixture corpus: artifacts, skipping, resuming."""

from __future__ import annotations

import csv
import json

import pytest

from erc_distill.cli import main
from erc_distill.distill.module import ErcModule
from erc_distill.report import compute_metrics


def argv(fixture_data, tmp_path, *extra: str) -> list[str]:
    return ["--teacher", "tiny", "--student", "tiny", "--data", "meld", "--data-dir", str(fixture_data),
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
            "--teacher-epochs", "1", "--batch-size", "2", "--max-len", "64", "--teacher-max-len", "64",
            "--quantize-methods", "ort-dynamic", *extra]


def manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "manifest.json").read_text())


def test_full_run_writes_every_artifact(fixture_data, tmp_path, capsys):
    assert main(argv(fixture_data, tmp_path, "--quantize-methods", "ort-dynamic", "ort-static", "nncf-ptq")) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    m = manifest(tmp_path)
    stages = ("teacher", "cache", "distill", "evaluate", "export", "quantize", "profile", "report")
    assert [m["stages"][s]["status"] for s in stages] == ["done"] * len(stages)
    assert m["stages"]["export"]["parity"]["max_abs_diff"] <= 1e-4
    assert (run / "bundle" / "model.onnx").is_file() and (run / "bundle" / "bundle.json").is_file()
    assert m["config"]["loss"]["weights"] == {"ce": 1.0, "dist": 1.0, "feature": 0.5}
    assert "torch" in m["versions"] and m["stages"]["distill"]["wall_s"] >= 0
    assert m["stages"]["distill"]["objective"] == "L = 1·ce + 1·dist(τ=4) + 0.5·feature(τ=1)"
    assert (run / "student" / "model" / "head.safetensors").is_file()
    assert (tmp_path / "cache" / "teachers").is_dir() and (tmp_path / "cache" / "teacher-cache").is_dir()
    metrics = json.loads((run / "metrics.json").read_text())
    int8 = {f"student-int8-{q}" for q in ("ort-dynamic", "ort-static", "nncf-ptq")}
    assert set(metrics) == {"teacher", "student"} | int8
    variants = {"teacher-fp32", "student-fp32", "student-fp32-fused"} | int8
    assert m["stages"]["export"]["fused"]["Attention"] == 2  # both tiny layers fused
    assert m["stages"]["export"]["fused_parity"]["max_abs_diff"] <= 1e-4
    assert {p.name for p in run.glob("profile_*.json")} == {f"profile_{v}.json" for v in variants}
    report = (run / "report.md").read_text()
    for v in variants:  # every variant's test weighted F1 in the report equals metrics.json's
        name = {"teacher-fp32": "teacher", "student-fp32": "student", "student-fp32-fused": "student"}.get(v, v)
        assert f"| {v} | {100 * metrics[name]['test']['weighted_f1']:.2f} |" in report
        p99 = json.loads((run / f"profile_{v}.json").read_text())["p99_ms"]
        assert f"{p99:.2f}" in report
    for png in ("f1_vs_latency.png", "per_class_f1.png", "confusion.png"):
        assert (run / png).stat().st_size > 1000 and f"src='{png}'" in (run / "report.html").read_text()
    for model in ("teacher", "student"):
        for split in ("dev", "test"):
            rows = list(csv.DictReader(open(run / f"predictions_{model}_{split}.csv")))
            assert list(rows[0])[:6] == ["example_id", "dialogue_id", "turn", "speaker", "gold", "pred"]
            assert len(rows[0]) == 6 + 7
            labels = metrics[model][split]["labels"]
            again = compute_metrics([labels.index(r["pred"]) for r in rows], [labels.index(r["gold"]) for r in rows], labels)
            assert again.weighted_f1 == pytest.approx(metrics[model][split]["weighted_f1"])
            assert again.accuracy == pytest.approx(metrics[model][split]["accuracy"])
            assert sum(float(r[f"p_{l}"]) for l in labels for r in rows[:1]) == pytest.approx(1.0, abs=1e-4)
    assert "test wF1" in out


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(fixture_data, tmp_path, capsys):
    main(argv(fixture_data, tmp_path))
    first = manifest(tmp_path)
    capsys.readouterr()
    main(argv(fixture_data, tmp_path))
    out = capsys.readouterr().out
    assert out.count("up to date") == 8
    main(argv(fixture_data, tmp_path, "--loss", "ce=1,kd=1"))
    out = capsys.readouterr().out
    assert "[teacher] up to date" in out and "[cache] up to date" in out
    assert "[distill] running" in out and "[evaluate] running" in out
    assert manifest(tmp_path)["stages"]["teacher"]["key"] == first["stages"]["teacher"]["key"]
    assert manifest(tmp_path)["stages"]["distill"]["key"] != first["stages"]["distill"]["key"]


def test_a_killed_run_resumes_from_its_checkpoint(fixture_data, tmp_path, monkeypatch):
    student_steps = {"n": 0}
    original = ErcModule.training_step

    def dies_at_student_step_8(self, batch, batch_idx):
        if self.objective.needs_teacher:  # the student (the teacher trains with ce only)
            student_steps["n"] += 1
            if student_steps["n"] == 8:
                raise RuntimeError("simulated crash midway")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ErcModule, "training_step", dies_at_student_step_8)
    # 9 train turns, batch 2: 5 steps an epoch, 15 in 3 epochs; last.ckpt every 2 steps
    args = argv(fixture_data, tmp_path, "--epochs", "3", "--checkpoint-every", "2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    record = manifest(tmp_path)["stages"]["distill"]  # an exception is recorded; a SIGKILL leaves "running"
    assert record["status"] == "failed" and "simulated crash midway" in record["error"]
    assert list((tmp_path / "run" / "student").glob("train-*/checkpoints/last.ckpt"))
    before = student_steps["n"]
    assert main(args) == 0
    train = manifest(tmp_path)["stages"]["distill"]["train"]
    assert train["resumed_from"].endswith("last.ckpt")
    assert train["steps"] == 15  # counted across the kill
    assert student_steps["n"] - before < 15  # it went on, it did not start over


@pytest.mark.parametrize("corpus, n_labels", [("meld", 7), ("emorynlp", 7), ("iemocap", 6)])
def test_ce_only_student_needs_no_teacher(fixture_data, tmp_path, corpus, n_labels):
    args = argv(fixture_data, tmp_path, "--loss", "ce=1", "--teacher", "none", "--context", "plain")
    args[args.index("--data") + 1] = corpus
    assert main(args) == 0
    m = manifest(tmp_path)
    assert set(m["stages"]) == {"distill", "evaluate", "export", "quantize", "profile", "report"}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"student", "student-int8-ort-dynamic"}
    assert len(metrics["student"]["test"]["per_class"]) == n_labels


def test_teacher_and_student_with_different_tokenizers(fixture_data, tmp_path):
    args = argv(fixture_data, tmp_path)
    args[args.index("--student") + 1] = "tiny-bert"
    assert main(args + ["--loss", "ce=1,dist=1,feature=1,hidden=0.5,supcon=0.1,spcl=0.1"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["student"]["test"]["n"] == 3 and metrics["teacher"]["test"]["n"] == 3


def test_telme_context_adds_speaker_tokens(fixture_data, tmp_path):
    assert main(argv(fixture_data, tmp_path, "--context", "telme", "--teacher-context", "telme")) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "student" / "model" / "tokenizer")
    assert tok.convert_tokens_to_ids("<s1>") != tok.unk_token_id


def test_quantize_every_method_with_its_checks(fixture_data, tmp_path, capsys):
    args = ["quantize", *argv(fixture_data, tmp_path), "--budget", "100", "--calibration-turns", "16",
            "--quantize-methods", "ort-dynamic", "ort-static", "nncf-ptq", "nncf-qat"]
    assert main(args) == 0
    out = capsys.readouterr().out
    checks = manifest(tmp_path)["stages"]["quantize"]["checks"]
    assert set(checks) == {"ort-dynamic", "ort-static", "nncf-ptq", "nncf-qat"}
    qat = list((tmp_path / "run" / "qat").glob("train-*/log/metrics.csv"))
    assert qat and "train_dist" in qat[0].read_text()  # QAT trained on the distillation objective
    for method, c in checks.items():
        assert (tmp_path / "run" / "bundle" / f"model-int8-{method}.onnx").is_file()
        assert 0 <= c["argmax_agreement"] <= 1 and method in out
        # the export gate applies where there is a quantized PyTorch model to agree with (QAT)
        assert (c["export_agreement"] is not None) == (method == "nncf-qat")
    assert checks["nncf-qat"]["export_agreement"] >= 0.9
    import onnx  # QAT weights are stored INT8 (folded), not float behind a QuantizeLinear
    qat_graph = onnx.load(str(tmp_path / "run" / "bundle" / "model-int8-nncf-qat.onnx")).graph
    inits = {i.name: i.data_type for i in qat_graph.initializer}
    assert sum(t == onnx.TensorProto.INT8 for t in inits.values()) >= 8  # 2 layers x 4 Linear weights at least
    assert not [n for n in qat_graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]


def test_quantize_fails_with_both_numbers_beyond_the_budget(fixture_data, tmp_path, capsys):
    args = ["quantize", *argv(fixture_data, tmp_path, "--loss", "ce=1", "--teacher", "none"), "--budget", "-1",
            "--method", "ort-dynamic", "nncf-ptq"]
    assert main(args) == 1
    err = capsys.readouterr().err
    for method in ("ort-dynamic", "nncf-ptq"):  # every method measured, every failure named
        assert f"{method}: INT8 dev weighted F1" in err
    assert "below the float model's" in err and "budget -1 points" in err
    assert manifest(tmp_path)["stages"]["quantize"]["status"] == "failed"
    # a rerun with another budget reuses the graphs already made and checked
    assert main([*args[:-5], "--budget", "100", "--method", "ort-dynamic", "nncf-ptq"]) == 0
    out = capsys.readouterr().out
    assert "ort-dynamic: reused" in out and "nncf-ptq: reused" in out
    assert set(manifest(tmp_path)["stages"]["quantize"]["checks"]) == {"ort-dynamic", "nncf-ptq"}


def test_teacher_key_is_stable(tmp_path):
    """A pinned key: a change to a config dataclass (a new field, a renamed one) changes every stage key,
    so cached teachers (hours of CPU) would retrain. If this fails on purpose, say so in the closing note
    and move the cached teacher folders to their new keys."""
    from erc_distill.cli import build_parser, run_config
    from erc_distill.stages import RunContext
    from erc_distill.stages.manifest import Manifest
    from erc_distill.stages.teacher import TeacherStage

    args = build_parser().parse_args(
        "teacher --teacher mpnet-base --data meld --teacher-epochs 2 --teacher-lr 3e-5 --teacher-layer-decay 0.9 "
        "--freeze-teacher-layers 2 --precision bf16-mixed --val-check-interval 0.5".split())
    ctx = RunContext(run_config(args), tmp_path / "run", tmp_path / "cache", Manifest(tmp_path / "m.json"), "data-fp")
    assert TeacherStage().key(ctx) == "e7f2bf3de5cfc5e9"
    # the data it reads is part of the key: fixtures and the real corpus never share a teacher
    ctx.data_fingerprint = "other-data"
    assert TeacherStage().key(ctx) != "e7f2bf3de5cfc5e9"


def test_a_run_trained_elsewhere_continues_without_the_teacher_weights(fixture_data, tmp_path, capsys):
    """The GPU-machine workflow: train there, copy the run folder and the teacher's configs (not its
    weights) here, then ``--start-at export`` exports, quantizes and profiles; the teacher is timed as its
    architecture, and the teacher stage itself refuses to pass off a weightless folder as trained."""
    from erc_distill.modeling import PromptedClassifier

    assert main(["evaluate", *argv(fixture_data, tmp_path)]) == 0
    m = manifest(tmp_path)
    folder = next((tmp_path / "cache" / "teachers").glob("*/model"))
    for weights in [folder / "head.safetensors", *(folder / "encoder").glob("*.safetensors")]:
        weights.unlink()
    assert not PromptedClassifier.has_weights(folder)
    assert main(["report", *argv(fixture_data, tmp_path)]) == 1
    assert "configs but not its weights" in capsys.readouterr().err
    assert main(["report", *argv(fixture_data, tmp_path), "--start-at", "export"]) == 0
    after = manifest(tmp_path)
    assert after["stages"]["distill"] == m["stages"]["distill"]  # taken as it was, not retrained
    assert {s: after["stages"][s]["status"] for s in ("export", "quantize", "profile", "report")} == dict.fromkeys(
        ("export", "quantize", "profile", "report"), "done")
    bundle = json.loads((tmp_path / "run" / "teacher_bundle" / "bundle.json").read_text())
    assert bundle["provenance"]["weights"] == "random"
    assert "timing its architecture" in capsys.readouterr().out
    # a variant scored but not timed (an INT8 method the quantize gate rejected) is marked, not blank
    from erc_distill.report.accuracy_speed import write_report

    metrics_file = tmp_path / "run" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["student-int8-rejected"] = metrics["student"]
    metrics_file.write_text(json.dumps(metrics))
    write_report(tmp_path / "run")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| student-int8-rejected |" in report and "not profiled" in report


def test_start_at_must_be_one_of_the_commands_stages(fixture_data, tmp_path, capsys):
    assert main(["distill", *argv(fixture_data, tmp_path), "--start-at", "export"]) == 1
    assert "--start-at: not among this command's stages" in capsys.readouterr().err


def test_a_moved_run_and_cache_folder_keep_working(fixture_data, tmp_path, capsys):
    """Train in one place, move the run and cache folders (another machine, another disk), carry on:
    the manifest's artifact paths follow, finished stages stay finished."""
    import shutil

    assert main(["evaluate", *argv(fixture_data, tmp_path)]) == 0
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "run"), str(moved / "run"))
    shutil.move(str(tmp_path / "cache"), str(moved / "cache"))
    capsys.readouterr()
    assert main(["export", *argv(fixture_data, moved)]) == 0
    out = capsys.readouterr().out
    for stage in ("teacher", "cache", "distill", "evaluate"):
        assert f"[{stage}] up to date" in out
    m = manifest(moved)
    for record in m["stages"].values():
        for path in record.get("artifacts", {}).values():
            assert path.startswith(str(moved.resolve())), path
    assert m["paths"] == {"run": str((moved / "run").resolve()), "cache": str((moved / "cache").resolve())}
    # a new run folder on the moved cache reuses the teacher and finds it where it is now
    args = argv(fixture_data, tmp_path / "second")
    args[args.index("--cache-dir") + 1] = str(moved / "cache")
    assert main(["evaluate", *args]) == 0
    teacher = manifest(tmp_path / "second")["stages"]["teacher"]
    assert teacher["artifacts"]["model"].startswith(str(moved / "cache"))
    assert teacher["train"] == m["stages"]["teacher"]["train"]  # the same teacher, not retrained
