"""The accuracy-vs-speed report of a run: ``report.md``, ``report.html`` and PNG plots.

Every number comes from the run's ``metrics.json`` (test metrics per variant) and its
``profile_<variant>.json`` files (latency on the device profile); nothing is recomputed here.
A variant is on the Pareto front when no other variant has both a higher test weighted F1 and a
lower p99 latency.

Under the table: the machine each variant was timed on (CPU model, cores, ISA: speed-ups differ by ISA,
so a number must carry its machine; older profile JSONs without one read "not recorded"), p99 per
input-length bucket (the profile's ``sequence_lengths``), and the variant to deploy on the profile: the
most accurate one of the profile's precision within its budgets.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erc_distill.atomic import write_text

# metrics.json model name -> profile variant name
_PROFILE_NAME = {"teacher": "teacher-fp32", "student": "student-fp32"}


@dataclass(frozen=True)
class Variant:
    name: str
    test: dict[str, Any]
    profile: dict[str, Any] | None
    params: int | None
    teacher: bool = False
    """The run's teacher (one model or the ensemble KD target): "% of teacher" and speed-ups are against it."""

    @property
    def weighted_f1(self) -> float:
        return 100 * self.test["weighted_f1"]

    @property
    def p99(self) -> float | None:
        return self.profile["p99_ms"] if self.profile else None


def load_variants(run_dir: Path) -> list[Variant]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    variants = []
    for name, m in metrics.items():
        profile_file = run_dir / f"profile_{_PROFILE_NAME.get(name, name)}.json"
        profile = json.loads(profile_file.read_text()) if profile_file.is_file() else None
        shown = _PROFILE_NAME.get(name, name)
        if name == "teacher" and m.get("teachers"):  # the KD target is an ensemble (no one model to time)
            k = len(m["teachers"])
            shown = f"teacher-ensemble ({k})" if k > 1 else f"teacher ({m['teachers'][0]})"
            profile = None  # a profile_teacher-fp32.json here is an earlier single teacher's
        variants.append(Variant(shown, m["test"], profile, m.get("params"), teacher=name == "teacher"))
    fused = run_dir / "profile_student-fp32-fused.json"
    if fused.is_file() and "student" in metrics:  # the fused graph: the student's function (parity-checked)
        m = metrics["student"]
        variants.append(Variant("student-fp32-fused", m["test"], json.loads(fused.read_text()), m.get("params")))
    return variants


def pareto_front(variants: list[Variant]) -> set[str]:
    timed = [v for v in variants if v.p99 is not None]
    return {v.name for v in timed
            if not any(o.weighted_f1 >= v.weighted_f1 and o.p99 <= v.p99 and
                       (o.weighted_f1 > v.weighted_f1 or o.p99 < v.p99) for o in timed)}


def _rows(variants: list[Variant], front: set[str]) -> list[list[str]]:
    teacher = next((v for v in variants if v.teacher), None)
    audio = any((v.profile or {}).get("mean_seconds") is not None for v in variants)
    rows = [["variant", "test wF1", "macro F1", "acc", "% of teacher", "p50 ms", "p99 ms",
             "clips/s" if audio else "turns/s",
             "speed-up vs teacher", "MB", "params", "budget", "Pareto"]]
    for v in sorted(variants, key=lambda v: (v.p99 is None, -(v.p99 or 0))):
        p = v.profile or {}
        rows.append([
            v.name, f"{v.weighted_f1:.2f}", f"{100 * v.test['macro_f1']:.2f}", f"{100 * v.test['accuracy']:.2f}",
            f"{100 * v.weighted_f1 / teacher.weighted_f1:.1f}" if teacher and teacher.weighted_f1 > 0 else "–",
            f"{p['p50_ms']:.2f}" if p else "–", f"{p['p99_ms']:.2f}" if p else "–",
            f"{p['turns_per_s']:.0f}" if p else "–",
            f"{teacher.p99 / v.p99:.1f}x" if teacher and teacher.p99 and v.p99 else "–",
            f"{p['model_size_mb']:.1f}" if p else "–",
            _count(v.params),
            ("PASS" if p["verdict"]["pass"] else "FAIL") if p else "not profiled",
            "yes" if v.name in front else "",
        ])
    return rows


