"""Crash safety and training integrity: exact resume, non-finite guards, no wedged reruns, data-keyed caches."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from erc_distill.cli import main
from erc_distill.distill.module import ErcModule


def argv(fixture_data, run, cache, *extra: str) -> list[str]:
    return ["--teacher", "tiny", "--student", "tiny", "--data-dir", str(fixture_data), "--out", str(run),
            "--cache-dir", str(cache), "--epochs", "2", "--teacher-epochs", "1", "--batch-size", "2",
            "--max-len", "64", "--teacher-max-len", "64", "--quantize-methods", "ort-dynamic",
            "--precision", "32-true", *extra]


def manifest(run) -> dict:
    return json.loads((run / "manifest.json").read_text())


def last_state(run) -> dict[str, torch.Tensor]:
    (ckpt,) = run.glob("student/train-*/checkpoints/last.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_a_killed_training_resumes_mid_epoch_exactly(fixture_data, tmp_path, monkeypatch):
    """9 train turns, batch 2: 5 steps an epoch, 15 in 3; last.ckpt every 2 steps, so a crash at step 8
    resumes from step 6, in the middle of epoch 2. Dropout is on: the RNG state must resume too."""
    common = ("--teacher", "none", "--loss", "ce=1", "--epochs", "3", "--checkpoint-every", "2", "--patience", "5")
    straight = tmp_path / "straight"
    assert main(["distill", *argv(fixture_data, straight, tmp_path / "c1"), *common]) == 0

    steps = {"n": 0}
    original = ErcModule.training_step

    def dies_at_step_8(self, batch, batch_idx):
        steps["n"] += 1
        if steps["n"] == 8:
            raise RuntimeError("simulated crash midway")
        return original(self, batch, batch_idx)

    killed = tmp_path / "killed"
    args = ["distill", *argv(fixture_data, killed, tmp_path / "c2"), *common]
    monkeypatch.setattr(ErcModule, "training_step", dies_at_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    monkeypatch.setattr(ErcModule, "training_step", original)
    assert manifest(killed)["stages"]["distill"]["status"] == "failed"
    steps["n"] = 0
    assert main(args) == 0
    record = manifest(killed)["stages"]["distill"]["train"]
    assert record["resumed_from"].endswith("last.ckpt") and record["steps"] == 15
    a, b = last_state(straight), last_state(killed)
    assert a.keys() == b.keys()
    for name in a:  # bit-identical weights, not "close": nothing replayed, nothing skipped
        assert torch.equal(a[name], b[name]), name
    assert (straight / "student" / "model" / "head.safetensors").read_bytes() == \
        (killed / "student" / "model" / "head.safetensors").read_bytes()


def test_a_non_finite_loss_fails_the_stage(fixture_data, tmp_path, monkeypatch, capsys):
    from erc_distill.distill import losses

    original = losses.CrossEntropy.forward
    calls = {"n": 0}

    def blows_up(self, *a, **k):  # a numerical blow-up at the 3rd step
        calls["n"] += 1
        value = original(self, *a, **k)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(losses.CrossEntropy, "forward", blows_up)
    run = tmp_path / "run"
    assert main(["distill", *argv(fixture_data, run, tmp_path / "c"), "--teacher", "none", "--loss", "ce=1"]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("erc-distill")]  # one line, no traceback
    assert "non-finite loss at step 2" in line and "ce=nan" in line and "Traceback" not in err
    record = manifest(run)["stages"]["distill"]
    assert record["status"] == "failed" and "TrainingError" in record["error"]
    assert not (run / "student" / "model").exists()  # nothing saved as if it were trained


def test_kill_between_teacher_save_and_its_result_does_not_wedge(fixture_data, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["teacher", *argv(fixture_data, run, cache)]) == 0
    (model,) = cache.glob("teachers/*/model")
    (model / "result.json").unlink()  # what an older version left when killed after saving the weights
    shutil.copytree(model, model.with_name(".model.tmp-12345"))  # and what a kill mid-save leaves now
    capsys.readouterr()
    assert main(["teacher", *argv(fixture_data, run, cache)]) == 0
    out = capsys.readouterr().out
    assert "[teacher] running" in out and "incomplete" in out
    assert (model / "result.json").is_file() and not model.with_name(".model.tmp-12345").exists()


def test_damaged_artifacts_are_rebuilt_not_trusted(fixture_data, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = ["quantize", *argv(fixture_data, run, cache)]
    assert main(args) == 0
    (run / "bundle" / "model.onnx").unlink()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[export] running" in out and "artifact model is missing" in out
    assert (run / "bundle" / "model.onnx").is_file()
    # flipped bytes in a graph: the recorded hash no longer matches, so the stage runs again
    data = bytearray((run / "bundle" / "tokenizer.json").read_bytes())
    data[10] ^= 1
    (run / "bundle" / "tokenizer.json").write_bytes(bytes(data))
    assert main(args) == 0
    assert "artifact tokenizer changed" in capsys.readouterr().out
    # a truncated quantize sidecar is recomputed, not a crash
    sidecar = run / "bundle" / "model-int8-ort-dynamic.json"
    sidecar.write_text(sidecar.read_text()[:20])
    assert main([*args, "--force", "quantize"]) == 0
    out = capsys.readouterr().out
    assert "[quantize] running (key" in out and "ort-dynamic: reused" not in out
    assert json.loads(sidecar.read_text())["key"]


def test_force_reruns_one_stage(fixture_data, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = ["evaluate", *argv(fixture_data, run, cache), "--teacher", "none", "--loss", "ce=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--force", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert "[distill] up to date" in out and "[evaluate] running (key" in out and "--force" in out


def test_cache_keys_hash_the_data(fixture_data, tmp_path, capsys):
    """A teacher trained on one copy of the data is reused for an identical copy, never for other data."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["teacher", *argv(fixture_data, run, cache)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(fixture_data, copy)
    capsys.readouterr()
    assert main(["teacher", *argv(copy, tmp_path / "run2", cache)]) == 0
    assert "trained before, reused" in capsys.readouterr().out
    csv = copy / "meld" / "train_sent_emo.csv"
    csv.write_text(csv.read_text().replace("duck", "dock", 1))
    assert main(["teacher", *argv(copy, tmp_path / "run3", cache)]) == 0
    assert "trained before" not in capsys.readouterr().out
    assert len(list(cache.glob("teachers/*/model"))) == 2
    fingerprints = {manifest(r)["data"]["fingerprint"] for r in (run, tmp_path / "run2", tmp_path / "run3")}
    assert len(fingerprints) == 2


