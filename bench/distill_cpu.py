"""Does the teacher's knowledge pay, at a size a 2-core CPU trains? (issue #10, without a GPU)

The GPU grid (``bench/distill_grid.py``) asks it with context students and a four-teacher ensemble. Here the
question is asked where the CPU can answer it over seeds: **utterance-only** MiniLM-L6 students, the README
main command's recipe (``--config meld-cpu``: 3 epochs, batch 16, dev checks every half epoch, the best dev
checkpoint kept) against the same recipe without a teacher (``--config meld-plain-baseline``, what a user's
plain fine-tune runs), paired by seed:

    utterance-only        cross-entropy (the baseline)
    KD                    + the teacher output files' ensemble, ``ce=1,kd=1`` (τ 4): ``--config meld-cpu``
    KD + transfer         + the EmoryNLP transfer scenes, soft targets only
    label smoothing 0.1   a regulariser that needs no teacher (the control)
    self-distillation     KD from a MiniLM-L6 teacher's outputs (``--self-teacher-outputs``): a teacher no bigger
                          than the student, the control that tells knowledge from regularisation
    KD 4-layer, KD 3-layer  the KD arm with the student's top layers dropped (``--student-layers``), paired with KD

    python bench/distill_cpu.py --out runs/distill-cpu --data-dir ../shared/data --jobs 2 \
        [--teacher-outputs bench/results/teachers/X.npz ...] [--self-teacher-outputs Y.npz] \
        [--arms utterance-only KD] [--seeds 0 1 2 3 4]

Writes ``OUT/cpu_grid.{json,md}`` (mean ± std per arm, paired differences, each arm against its reference);
a rerun skips finished runs.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from distill_grid import _scores, mean_std, slug  # noqa: E402
from experiment_grid import Grid, common_flags, grid_parser  # noqa: E402

BASELINE = "utterance-only"
ARMS = {BASELINE: None, "KD": BASELINE, "KD + transfer": BASELINE, "label smoothing 0.1": BASELINE,
        "self-distillation": BASELINE, "KD 4-layer": "KD", "KD 3-layer": "KD"}
"""Arm -> the arm it is paired with (same seeds)."""


def arms(teacher_outputs: list[str], self_teacher: str | None = None) -> dict[str, list[str]]:
    """Arm -> flags; ``teacher_outputs``: files instead of ``meld-cpu``'s own (empty: its own); ``self_teacher``:
    a MiniLM-L6 teacher's outputs file (the self-distillation arm needs one)."""
    base = ["--config", "meld-plain-baseline"]
    kd = ["--config", "meld-cpu", *(["--teacher-outputs", *teacher_outputs] if teacher_outputs else [])]
    plan = {BASELINE: base, "KD": kd, "KD + transfer": [*kd, "--transfer", "emorynlp"],
            "label smoothing 0.1": [*base, "--label-smoothing", "0.1"],
            "KD 4-layer": [*kd, "--student-layers", "4"], "KD 3-layer": [*kd, "--student-layers", "3"]}
    if self_teacher:
        plan["self-distillation"] = ["--config", "meld-cpu", "--teacher-outputs", self_teacher]
    return plan


def main() -> None:
    p = grid_parser(__doc__, "runs/distill-cpu", [0, 1, 2, 3, 4])
    p.add_argument("--teacher-outputs", nargs="+", default=[], help="the ensemble's files (default: meld-cpu's)")
    p.add_argument("--self-teacher-outputs", default=None, help="a MiniLM-L6 teacher's outputs (self-distillation)")
    p.add_argument("--arms", nargs="+", default=[a for a in ARMS if a != "self-distillation"], choices=list(ARMS),
                   help="only these arms")
    p.add_argument("--summarize-only", action="store_true")
    args, passthrough = p.parse_known_args()
    args.threads = max(args.threads, 2) if args.jobs == 1 else args.threads
    out = args.out.resolve()
    if "self-distillation" in args.arms and not args.self_teacher_outputs:
        p.error("the self-distillation arm needs --self-teacher-outputs (a MiniLM-L6 teacher's outputs file)")
    self_teacher = str(Path(args.self_teacher_outputs).resolve()) if args.self_teacher_outputs else None
    plan = {a: f for a, f in arms([str(Path(t).resolve()) for t in args.teacher_outputs], self_teacher).items()
            if a in args.arms}
    t0 = time.perf_counter()
    if not args.summarize_only:
        grid = Grid(out, common_flags(args, passthrough, 500), args.jobs, args.threads)
        for seed in args.seeds:  # seed-major: a stopped grid still has whole pairs
            for arm, flags in plan.items():
                run = out / "runs" / f"{slug(arm)}-s{seed}"
                if not (run / "metrics.json").is_file():
                    grid.add(f"{slug(arm)}-s{seed}", ["evaluate", *flags, "--seed", str(seed), "--out", str(run)])
        deadline = t0 + (args.deadline or float("inf"))
        while grid.step(deadline):
            time.sleep(2)
    print(summarize(out, plan, args))


