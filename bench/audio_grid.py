"""The README's speech-emotion rows: RAVDESS, Whisper-base teacher, CE-only vs distilled Whisper-tiny.

One teacher (``--config ravdess-whisper``; its seed is the recipe's), then for every ``--seeds``
seed a distilled student (the recipe's ``ce + dist + feature``) and a CE-only student
(``--teacher none --loss ce=1``), each through the whole pipeline: evaluate, ONNX export with
parity, INT8 (``--quantize-methods``, default ort-dynamic and nncf-ptq), per-clip profile on
``cpu-2core`` (decode + log-mel + model), report. Seeds are interleaved (distilled then CE-only,
seed by seed) so an early stop leaves paired seeds. Every stage is content-addressed in
``--cache-dir`` and skipped when done: a rerun continues. ``--deadline`` stops the running job
at that many seconds and still writes the summary.

Writes ``OUT/audio_grid.json`` and ``OUT/audio_grid.md``: test weighted F1, accuracy and per-class
F1 (mean ± std over seeds) of the teacher, the CE-only and the distilled student, float and INT8;
the paired distilled − CE-only difference per seed; per-clip p50 / p99 of each variant (first seed).

    python bench/audio_grid.py --out /tmp/ravdess-grid --cache-dir ~/.cache/erc-distill \\
        --data-dir ../shared/data --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_grid import Grid, mean_std  # noqa: E402  (the job runner the text grid uses)

ARMS = {"distilled": [], "ce-only": ["--teacher", "none", "--loss", "ce=1"]}


def metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def profiles(run_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(run_dir.glob("profile_*.json")):
        p = json.loads(f.read_text())
        out[f.stem.removeprefix("profile_")] = {k: p[k] for k in ("p50_ms", "p99_ms", "mean_seconds", "model_size_mb",
                                                                  "peak_rss_mb", "machine")}
    return out


def summarise(out: Path, seeds: list[int], methods: list[str]) -> dict:
    rows: dict[str, dict] = {}
    labels: list[str] = []

    def add(row: str, seed: int, m: dict) -> None:
        test = m["test"]
        r = rows.setdefault(row, {"seeds": [], "weighted_f1": [], "accuracy": [], "per_class_f1": [],
                                  "dev_weighted_f1": []})
        r["seeds"].append(seed)
        r["dev_weighted_f1"].append(100 * m["dev"]["weighted_f1"])
        r["weighted_f1"].append(100 * test["weighted_f1"])
        r["accuracy"].append(100 * test["accuracy"])
        r["per_class_f1"].append({k: 100 * v for k, v in test["per_class"].items()})
        labels[:] = labels or list(test["per_class"])

    paired: dict[str, dict[int, float]] = {}
    for seed in seeds:
        for arm in ARMS:
            m = metrics(out / f"{arm}-s{seed}")
            if arm == "distilled" and "teacher" in m and "teacher" not in rows:
                add("teacher", seed, m["teacher"])
            for variant in ("student", *(f"student-int8-{x}" for x in methods)):
                if variant in m:
                    add(f"{arm} {variant.removeprefix('student').strip('-') or 'float'}", seed, m[variant])
        for variant in ("float", *(f"int8-{x}" for x in methods)):
            a, b = (rows.get(f"{arm} {variant}", {}) for arm in ARMS)
            if seed in a.get("seeds", []) and seed in b.get("seeds", []):
                for split, key in (("", "weighted_f1"), (" (dev)", "dev_weighted_f1")):
                    d = a[key][a["seeds"].index(seed)] - b[key][b["seeds"].index(seed)]
                    paired.setdefault(variant + split, {})[seed] = round(d, 2)
    first = seeds[0]
    speed = {**{f"distilled {k}": v for k, v in profiles(out / f"distilled-s{first}").items()},
             **{f"ce-only {k}": v for k, v in profiles(out / f"ce-only-s{first}").items()}}
    return {"date": date.today().isoformat(), "seeds": seeds, "labels": labels, "rows": rows, "paired": paired,
            "speed": speed}


def markdown(summary: dict) -> str:
    labels = summary["labels"]
    lines = ["| model | seeds | test wF1 | test acc | dev wF1 | " + " | ".join(labels) + " |",
             "|---|---|---|---|---|" + "---|" * len(labels)]
    for name, r in summary["rows"].items():
        per_class = [mean_std([x[label] for x in r["per_class_f1"]]) for label in labels]
        lines.append(f"| {name} | {len(r['seeds'])} | {mean_std(r['weighted_f1'])} | {mean_std(r['accuracy'])} | "
                     f"{mean_std(r['dev_weighted_f1'])} | "
                     + " | ".join(per_class) + " |")
    lines += ["", "Distilled − CE-only, weighted F1 (points; test unless marked dev), paired by seed:", ""]
    for variant, by_seed in summary["paired"].items():
        diffs = list(by_seed.values())
        spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
        lines.append(f"- {variant}: " + ", ".join(f"seed {s} {d:+.2f}" for s, d in by_seed.items())
                     + f" -> mean {statistics.mean(diffs):+.2f}{spread}")
    if summary["speed"]:
        lines += ["", "Per clip on cpu-2core (decode + resample + log-mel + model, batch 1; first seed's runs):", "",
                  "| variant | p50 ms | p99 ms | MB | peak RSS MB |", "|---|---|---|---|---|"]
        for name, p in summary["speed"].items():
            lines.append(f"| {name} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['model_size_mb']:.1f} | "
                         f"{p['peak_rss_mb']:.0f} |")
        machine = next(iter(summary["speed"].values()))["machine"]
        lines += ["", f"Machine: {machine['cpu']['summary']}; {summary['date']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--quantize-methods", nargs="+", default=["ort-dynamic", "nncf-ptq"])
    p.add_argument("--deadline", type=float, default=None, help="seconds after which the running job is stopped")
    p.add_argument("--summary-only", action="store_true", help="only (re)write the summary of finished runs")
    args, extra = p.parse_known_args()
    common = ["--config", "ravdess-whisper", "--quantize-methods", *args.quantize_methods, *extra]
    common += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    common += ["--data-dir", str(args.data_dir)] if args.data_dir else []
    if not args.summary_only:
        grid = Grid(args.out, common, jobs=1, threads=2)
        for seed in args.seeds:  # one job at a time, in this order (a failed one does not stop the next)
            for arm, flags in ARMS.items():
                name = f"{arm}-s{seed}"
                grid.add(name, ["report", *flags, "--seed", str(seed), "--out", str(args.out / name)])
        deadline = time.perf_counter() + (args.deadline or float("inf"))
        while grid.step(deadline):
            time.sleep(5)
    summary = summarise(args.out, args.seeds, args.quantize_methods)
    (args.out / "audio_grid.json").write_text(json.dumps(summary, indent=2))
    (args.out / "audio_grid.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