@pytest.mark.realdata
def test_fixture_and_real_meld_never_share_a_teacher_key(fixture_data, real_data, tmp_path):
    from erc_distill.cli import build_parser, run_config
    from erc_distill.data import corpus_fingerprint
    from erc_distill.stages import RunContext
    from erc_distill.stages.manifest import Manifest
    from erc_distill.stages.teacher import TeacherStage

    cfg = run_config(build_parser().parse_args(["--teacher", "tiny"]))
    keys = {TeacherStage().key(RunContext(cfg, tmp_path, tmp_path, Manifest(tmp_path / "m.json"),
                                          corpus_fingerprint("meld", root)))
            for root in (fixture_data, real_data)}
    assert len(keys) == 2


def test_a_stale_nncf_build_lock_is_cleared_and_a_fresh_one_waited_on(tmp_path):
    from erc_distill.export.extension_lock import clear_stale_build_locks

    stale = tmp_path / "quantized_functions_cpu" / "2.13.0+cpu" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    messages: list[str] = []
    assert clear_stale_build_locks(tmp_path, log=messages.append) == [stale]
    assert not stale.exists() and "removed a stale build lock" in messages[0] and str(stale) in messages[0]
    fresh = tmp_path / "other" / "lock"
    fresh.parent.mkdir()
    fresh.touch()
    messages.clear()
    start = time.monotonic()
    assert clear_stale_build_locks(tmp_path, stale_after_s=0.5, log=messages.append, poll_s=0.05) == [fresh]
    assert time.monotonic() - start >= 0.4  # it waited on a lock a build might still hold, and said so
    assert messages[0].startswith(f"waiting on build lock {fresh}")


def test_settings_only_a_loaded_model_can_check_fail_before_training(fixture_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["teacher", *argv(fixture_data, run, tmp_path / "c"), "--freeze-teacher-layers", "99"]) == 1
    err = capsys.readouterr().err
    assert "--freeze-teacher-layers: 99 layers to freeze, but tiny has 2" in err and "Traceback" not in err
    assert not list(run.glob("**/last.ckpt"))
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file")]) == 1
    assert "is a file, not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("turns", ["0", "-5", "abc"])
