"""Distillation that pays (issue #10): several teachers, their ensemble, a teacher-labelled transfer set,
patient KD, controls and smaller students, over seeds, with paired differences. One command, made for
one GPU (all jobs share it), resumable, with a deadline.

1. Teachers (``erc-distill teacher-outputs``): mpnet-base with the SPCL prompt (seeds 0, 1), with the
   TelME layout, utterance-only, and a MiniLM-L6 teacher (the self-distillation control) on MELD; one
   mpnet-base on EmoryNLP. Each labels its corpus's train / dev / test and (MELD) the transfer set
   (EmoryNLP scenes that do not overlap MELD dev / test, speaker-masked and shortened MELD train
   dialogues) and writes ``OUT/teachers/NAME.npz`` (logits, fp16) + ``.json``.
2. Students (MiniLM-L6, ``--seeds``, every arm the same epoch budget with early stopping on dev):
   the utterance-only fine-tune and CE-only with context (no teacher), label smoothing (a control
   that needs no teacher), distilled from the mpnet ensemble with the EmoryNLP transfer scenes (the
   main arm), without a transfer set, with all three transfer sources, from one mpnet teacher, from
   the MiniLM teacher (self-distillation), and 4- / 3-layer students (the 6-layer student's lowest
   layers); EmoryNLP: utterance-only, CE-only, distilled.
3. ``OUT/grid.json`` and ``OUT/grid.md``: each teacher and the ensembles (dev / test), mean ± std per
   arm, and paired differences (same seeds) against both baselines.

The teachers wait for ``--models-ready FILE`` when given (on a lent GPU the pretrained encoders
arrive in pieces while the baselines already train); ``OUT/STOP`` (or ``--deadline`` seconds) stops
the remaining jobs and writes the summary from what finished.

    python bench/distill_grid.py --out runs/distill-grid --accelerator gpu --jobs 16       # one GPU
    python bench/distill_grid.py --out /tmp/g --teacher tiny --student tiny --seeds 1 2 \\
        --data-dir tests-data --summarize-only                                             # tables only

Every ``erc-distill`` run is content-addressed in ``--cache-dir``, so a rerun skips what finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from experiment_grid import Grid, common_flags, grid_parser  # noqa: E402  (what both grids share)

PATIENT = ["--epochs", "8", "--patience", "3", "--batch-size", "32", "--val-check-interval", "0.5"]
TRANSFER = ["emorynlp", "mask", "short"]
"""What the teachers label (every source); the main arm trains on ``emorynlp`` alone (1.7x MELD train, where
all three make 3.2x), one control arm on all three."""
KD_LOSS = "ce=1,kd=1"

#: MELD teachers: flags on top of ``--config meld-mpnet-minilm`` (its teacher recipe: 4 epochs, lr 2e-5,
#: layer decay 0.9, SPCL prompt, max_len 256).
MELD_TEACHERS: dict[str, list[str]] = {
    "mpnet-spcl-s0": ["--teacher-train.seed", "0"],
    "mpnet-spcl-s1": ["--teacher-train.seed", "1"],
    "mpnet-telme": ["--teacher-context", "telme"],
    "mpnet-utterance": ["--teacher-context", "utterance", "--teacher-max-len", "128"],
    "minilm-spcl": ["--teacher", "minilm-l6", "--teacher-lr", "5e-5", "--teacher-layer-decay", "1.0"],
}
EMORY_TEACHERS: dict[str, list[str]] = {
    "emory-mpnet-spcl-s0": ["--teacher-train.seed", "0"],
}
MPNET_ENSEMBLE = ["mpnet-spcl-s0", "mpnet-spcl-s1", "mpnet-telme", "mpnet-utterance"]


def student_arms(teachers: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """arm -> (flags, teachers it waits for, how many seeds: 'all' or 'few'); MELD then EmoryNLP."""

    def outputs(*names: str) -> list[str]:
        return ["--teacher-outputs", *(str(teachers / f"{n}.npz") for n in names)]

    ens = ["--config", "meld-mpnet-minilm", *outputs(*MPNET_ENSEMBLE), "--loss", KD_LOSS]
    one = ["--config", "meld-mpnet-minilm", "--loss", KD_LOSS, "--transfer", "emorynlp"]
    return {
        "utterance-only": (["--config", "meld-plain-baseline"], [], "all"),
        "ce-only": (["--config", "meld-ce-baseline"], [], "all"),
        MAIN: ([*ens, "--transfer", "emorynlp"], MPNET_ENSEMBLE, "all"),
        f"{MAIN} 4L": ([*ens, "--transfer", "emorynlp", "--student-layers", "4"], MPNET_ENSEMBLE, "all"),
        "ensemble": (ens, MPNET_ENSEMBLE, "few"),
        "ensemble+all transfer": ([*ens, "--transfer", *TRANSFER], MPNET_ENSEMBLE, "few"),
        "one teacher+emorynlp": ([*one, *outputs("mpnet-spcl-s0")], ["mpnet-spcl-s0"], "few"),
        "self-distilled+emorynlp": ([*one, *outputs("minilm-spcl")], ["minilm-spcl"], "few"),
        "label smoothing 0.1": (["--config", "meld-ce-baseline", "--label-smoothing", "0.1"], [], "few"),
        f"{MAIN} 3L": ([*ens, "--transfer", "emorynlp", "--student-layers", "3"], MPNET_ENSEMBLE, "few"),
        "emorynlp utterance-only": (["--config", "emorynlp-mpnet-minilm", "--teacher", "none", "--loss", "ce=1",
                                     "--context", "plain", "--max-len", "128"], [], "few"),
        "emorynlp ce-only": (["--config", "emorynlp-mpnet-minilm", "--teacher", "none", "--loss", "ce=1"], [], "few"),
        "emorynlp distilled": (["--config", "emorynlp-mpnet-minilm", *outputs(*EMORY_TEACHERS), "--loss", KD_LOSS],
                               list(EMORY_TEACHERS), "few"),
    }


MAIN = "ensemble+emorynlp"
"""The main distilled arm: the mpnet ensemble's KD on MELD train + the EmoryNLP transfer scenes."""
BASELINES = ("utterance-only", "ce-only")

