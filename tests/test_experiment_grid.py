"""bench/experiment_grid.py (the script behind the README's accuracy tables) on tiny models and the fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_grid_runs_every_job_picks_the_best_dev_teacher_and_summarises_the_runs(fixture_data, tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "bench" / "experiment_grid.py"), "--out", str(out), "--cache-dir",
           str(tmp_path / "cache"), "--data-dir", str(fixture_data), "--jobs", "3", "--seeds", "0", "1",
           "--recipes", "1ep-plain", "4ep-ld0.9", "--teacher", "tiny", "--student", "tiny", "--batch-size", "2",
           "--max-len", "64", "--teacher-max-len", "64", "--precision", "32-true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    grid = json.loads((out / "grid.json").read_text())
    assert all(job["rc"] == 0 for job in grid["jobs"].values()), grid["jobs"]
    assert {"teacher-1ep-plain", "teacher-4ep-ld0.9", "cache", "distill-s0", "distill-s1", "ce-s1", "plain-s0",
            "emory-distill-s0", "emory-ce-s0"} <= set(grid["jobs"])
    dev = {n: r["best_dev_weighted_f1"] for n, r in grid["teacher_ablation_dev"].items()}
    assert grid["chosen_teacher"] in dev and dev[grid["chosen_teacher"]] == max(dev.values())
    for recipe, folder in (("distilled", "meld-distill-s{}"), ("ce-only", "meld-ce-s{}"),
                           ("utterance-only", "meld-plain-s{}")):
        for seed in ("0", "1"):  # the summary repeats each run's metrics.json, nothing else
            metrics = json.loads((out / folder.format(seed) / "metrics.json").read_text())["student"]["test"]
            assert grid["meld_test"][recipe][seed]["weighted_f1"] == metrics["weighted_f1"]
    assert set(grid["emorynlp_test"]) == {"distill", "ce"}
    assert "| distilled | 2 |" in (out / "grid.md").read_text()