def machine_lines(variants: list[Variant]) -> list[str]:
    """Which machine timed which variants: one line per distinct machine."""
    from erc_distill.machine import machine_summary

    groups: dict[str, list[str]] = {}
    for v in variants:
        if v.profile:
            groups.setdefault(machine_summary(v.profile.get("machine")), []).append(v.name)
    if len(groups) == 1:
        return [f"machine (all variants): {next(iter(groups))}"]
    return [f"machine for {', '.join(names)}: {m}" for m, names in groups.items()]


def length_rows(variants: list[Variant]) -> list[list[str]]:
    """p99 ms per input-length bucket (rows: variants; empty when no profile has buckets)."""
    timed = [v for v in variants if v.profile and v.profile.get("by_length")]
    if not timed:
        return []
    unit = lambda b: f"{b['tokens']} tokens" if "tokens" in b else f"{b['seconds']} s"  # noqa: E731 (audio: clip length)
    labels = list(dict.fromkeys(unit(b) for v in timed for b in v.profile["by_length"]))
    rows = [["variant", *[f"p99 ms, {label}" for label in labels]]]
    for v in timed:
        cells = {unit(b): b for b in v.profile["by_length"]}
        rows.append([v.name, *[f"{cells[l]['p99_ms']:.2f} ({cells[l]['calls']})"
                               if l in cells and cells[l]["p99_ms"] is not None else "–" for l in labels]])
    return rows


def deploy_line(variants: list[Variant]) -> str | None:
    """The variant to deploy: the most accurate of the profile's precision that passes its budgets."""
    from erc_distill.profiles.spec import variant_precision

    timed = [v for v in variants if v.profile and "profile_precision" in v.profile.get("verdict", {})]
    if not timed:
        return None  # profile JSONs from before profiles carried their precision
    p = timed[0].profile
    want = p["verdict"]["profile_precision"]
    fits = [v for v in timed if v.profile["verdict"]["pass"]
            and v.profile.get("precision", variant_precision(v.name)) == want]
    where = f"{p['profile']} ({want}, batch {p.get('batch', 1)})"
    if not fits:
        return f"deploy on {where}: no {want} variant meets the budgets"
    best = max(fits, key=lambda v: v.weighted_f1)
    return (f"deploy on {where}: {best.name}, the most accurate {want} variant within the budgets "
            f"(test wF1 {best.weighted_f1:.2f}, p99 {best.p99:.2f} ms)")


def _count(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.0f}K"