#: Paired comparisons reported: (arm, baseline).
PAIRS = [(MAIN, "utterance-only"), (MAIN, "ce-only"), (f"{MAIN} 4L", "utterance-only"), (f"{MAIN} 4L", MAIN),
         (f"{MAIN} 3L", MAIN), (MAIN, "ensemble"), ("ensemble", "ce-only"), ("ensemble+all transfer", "ce-only"),
         ("ensemble+all transfer", MAIN), ("one teacher+emorynlp", MAIN), ("self-distilled+emorynlp", "ce-only"),
         ("label smoothing 0.1", "ce-only"), ("emorynlp distilled", "emorynlp utterance-only"),
         ("emorynlp distilled", "emorynlp ce-only")]


def slug(arm: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in arm).strip("-")


def seeds_of(kind: str, args: argparse.Namespace) -> list[int]:
    return args.seeds if kind == "all" else args.seeds[: args.few]


def add_jobs(grid: Grid, args: argparse.Namespace, models_ready: bool, added: set[str]) -> None:
    """Add the jobs that can be added now: before the encoders for the teachers are there, only the two MELD
    baselines (so slots stay free for the teachers). Priorities: teachers 0, the baselines 1, the main arm
    and its 4-layer student 2, the rest 3."""
    out, teachers = args.out, args.out / "teachers"
    if models_ready:
        for name, flags in [*MELD_TEACHERS.items(), *EMORY_TEACHERS.items()]:
            if f"T:{name}" in added:
                continue
            emory = name.startswith("emory")
            cfg = ["--config", "emorynlp-mpnet-minilm" if emory else "meld-mpnet-minilm"]
            transfer = [] if emory else ["--transfer", *TRANSFER]
            grid.add(f"T:{name}", ["teacher-outputs", *cfg, *flags, *transfer, "--out", str(out / "runs" / f"T-{name}"),
                                   "--to", str(teachers / f"{name}.npz")], priority=0)
            added.add(f"T:{name}")
    for arm, (flags, needs, kind) in student_arms(teachers).items():
        if not models_ready and arm not in BASELINES:
            continue
        for seed in seeds_of(kind, args):
            name = f"{slug(arm)}-s{seed}"
            if name in added:
                continue
            priority = 1 if arm in BASELINES else 2 if arm in (MAIN, f"{MAIN} 4L") else 3
            grid.add(name, ["evaluate", *flags, *PATIENT, "--seed", str(seed), "--out", str(out / "runs" / name)],
                     after=[f"T:{t}" for t in needs], priority=priority)
            added.add(name)
            if arm == MAIN and seed == args.seeds[0]:  # INT8 of the best arm, checked on dev
                grid.add(f"int8-{name}", ["quantize", *flags, *PATIENT, "--seed", str(seed), "--quantize-methods",
                                          "ort-dynamic", "--out", str(out / "runs" / name)], after=[name], priority=3)


