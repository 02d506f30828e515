"""The README's accuracy experiments in one command: teacher ablations, baselines, distilled seeds.

Runs ``erc-distill`` subprocesses, up to ``--jobs`` at a time (several small jobs share one GPU
well), in two phases:

A. (all at once) MELD teacher recipes (``erc-distill teacher``), the EmoryNLP teacher, and the
   students that need no teacher: CE-only with context + prompt (``meld-ce-baseline``) and the
   utterance-only baseline (``meld-plain-baseline``), ``--seeds`` each, plus EmoryNLP CE-only.
B. The MELD teacher with the best dev weighted F1 is cached once, then the distilled student
   (``meld-mpnet-minilm`` with that teacher's recipe) is trained for every seed, with a few
   student-loss ablations at the first seed; EmoryNLP is distilled with its teacher.

Every stage is content-addressed in ``--cache-dir``, so a rerun skips what is done. With
``--deadline`` the remaining jobs are stopped at that many seconds and the summary is still
written. Other options (``--quick``, ``--teacher tiny --student tiny``) go to every job. Writes ``OUT/grid.json`` and ``OUT/grid.md`` (teacher ablation on dev; test weighted F1
mean ± std per student recipe).

    python bench/experiment_grid.py --out runs/grid --cache-dir ~/.cache/erc-distill \\
        --accelerator gpu --jobs 16            # one GPU: about 10 minutes on an H100/H200
    python bench/experiment_grid.py --out runs/grid --jobs 1   # this 2-core CPU: many hours
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

#: MELD teacher recipes (flags on top of ``--config meld-mpnet-minilm``); the first is what a new
#: user would try (one epoch, no layer decay), the rest vary schedule and the teacher's objective.
TEACHERS: dict[str, list[str]] = {
    "1ep-plain": ["--teacher-epochs", "1", "--teacher-lr", "2e-5", "--teacher-layer-decay", "1.0",
                  "--freeze-teacher-layers", "0"],
    "4ep-ld0.9": ["--teacher-epochs", "4", "--teacher-lr", "2e-5", "--teacher-layer-decay", "0.9",
                  "--freeze-teacher-layers", "0"],
    "4ep-ld0.9-supcon": ["--teacher-epochs", "4", "--teacher-lr", "2e-5", "--teacher-layer-decay", "0.9",
                         "--freeze-teacher-layers", "0", "--teacher-loss", "ce=1,supcon=0.1"],
    "4ep-ld0.9-spcl": ["--teacher-epochs", "4", "--teacher-lr", "2e-5", "--teacher-layer-decay", "0.9",
                       "--freeze-teacher-layers", "0", "--teacher-loss", "ce=1,spcl=0.1"],
}
EMORY_TEACHER = "4ep-ld0.9"
#: Student-objective ablations, run at the first seed with the chosen teacher.
STUDENT_ABLATIONS: dict[str, str] = {"kd": "ce=1,kd=1", "dist": "ce=1,dist=1"}


@dataclass
class Job:
    name: str
    args: list[str]
    after: list[str] = field(default_factory=list)
    priority: int = 0
    """Lower starts first when several jobs are ready (then in the order they were added)."""
    proc: subprocess.Popen | None = None
    start: float = 0.0
    wall_s: float | None = None
    rc: int | None = None


class Grid:
    def __init__(self, out: Path, common: list[str], jobs: int, threads: int) -> None:
        self.out, self.common, self.max_jobs, self.threads = out, common, jobs, threads
        self.jobs: dict[str, Job] = {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def add(self, name: str, args: list[str], after: list[str] | None = None, priority: int = 0) -> None:
        self.jobs[name] = Job(name, args, after or [], priority)

    def _launch(self, job: Job) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "erc_distill.cli", job.args[0], *self.common, *job.args[1:]]
        log = open(self.out / "logs" / f"{job.name}.log", "w")
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        job.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        job.start = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)

    def step(self, deadline: float) -> bool:
        """Reap finished jobs, start ready ones; False when nothing is left to run."""
        for job in self.jobs.values():
            if job.proc is not None and job.rc is None and job.proc.poll() is not None:
                job.rc, job.wall_s = job.proc.returncode, round(time.perf_counter() - job.start, 1)
                print(f"[{time.strftime('%H:%M:%S')}] {'done' if job.rc == 0 else f'FAILED rc={job.rc}'} "
                      f"{job.name} ({job.wall_s:.0f} s)", flush=True)
        running = [j for j in self.jobs.values() if j.proc is not None and j.rc is None]
        if time.perf_counter() > deadline:
            for job in running:
                job.proc.terminate()
            for job in running:
                job.proc.wait()
                job.rc, job.wall_s = -15, round(time.perf_counter() - job.start, 1)
                print(f"deadline: stopped {job.name}", flush=True)
            return False
        for job in sorted(self.jobs.values(), key=lambda j: j.priority):  # stable: ties keep their order
            if len(running) >= self.max_jobs:
                break
            deps = [self.jobs[d] for d in job.after]
            if job.proc is None and all(d.rc == 0 for d in deps):
                self._launch(job)
                running.append(job)
        blocked = self.blocked()
        return any(j.rc is None and j.name not in blocked for j in self.jobs.values())

    def blocked(self) -> set[str]:
        """Jobs that can never start: one of their dependencies, directly or through others, failed."""
        out: set[str] = set()
        changed = True
        while changed:
            changed = False
            for j in self.jobs.values():
                if j.proc is None and j.name not in out and any(
                        d in out or self.jobs[d].rc not in (None, 0) for d in j.after):
                    out.add(j.name)
                    changed = True
        return out


def teacher_result(run_dir: Path) -> dict | None:
    """The finished teacher stage of a run's manifest: its key, training result and wall time (else None)."""
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return None
    record = json.loads(manifest.read_text())["stages"].get("teacher", {})
    if record.get("status") != "done":
        return None
    return {"key": record["key"], **record.get("train", {}), "wall_s": record.get("wall_s")}