def test_profile_turns_are_checked(turns, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--bundle", str(tmp_path), "--turns", turns])
    assert exit_.value.code == 2 and "--turns" in capsys.readouterr().err


def test_start_at_past_a_stage_that_never_ran_says_what_is_missing(fixture_data, tmp_path, capsys):
    assert main(["report", *argv(fixture_data, tmp_path / "run", tmp_path / "c"), "--start-at", "export"]) == 1
    err = capsys.readouterr().err
    assert "stage export needs distill, which has not finished" in err and "Traceback" not in err


def test_damaged_caches_and_checkpoints_are_rebuilt(fixture_data, tmp_path, capsys):
    """A truncated teacher-cache array, NaN written over one, a damaged cached teacher, a truncated
    last.ckpt: each is noticed and rebuilt, never trusted and never a wedge."""
    import numpy as np

    run, cache = tmp_path / "run", tmp_path / "cache"
    args = ["distill", *argv(fixture_data, run, cache)]
    assert main(args) == 0
    (logits,) = cache.glob("teacher-cache/*/train.logits.npy")
    logits.write_bytes(logits.read_bytes()[:100])
    capsys.readouterr()
    assert main(args) == 0
    assert "is damaged" in capsys.readouterr().out
    array = np.load(logits)
    np.save(logits, np.full_like(array, np.nan))  # same size, NaN
    assert main([*args, "--force", "cache"]) == 0
    assert "non-finite values" in capsys.readouterr().out and np.isfinite(np.load(logits)).all()
    (head,) = cache.glob("teachers/*/model/head.safetensors")
    head.write_bytes(head.read_bytes()[:-8] + b"\0" * 8)
    assert main(args) == 0
    assert "changed since it was trained" in capsys.readouterr().out
    (ckpt,) = run.glob("student/train-*/checkpoints/last.ckpt")
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert main([*args, "--force", "distill"]) == 0
    assert ckpt.with_name("last.ckpt.broken").is_file()


def test_metrics_rows_survive_a_rerun_of_evaluate_and_follow_the_methods(fixture_data, tmp_path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = ["report", *argv(fixture_data, run, cache)]
    assert main(args) == 0
    assert main([*args, "--force", "evaluate"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "student-int8-ort-dynamic" in metrics  # evaluate no longer wipes the INT8 rows
    (run / "metrics.json").unlink()
    capsys.readouterr()
    assert main(args) == 0  # evaluate and quantize notice their rows are gone; quantize reuses its graph
    out = capsys.readouterr().out
    assert "metrics.json lacks" in out and "ort-dynamic: reused" in out
    assert main([*args[:-2], "--quantize-methods", "ort-static"]) == 0
    assert {k for k in json.loads((run / "metrics.json").read_text()) if "int8" in k} == {"student-int8-ort-static"}


def test_user_errors_found_at_start_up(fixture_data, tmp_path, capsys):
    cases = [
        (["--student", "/no/such/folder"], "/no/such/folder"),
        (["--max-len", "600"], "exceeds the"),
        (["--loss", "ce=1,dist=1,hidden=1", "--loss.hidden-layers", "5"], "--loss.hidden-layers"),
        (["--accelerator", "gpu"], "torch sees no CUDA GPU"),
    ]
    for extra, message in cases:
        assert main(["distill", *argv(fixture_data, tmp_path / "run", tmp_path / "c"), *extra]) == 1, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err[-500:])
    with pytest.raises(SystemExit):  # an unknown option without a command is named, not "invalid choice"
        main(["--tua", "1"])
    assert "unrecognized arguments: --tua" in capsys.readouterr().err


def test_the_same_run_folder_spelled_another_way_is_up_to_date(fixture_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["report", *argv(fixture_data, "runs/r", tmp_path / "c"), "--teacher", "none", "--loss", "ce=1"]
    assert main(args) == 0
    other = list(args)
    other[other.index("runs/r")] = str(tmp_path / "runs" / ".." / "runs" / "r")
    capsys.readouterr()
    assert main(other) == 0
    assert capsys.readouterr().out.count("up to date") == 6  # distill .. report: nothing re-profiled


def test_careless_arguments_to_the_robot_side_commands(tmp_path, capsys, fixture_data):
    """Each is one line naming the flag or the file, never a traceback."""
    from conftest import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundle")[0]
    for bad in ("0", "-1", "nan", "inf", "abc"):
        with pytest.raises(SystemExit):
            main(["stream", "--bundle", str(bundle), "--idle-ttl", bad])
        assert "--idle-ttl" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["profile", "--bundle", str(bundle), "--json", str(tmp_path)], "is a folder"),
        (["export-triton", "--bundle", str(bundle), "--out", str(tmp_path / "repo"), "--name", "bad/x"], "name must be"),
        (["distill", "--teacher", "none", "--loss", "ce=1", "--student", "tiny", "--data-dir", str(fixture_data),
          "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "a-file")], "is a file, not a cache folder"),
    ]
    for args, message in cases:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err[-400:])
    repo = ["export-triton", "--bundle", str(bundle), "--out", str(tmp_path / "repo")]
    assert main(repo) == 0 and main(repo) == 1  # an existing model is not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*repo, "--overwrite"]) == 0