def main() -> None:
    p = grid_parser(__doc__, "runs/distill-grid", [1, 2, 3, 4, 5])
    p.add_argument("--few", type=int, default=3, help="seeds of the control arms and EmoryNLP")
    p.add_argument("--models-ready", type=Path, default=None, help="start the teachers once this file exists")
    p.add_argument("--summarize-only", action="store_true", help="write grid.json / grid.md from OUT as it is")
    args, passthrough = p.parse_known_args()
    args.out = args.out.resolve()
    t0 = time.perf_counter()
    if not args.summarize_only:
        grid = Grid(args.out, common_flags(args, passthrough, 500), args.jobs, args.threads)
        deadline = t0 + (args.deadline or float("inf"))
        added: set[str] = set()
        while True:
            ready = args.models_ready is None or args.models_ready.exists()
            add_jobs(grid, args, ready, added)
            if (args.out / "STOP").exists():
                deadline = 0.0
            if not grid.step(deadline) and ready:
                break
            time.sleep(2)
        jobs = {j.name: {"rc": j.rc, "wall_s": j.wall_s} for j in grid.jobs.values()}
        (args.out / "jobs.json").write_text(json.dumps(jobs, indent=2))
    print(summarize(args, time.perf_counter() - t0))


# ----------------------------------------------------------------------------- summary

def _scores(m: dict, row: str = "student") -> dict[str, float] | None:
    r = m.get(row)
    if not r or "test" not in r:
        return None
    return {"test_wf1": 100 * r["test"]["weighted_f1"], "test_macro_f1": 100 * r["test"]["macro_f1"],
            "test_acc": 100 * r["test"]["accuracy"], "dev_wf1": 100 * r["dev"]["weighted_f1"]}


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def teacher_rows(out: Path) -> dict[str, dict]:
    """Each teacher's dev / test scores (from its outputs file's description) and the ensembles'."""
    rows: dict[str, dict] = {}
    for meta_file in sorted((out / "teachers").glob("*.json")):
        meta = json.loads(meta_file.read_text())
        m = meta.get("metrics", {})
        rows[meta_file.stem] = {"teacher": meta.get("teacher"), "params": meta.get("params"),
                                **{f"{s}_wf1": 100 * m[s]["weighted_f1"] for s in ("dev", "test") if s in m},
                                **{f"{s}_macro_f1": 100 * m[s]["macro_f1"] for s in ("dev", "test") if s in m}}
    return rows


def ensemble_rows(out: Path, data_dir: Path | None) -> dict[str, dict]:
    """The ensembles the students distil from, scored like models (τ = 1)."""
    import tempfile

    from erc_distill.data.corpora import load_corpus
    from erc_distill.distill.outputs import evaluate_outputs, read_teacher_outputs

    rows = {}
    for name, corpus, members in ((f"mpnet ensemble ({len(MPNET_ENSEMBLE)})", "meld", MPNET_ENSEMBLE),):
        files = [out / "teachers" / f"{n}.npz" for n in members]
        if not all(f.is_file() for f in files):
            continue
        outputs = [read_teacher_outputs(f) for f in files]
        row = {}
        with tempfile.TemporaryDirectory() as tmp:
            for split in ("dev", "test"):
                m = evaluate_outputs(outputs, (), load_corpus(corpus, split, data_dir), Path(tmp) / f"{split}.csv")
                row[f"{split}_wf1"], row[f"{split}_macro_f1"] = 100 * m["weighted_f1"], 100 * m["macro_f1"]
        rows[name] = row
    return rows