def _place_labels(ax, points: list[tuple[str, float, float]]) -> list[str]:
    """Number each point (a short label placed where it overlaps no other label and no point: the
    nearest free offset, else further out with a leader line) and return the key lines ``n  name``.
    Names sit in the key beside the plot, so close points never print over each other."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for _, x, y in points]
    taken = []  # label boxes already placed, in pixels
    steps = [(5, 4), (5, -11), (-5, 4), (-5, -11), (0, 9), (0, -16)]
    candidates = steps + [(dx * k, dy * k) for k in (2, 3, 4) for dx, dy in steps]
    key: list[tuple[int, str, float, float]] = []
    for number, (name, x, y) in enumerate(points, start=1):
        for dx, dy in candidates:
            text = ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               fontweight="bold", ha="left" if dx >= 0 else "right",
                               arrowprops=None if (abs(dx), abs(dy)) in {(abs(a), abs(b)) for a, b in steps}
                               else {"arrowstyle": "-", "color": "0.5", "lw": 0.6})
            box = text.get_window_extent(renderer)
            clash = any(box.overlaps(b) for b in taken) or any(
                box.x0 - 6 < px < box.x1 + 6 and box.y0 - 6 < py < box.y1 + 6 for px, py in dots)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if not clash and inside:
                break
            text.remove()
        else:  # nowhere free: beside its point anyway
            text = ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8,
                               fontweight="bold")
            box = text.get_window_extent(renderer)
        taken.append(box)
        key.append((number, name, x, y))
    width = max(len(name) for _, name, _, _ in key)
    return [f"{'':>2} {'variant':<{width}} {'p99 ms':>7} {'wF1':>6}"] + [
        f"{n:>2} {name:<{width}} {x:>7.1f} {y:>6.2f}" for n, name, x, y in key]


def _plots(variants: list[Variant], front: set[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    files = []
    timed = [v for v in variants if v.p99 is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(9.6, 4.2))
        for v in timed:
            ax.scatter(v.p99, v.weighted_f1, s=60, zorder=3, color="tab:red" if v.name in front else "tab:blue")
        edge = sorted((v for v in timed if v.name in front), key=lambda v: v.p99)
        ax.plot([v.p99 for v in edge], [v.weighted_f1 for v in edge], color="tab:red", lw=1, ls="--", label="Pareto front")
        profile = timed[0].profile
        budget_ms = profile["verdict"].get("p99_budget_ms")
        if budget_ms:
            ax.axvline(budget_ms, color="gray", ls=":", label=f"p99 budget {budget_ms:g} ms")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"p99 latency per turn, ms (log scale; profile {profile['profile']})")
        ax.set_ylabel("test weighted F1")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout(rect=(0, 0, 0.6, 1))
        key = _place_labels(ax, [(v.name, v.p99, v.weighted_f1) for v in sorted(timed, key=lambda v: v.p99)])
        fig.text(0.61, 0.92, "\n".join(key), va="top", ha="left", fontsize=7.5, family="monospace")
        fig.savefig(out / "f1_vs_latency.png", dpi=120)
        plt.close(fig)
        files.append("f1_vs_latency.png")
    labels = list(variants[0].test["labels"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ax.bar(np.arange(len(labels)) + i * width, [100 * v.test["per_class"][l] for l in labels], width, label=v.name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    ax.set_ylabel("test F1 per class")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "per_class_f1.png", dpi=120)
    plt.close(fig)
    files.append("per_class_f1.png")
    best = max((v for v in variants if v.name.startswith("student")), key=lambda v: v.weighted_f1, default=variants[0])
    cm = np.array(best.test["confusion"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{best.name}: test confusion (row-normalised colour)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)
    files.append("confusion.png")
    return files


def _md_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0]), *["| " + " | ".join(r) + " |" for r in rows[1:]]]


def _html_table(rows: list[list[str]]) -> str:
    return "<table>" + "".join(
        "<tr>" + "".join(f"<{'th' if k == 0 else 'td'}>{html.escape(c)}</{'th' if k == 0 else 'td'}>" for c in r) + "</tr>"
        for k, r in enumerate(rows)) + "</table>"


def write_report(run_dir: str | Path) -> dict[str, str]:
    """Write report.md, report.html and the PNGs into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    variants = load_variants(run_dir)
    if not variants:
        raise ValueError(f"{run_dir / 'metrics.json'} holds no models")
    front = pareto_front(variants)
    rows = _rows(variants, front)
    images = _plots(variants, front, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    profile = next((v.profile for v in variants if v.profile), None)
    title = f"erc-distill report: {run_dir.name}"
    facts = [f"data: {manifest.get('config', {}).get('data', '?')} (test split)",
             f"device profile: {profile['profile']} ({profile['backend']}, {profile['threads']} threads, "
             f"batch {profile.get('batch', 1)})" if profile else "device profile: not profiled",
             f"objective: {manifest.get('stages', {}).get('distill', {}).get('objective', '?')}"]
    under = machine_lines(variants)
    deploy = deploy_line(variants)
    under += [deploy] if deploy else []
    by_length = length_rows(variants)
    md = [f"# {title}", "", *[f"- {f}" for f in facts], "", *_md_table(rows), "", *[f"- {u}" for u in under]]
    if by_length:
        md += ["", "p99 latency per input-length bucket (calls in the bucket):", "", *_md_table(by_length)]
    md += ["", *[f"![{i}]({i})" for i in images], "",
           "Numbers from metrics.json and profile_*.json of this run; budget = the profile's p99 and memory budgets."]
    if any(v.profile is None for v in variants):
        md.append("A variant marked 'not profiled' was scored but not timed: e.g. an INT8 method that the quantize "
                  "stage rejected (its checks are in manifest.json and bundle/model-int8-<method>.json).")
    write_text(run_dir / "report.md", "\n".join(md) + "\n")
    table = _html_table(rows) + f"<ul>{''.join(f'<li>{html.escape(u)}</li>' for u in under)}</ul>"
    if by_length:
        table += "<p>p99 latency per input-length bucket (calls in the bucket):</p>" + _html_table(by_length)
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}</style>"
            f"<h1>{html.escape(title)}</h1><ul>{''.join(f'<li>{html.escape(f)}</li>' for f in facts)}</ul>{table}"
            + "".join(f"<p><img src='{i}' alt='{i}'></p>" for i in images))
    write_text(run_dir / "report.html", page)
    return {"report_md": str(run_dir / "report.md"), "report_html": str(run_dir / "report.html"),
            **{Path(i).stem: str(run_dir / i) for i in images}}