def summarize(out: Path, plan: dict[str, list[str]], args) -> str:
    runs: dict[str, dict[str, dict]] = {}
    for arm in [*plan, *(ARMS[a] for a in plan if ARMS[a] and ARMS[a] not in plan)]:  # + references run before
        runs[arm] = {}
        for seed in args.seeds:
            f = out / "runs" / f"{slug(arm)}-s{seed}" / "metrics.json"
            scores = _scores(json.loads(f.read_text())) if f.is_file() else None
            if scores:
                runs[arm][str(seed)] = scores
    teacher = None
    for arm in plan:  # the ensemble's row, as any KD run scored it
        f = next((out / "runs").glob(f"{slug(arm)}-s*/metrics.json"), None) if arm.startswith("KD") else None
        if f is not None:
            teacher = _scores(json.loads(f.read_text()), "teacher")
            break
    pairs = []
    for arm in plan:
        ref = ARMS[arm]
        common = sorted(set(runs[arm]) & set(runs.get(ref, {})), key=int) if ref else []
        if common:
            pairs.append({"arm": arm, "baseline": ref, "seeds": common,
                          "test_diffs": [runs[arm][s]["test_wf1"] - runs[ref][s]["test_wf1"] for s in common],
                          "dev_diffs": [runs[arm][s]["dev_wf1"] - runs[ref][s]["dev_wf1"] for s in common]})
    from erc_distill.machine import machine_info, machine_summary

    teacher_files = args.teacher_outputs or ["meld-cpu's"]
    result = {"date": date.today().isoformat(), "machine": machine_summary(machine_info()), "host": platform.node(),
              "arms": plan, "teacher_outputs": teacher_files, "teacher": teacher, "students": runs, "paired": pairs}
    (out / "cpu_grid.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Utterance-only students on MELD: does the teacher pay? ({result['date']})", "",
             f"Machine: {result['machine']}. MiniLM-L6 on the utterance alone, 3 epochs, batch 16, best dev "
             f"checkpoint (`--config meld-plain-baseline` / `meld-cpu`); teacher: "
             f"{', '.join(Path(t).name for t in teacher_files)}"
             + (f" (test wF1 {teacher['test_wf1']:.2f}, dev {teacher['dev_wf1']:.2f})" if teacher else "") + ".", "",
             "| arm | seeds | test wF1 | dev wF1 | test macro F1 | per seed (test) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for arm, r in runs.items():
        if r:
            col = lambda k: mean_std([x[k] for x in r.values()])  # noqa: E731
            per_seed = ", ".join(f"{x['test_wf1']:.2f}" for x in r.values())
            lines.append(f"| {arm} | {len(r)} | {col('test_wf1')} | {col('dev_wf1')} | {col('test_macro_f1')} | "
                         f"{per_seed} |")
    lines += ["", "Paired differences, each arm against its reference (same seeds, points):", "",
              "| arm − reference | seeds | test | dev | per seed (test) |", "| --- | --- | --- | --- | --- |"]
    for pr in pairs:
        lines.append(f"| {pr['arm']} − {pr['baseline']} | {len(pr['seeds'])} | {mean_std(pr['test_diffs'])} | "
                     f"{mean_std(pr['dev_diffs'])} | {', '.join(f'{d:+.2f}' for d in pr['test_diffs'])} |")
    text = "\n".join(lines) + "\n"
    (out / "cpu_grid.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