def done_teachers(out: Path, recipes: list[str]) -> dict[str, dict]:
    results = {n: teacher_result(out / f"meld-teacher-{n}") for n in recipes}
    return {n: r for n, r in results.items() if r}


def student_scores(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def grid_parser(doc: str, out: str, seeds: list[int]) -> argparse.ArgumentParser:
    """The options every grid script has (unknown ones go to every ``erc-distill`` job)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="jobs at a time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per job")
    p.add_argument("--deadline", type=float, default=None, help="stop remaining jobs after this many seconds")
    return p


def common_flags(args: argparse.Namespace, passthrough: list[str], checkpoint_every: int) -> list[str]:
    """Flags every job of a grid gets: accelerator, checkpoint interval, folders, the passed-through options."""
    common = ["--accelerator", args.accelerator, "--checkpoint-every", str(checkpoint_every), *passthrough]
    common += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    common += ["--data-dir", str(args.data_dir)] if args.data_dir else []
    return common


def main() -> None:
    p = grid_parser(__doc__, "runs/grid", [0, 1, 2])
    p.add_argument("--choose-by", type=float, default=None,
                   help="pick the MELD teacher among those finished by this many seconds (the rest run on)")
    p.add_argument("--recipes", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--no-emorynlp", action="store_true")
    args, passthrough = p.parse_known_args()

    out = args.out
    grid = Grid(out, common_flags(args, passthrough, 200), args.jobs, args.threads)
    t0 = time.perf_counter()
    deadline = t0 + (args.deadline or float("inf"))

    # phase A
    for name in args.recipes:
        grid.add(f"teacher-{name}", ["teacher", "--config", "meld-mpnet-minilm", *TEACHERS[name],
                                     "--out", str(out / f"meld-teacher-{name}")])
    for seed in args.seeds:
        grid.add(f"ce-s{seed}", ["evaluate", "--config", "meld-ce-baseline", "--seed", str(seed),
                                 "--out", str(out / f"meld-ce-s{seed}")])
        grid.add(f"plain-s{seed}", ["evaluate", "--config", "meld-plain-baseline", "--seed", str(seed),
                                    "--out", str(out / f"meld-plain-s{seed}")])
    if not args.no_emorynlp:
        emory = ["--config", "emorynlp-mpnet-minilm", *TEACHERS[EMORY_TEACHER]]
        grid.add("emory-teacher", ["teacher", *emory, "--out", str(out / "emorynlp-distill-s0")])
        grid.add("emory-ce-s0", ["evaluate", *emory, "--teacher", "none", "--loss", "ce=1",
                                 "--out", str(out / "emorynlp-ce-s0")])

    # phase B waits for the teachers, then picks one (the jobs are added once it is known)
    chosen: str | None = None
    while grid.step(deadline) or chosen is None:
        teachers_over = all(grid.jobs[f"teacher-{n}"].rc is not None for n in args.recipes)
        waited = args.choose_by is not None and time.perf_counter() - t0 > args.choose_by
        done = done_teachers(out, args.recipes)
        if chosen is None and teachers_over and not done:
            print("no MELD teacher finished: nothing to distil", flush=True)
            break
        if chosen is None and done and (teachers_over or waited):
            chosen = max(done, key=lambda n: done[n]["best_dev_weighted_f1"])
            print(f"chosen teacher: {chosen} (dev weighted F1 {100 * done[chosen]['best_dev_weighted_f1']:.2f})",
                  flush=True)
            recipe = ["--config", "meld-mpnet-minilm", *TEACHERS[chosen]]
            grid.add("cache", ["cache", *recipe, "--out", str(out / f"meld-distill-s{args.seeds[0]}")])
            for seed in args.seeds:
                grid.add(f"distill-s{seed}", ["evaluate", *recipe, "--seed", str(seed),
                                              "--out", str(out / f"meld-distill-s{seed}")], after=["cache"])
            for name, loss in STUDENT_ABLATIONS.items():
                grid.add(f"distill-{name}-s{args.seeds[0]}",
                         ["evaluate", *recipe, "--loss", loss, "--seed", str(args.seeds[0]),
                          "--out", str(out / f"meld-distill-{name}-s{args.seeds[0]}")], after=["cache"])
        if "emory-teacher" in grid.jobs and "emory-distill-s0" not in grid.jobs:
            grid.add("emory-distill-s0", ["evaluate", "--config", "emorynlp-mpnet-minilm", *TEACHERS[EMORY_TEACHER],
                                          "--out", str(out / "emorynlp-distill-s0")], after=["emory-teacher"])
        time.sleep(2)

    summary = summarize(out, args, grid, chosen, time.perf_counter() - t0)
    print(summary)


def summarize(out: Path, args: argparse.Namespace, grid: Grid, chosen: str | None, wall: float) -> str:
    teachers = {n: teacher_result(out / f"meld-teacher-{n}") for n in args.recipes}
    recipes = {"distilled": "meld-distill-s{}", "ce-only": "meld-ce-s{}", "utterance-only": "meld-plain-s{}"}
    students: dict[str, dict] = {}
    for recipe, pattern in recipes.items():
        runs = {s: student_scores(out / pattern.format(s)) for s in args.seeds}
        runs = {s: m for s, m in runs.items() if m}
        students[recipe] = {str(s): {k: m["student"]["test"][k] for k in ("weighted_f1", "macro_f1", "accuracy")}
                            for s, m in runs.items()}
        if recipe == "distilled" and runs:
            students["teacher"] = {"0": {k: next(iter(runs.values()))["teacher"]["test"][k]
                                         for k in ("weighted_f1", "macro_f1", "accuracy")}}
    for name in STUDENT_ABLATIONS:
        m = student_scores(out / f"meld-distill-{name}-s{args.seeds[0]}")
        if m:
            students[f"distilled ({STUDENT_ABLATIONS[name]})"] = {
                str(args.seeds[0]): {k: m["student"]["test"][k] for k in ("weighted_f1", "macro_f1", "accuracy")}}
    emory = {n: student_scores(out / f"emorynlp-{n}-s0") for n in ("distill", "ce")}
    result = {
        "date": date.today().isoformat(), "machine": platform.machine(), "accelerator": args.accelerator,
        "wall_s": round(wall, 1), "chosen_teacher": chosen, "teacher_ablation_dev": teachers, "meld_test": students,
        "emorynlp_test": {n: {k: m[k]["test"] for k in m if k in ("teacher", "student")} for n, m in emory.items() if m},
        "jobs": {j.name: {"rc": j.rc, "wall_s": j.wall_s} for j in grid.jobs.values()},
    }
    (out / "grid.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Experiment grid ({result['date']}, accelerator {args.accelerator}, {wall / 60:.1f} min)", "",
             "## MELD teacher recipes (mpnet-base, dev weighted F1)", "", "| recipe | dev wF1 | epochs | wall s |",
             "| --- | --- | --- | --- |"]
    for n, r in teachers.items():
        lines.append(f"| {n}{' (chosen)' if n == chosen else ''} | "
                     + (f"{100 * r['best_dev_weighted_f1']:.2f} | {r['epochs_run']} | {r['wall_s']} |" if r else "– | – | – |"))
    lines += ["", "## MELD test (mean ± std over seeds)", "", "| model | seeds | weighted F1 | macro F1 |",
              "| --- | --- | --- | --- |"]
    for recipe, runs in students.items():
        wf = [100 * r["weighted_f1"] for r in runs.values()]
        mf = [100 * r["macro_f1"] for r in runs.values()]
        lines.append(f"| {recipe} | {len(runs)} | {mean_std(wf)} | {mean_std(mf)} |")
    lines += ["", "## Jobs", "", "| job | rc | wall s |", "| --- | --- | --- |"]
    lines += [f"| {j.name} | {j.rc} | {j.wall_s} |" for j in grid.jobs.values()]
    text = "\n".join(lines) + "\n"
    (out / "grid.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
