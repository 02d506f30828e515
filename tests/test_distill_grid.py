"""bench/distill_grid.py: its job graph (gating, priorities, failed dependencies) and its paired summary.
The grid itself was run end to end on tiny models (``--teacher tiny --student tiny``, 26 jobs, 3.5 min on
2 cores); here its parts are checked without training."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import distill_grid  # noqa: E402
from experiment_grid import Grid  # noqa: E402


def _args(tmp_path, seeds=(1, 2, 3), few=2):
    return Namespace(out=tmp_path, seeds=list(seeds), few=few, accelerator="cpu", data_dir=None)


def test_before_the_encoders_arrive_only_the_baselines_are_added(tmp_path):
    grid = Grid(tmp_path, [], jobs=4, threads=1)
    added: set[str] = set()
    distill_grid.add_jobs(grid, _args(tmp_path), False, added)
    assert {j.args[0] for j in grid.jobs.values()} == {"evaluate"}
    assert {n.rsplit("-s", 1)[0] for n in grid.jobs} == {"utterance-only", "ce-only"}
    distill_grid.add_jobs(grid, _args(tmp_path), True, added)
    teachers = [j for j in grid.jobs.values() if j.name.startswith("T:")]
    assert teachers and all(j.priority == 0 and j.args[0] == "teacher-outputs" for j in teachers)
    main = [j for j in grid.jobs.values() if j.name.startswith(distill_grid.slug(distill_grid.MAIN) + "-s")]
    assert len(main) == 3 and all(j.priority == 2 and set(j.after) == {f"T:{t}" for t in distill_grid.MPNET_ENSEMBLE}
                                  for j in main)
    assert "--transfer" in main[0].args and "--teacher-outputs" in main[0].args
    few = [j for j in grid.jobs.values() if j.name.startswith("ensemble-s")]
    assert len(few) == 2  # control arms: --few seeds
    before = len(grid.jobs)
    distill_grid.add_jobs(grid, _args(tmp_path), True, added)
    assert len(grid.jobs) == before  # adding again adds nothing


def test_jobs_behind_a_failed_dependency_do_not_keep_the_grid_waiting(tmp_path):
    grid = Grid(tmp_path, [], jobs=2, threads=1)
    grid.add("a", ["x"])
    grid.add("b", ["x"], after=["a"])
    grid.add("c", ["x"], after=["b"])
    grid.add("d", ["x"])
    grid.jobs["a"].rc = 1
    grid.jobs["d"].rc = 0
    assert grid.blocked() == {"b", "c"}  # c only through b


def _metrics(test, dev, int8=None):
    row = lambda f: {"weighted_f1": f / 100, "macro_f1": f / 200, "accuracy": f / 100}  # noqa: E731
    m = {"student": {"test": row(test), "dev": row(dev)}}
    if int8 is not None:
        m["student-int8-ort-dynamic"] = {"test": row(int8), "dev": row(dev)}
    return m


def test_summary_pairs_arms_by_seed_and_leaves_out_stopped_runs(tmp_path):
    runs = {"utterance-only": {1: 60.0, 2: 61.0, 3: 59.0}, distill_grid.MAIN: {1: 62.0, 2: 62.5, 3: 70.0}}
    for arm, by_seed in runs.items():
        for seed, f in by_seed.items():
            d = tmp_path / "runs" / f"{distill_grid.slug(arm)}-s{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_metrics(f, f - 2, int8=f - 0.5 if arm != "utterance-only"
                                                                else None)))
    jobs = {f"{distill_grid.slug(distill_grid.MAIN)}-s3": {"rc": -15, "wall_s": 1.0}}  # stopped at the deadline
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    text = distill_grid.summarize(_args(tmp_path), 1.0)
    result = json.loads((tmp_path / "grid.json").read_text())
    assert set(result["students"][distill_grid.MAIN]) == {"1", "2"}  # seed 3's stale metrics are left out
    pair = next(p for p in result["paired"] if p["arm"] == distill_grid.MAIN and p["baseline"] == "utterance-only")
    assert pair["seeds"] == ["1", "2"] and pair["test_diffs"] == pytest.approx([2.0, 1.5])
    assert "| ensemble+emorynlp − utterance-only | 2 | 1.75 ± 0.35 |" in text
    assert result["students"][distill_grid.MAIN]["1"]["int8_test_wf1"] == pytest.approx(61.5)


def test_cpu_study_pairs_each_arm_with_the_utterance_baseline_by_seed(tmp_path):
    import distill_cpu

    def metrics(test, dev):
        row = {"test": {"weighted_f1": test / 100, "macro_f1": 0.3, "accuracy": 0.5}, "dev": {"weighted_f1": dev / 100}}
        return {"student": row, "teacher": row}

    plan = distill_cpu.arms(["t.npz"], "self.npz")
    scores = {"utterance-only": {1: (60, 55), 2: (61, 56)}, "KD": {1: (61, 57), 2: (63, 56.5)},
              "KD + transfer": {2: (62, 58)},  # seed 1 of this arm did not finish
              "KD 4-layer": {1: (60.5, 56), 2: (62, 56)}, "self-distillation": {1: (60, 55.5)}}
    for arm, by_seed in scores.items():
        for seed, (test, dev) in by_seed.items():
            run = tmp_path / "runs" / f"{distill_grid.slug(arm)}-s{seed}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(metrics(test, dev)))
    text = distill_cpu.summarize(tmp_path, plan, Namespace(seeds=[1, 2], teacher_outputs=["t.npz"]))
    result = json.loads((tmp_path / "cpu_grid.json").read_text())
    pairs = {p["arm"]: p for p in result["paired"]}
    assert pairs["KD"]["test_diffs"] == pytest.approx([1.0, 2.0]) and pairs["KD"]["seeds"] == ["1", "2"]
    assert pairs["KD + transfer"]["seeds"] == ["2"] and pairs["KD + transfer"]["test_diffs"] == pytest.approx([1.0])
    assert "label smoothing 0.1" not in pairs  # no runs, no pair
    assert "| KD − utterance-only | 2 | 1.50 ± 0.71 |" in text
    assert "--teacher-outputs" in plan["KD"] and "--transfer" in plan["KD + transfer"]
    # the layer-dropped students pair with the 6-layer KD arm, the controls with the baseline
    assert pairs["KD 4-layer"]["baseline"] == "KD" and pairs["KD 4-layer"]["test_diffs"] == pytest.approx([-0.5, -1])
    assert pairs["self-distillation"]["baseline"] == "utterance-only" and pairs["self-distillation"]["seeds"] == ["1"]
    assert "| KD 4-layer − KD | 2 | -0.75 ± 0.35 |" in text
    assert plan["KD 4-layer"][-2:] == ["--student-layers", "4"] and "self.npz" in plan["self-distillation"]
    assert "self-distillation" not in distill_cpu.arms(["t.npz"])  # no MiniLM teacher's file: no such arm
    # only the 4-layer arm asked for: still paired with the KD runs already there
    distill_cpu.summarize(tmp_path, {"KD 4-layer": plan["KD 4-layer"]}, Namespace(seeds=[1, 2], teacher_outputs=[]))
    result = json.loads((tmp_path / "cpu_grid.json").read_text())
    assert result["paired"][0]["baseline"] == "KD" and result["paired"][0]["seeds"] == ["1", "2"]