def summarize(args: argparse.Namespace, wall: float) -> str:
    out = args.out
    jobs_file = out / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}
    arms: dict[str, dict[str, dict]] = {}
    for arm, (_, _, kind) in student_arms(out / "teachers").items():
        runs = {}
        for seed in seeds_of(kind, args):
            f = out / "runs" / f"{slug(arm)}-s{seed}" / "metrics.json"
            if jobs.get(f"{slug(arm)}-s{seed}", {}).get("rc", 0) != 0:
                continue  # stopped or failed in this grid: its metrics (if any) are from an older attempt
            if f.is_file():
                m = json.loads(f.read_text())
                s = _scores(m)
                if s:
                    int8 = _scores(m, "student-int8-ort-dynamic")
                    runs[str(seed)] = {**s, **({"int8_test_wf1": int8["test_wf1"]} if int8 else {})}
        arms[arm] = runs
    pairs = []
    for arm, base in PAIRS:
        common = sorted(set(arms.get(arm, {})) & set(arms.get(base, {})))
        diffs = [arms[arm][s]["test_wf1"] - arms[base][s]["test_wf1"] for s in common]
        dev = [arms[arm][s]["dev_wf1"] - arms[base][s]["dev_wf1"] for s in common]
        if diffs:
            pairs.append({"arm": arm, "baseline": base, "seeds": common, "test_diffs": diffs, "dev_diffs": dev})
    teachers = teacher_rows(out)
    try:
        ensembles = ensemble_rows(out, args.data_dir)
    except Exception as err:  # the summary is still written without them
        ensembles = {"error": str(err)}
    result = {"date": date.today().isoformat(), "machine": platform.node(), "accelerator": args.accelerator,
              "wall_s": round(wall, 1), "recipe": {"student": PATIENT, "kd_loss": KD_LOSS, "transfer": TRANSFER},
              "teachers": teachers, "ensembles": ensembles, "students": arms, "paired": pairs,
              "jobs": jobs}
    (out / "grid.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Distillation grid ({result['date']}, {args.accelerator})", "",
             f"Students: MiniLM-L6, `{' '.join(PATIENT)}` (early stopping on dev weighted F1), distilled with "
             f"`--loss {KD_LOSS}` (τ 4); transfer set `{' '.join(TRANSFER)}`. Test weighted F1 unless said.", "",
             "## Teachers", "", "| teacher | dev wF1 | test wF1 | test macro F1 |", "| --- | --- | --- | --- |"]
    for name, r in {**teachers, **(ensembles if "error" not in ensembles else {})}.items():
        lines.append(f"| {name} | {r.get('dev_wf1', float('nan')):.2f} | {r.get('test_wf1', float('nan')):.2f} | "
                     f"{r.get('test_macro_f1', float('nan')):.2f} |")
    lines += ["", "## Students (mean ± std over seeds)", "",
              "| arm | seeds | test wF1 | dev wF1 | test macro F1 | INT8 test wF1 |", "| --- | --- | --- | --- | --- | --- |"]
    for arm, runs in arms.items():
        if runs:
            col = lambda k: mean_std([r[k] for r in runs.values() if k in r])  # noqa: E731
            lines.append(f"| {arm} | {len(runs)} | {col('test_wf1')} | {col('dev_wf1')} | {col('test_macro_f1')} | "
                         f"{col('int8_test_wf1')} |")
    lines += ["", "## Paired differences (same seeds; points of weighted F1)", "",
              "| arm − baseline | seeds | test | dev | per seed (test) |", "| --- | --- | --- | --- | --- |"]
    for pr in pairs:
        lines.append(f"| {pr['arm']} − {pr['baseline']} | {len(pr['seeds'])} | {mean_std(pr['test_diffs'])} | "
                     f"{mean_std(pr['dev_diffs'])} | {', '.join(f'{d:+.2f}' for d in pr['test_diffs'])} |")
    if result["jobs"]:
        lines += ["", "## Jobs", "", "| job | rc | wall s |", "| --- | --- | --- |"]
        lines += [f"| {n} | {j['rc']} | {j['wall_s']} |" for n, j in result["jobs"].items()]
    text = "\n".join(lines) + "\n"
    (out / "grid.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
