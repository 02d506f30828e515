"""``evaluate``: score the teacher and the student on dev and test; ``metrics.json`` and prediction CSVs."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

from erc_distill.atomic import atomic_path
from erc_distill.stages.base import RunContext, Stage, StageResult, params, stage_key


def evaluate_split(model: Any, dm: Any, split: str, csv_path: Path, device: str = "cpu") -> dict[str, Any]:
    """Predict ``split``, write ``example_id,dialogue_id,turn,speaker,gold,pred,p_<label>...`` and score it."""
    import torch

    from erc_distill.distill.module import predict
    from erc_distill.report.metrics import compute_metrics

    ids, logits, _, _ = predict(model, dm.eval_dataloader(split), device)
    probs = logits.softmax(-1)
    by_id = {e.example_id: e for e in dm.examples_of(split)}
    labels = model.labels
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["example_id", "dialogue_id", "turn", "speaker", "gold", "pred", *(f"p_{l}" for l in labels)])
        for eid, p in zip(ids, probs.tolist()):
            e = by_id[eid]
            pred = max(range(len(p)), key=p.__getitem__)
            w.writerow([eid, e.dialogue_id, e.turn_id, e.speaker, labels[e.label] if e.label >= 0 else "",
                        labels[pred], *(f"{x:.6f}" for x in p)])
    gold = torch.tensor([by_id[i].label for i in ids])
    keep = gold >= 0
    return compute_metrics(probs.argmax(-1)[keep], gold[keep], labels).to_dict()


class EvaluateStage(Stage):
    name = "evaluate"
    needs = ("distill",)

    def _models(self, ctx: RunContext) -> dict[str, str]:
        models = {"student": "distill"}
        if ctx.cfg.trains_teacher and "teacher" in ctx.manifest.stages:
            models = {"teacher": "teacher", **models}
        return models

    def key(self, ctx: RunContext) -> str:
        ensemble = [ctx.manifest.record("cache")["key"]] if ctx.cfg.ensemble else []
        if ctx.cfg.ensemble and ctx.cfg.teachers:  # the members' rows carry their names
            ensemble.append([m["name"] for m in ctx.manifest.record("teacher")["members"]])
        return stage_key([ctx.manifest.record(s)["key"] for s in self._models(ctx).values()], ctx.data_fingerprint,
                         *ensemble)

    def _ensemble(self, ctx: RunContext, metrics: dict[str, Any], artifacts: dict[str, Path]) -> None:
        """The teacher ensemble scored like a model (row ``teacher``), and each of several members
        (``teacher:NAME``), from their output files: predictions CSVs and metrics.json rows."""
        from erc_distill.data.corpora import load_corpus
        from erc_distill.distill.outputs import evaluate_outputs, read_teacher_outputs

        outputs = [read_teacher_outputs(f) for f in ctx.teacher_output_files()]
        names = [m["name"] for m in ctx.manifest.record("teacher")["members"]] if ctx.cfg.teachers else \
            [o.path.stem for o in outputs]
        # (row, its teachers' names, their outputs, weights): the ensemble, and each member when there are several
        rows = [("teacher", names, outputs, ctx.cfg.teacher_weights)]
        if len(outputs) > 1:
            rows += [(f"teacher:{n}", [n], [o], ()) for n, o in zip(names, outputs)]
        splits = {}
        for split in ("dev", "test"):
            data = load_corpus(ctx.cfg.data, split, ctx.cfg.data_dir)
            if ctx.cfg.limit is not None:  # the turns the student is scored on
                data = replace(data, dialogues=data.dialogues[: ctx.cfg.limit])
            splits[split] = data
        for row, row_names, members, weights in rows:
            metrics[row] = {"params": sum(int(o.meta.get("params", 0)) for o in members), "teachers": row_names}
            what = "one member" if row != "teacher" else \
                f"ensemble of {len(outputs)} teachers" if len(outputs) > 1 else "from its outputs file"
            for split, data in splits.items():
                path = ctx.out / f"predictions_{row.replace(':', '-')}_{split}.csv"
                m = metrics[row][split] = evaluate_outputs(members, weights, data, path)
                artifacts[f"predictions_{row}_{split}"] = path
                ctx.log(f"{row:>8} {split:<5} weighted F1 {100 * m['weighted_f1']:.2f}  macro F1 "
                        f"{100 * m['macro_f1']:.2f}  accuracy {100 * m['accuracy']:.2f}  ({what})")

    def run(self, ctx: RunContext) -> StageResult:
        metrics: dict[str, Any] = {}
        artifacts: dict[str, Path] = {}
        if ctx.cfg.ensemble:
            self._ensemble(ctx, metrics, artifacts)
        for name, stage in self._models(ctx).items():
            folder = ctx.manifest.artifact(stage, "model")
            model, tok = ctx.modality.load(folder)
            dm = ctx.modality.datamodule(ctx, model, tok, name)
            metrics[name] = {"params": params(model)}
            for split in ("dev", "test"):
                path = ctx.out / f"predictions_{name}_{split}.csv"
                m = metrics[name][split] = evaluate_split(model, dm, split, path, ctx.infer_device)
                artifacts[f"predictions_{name}_{split}"] = path
                ctx.log(f"{name:>8} {split:<5} weighted F1 {100 * m['weighted_f1']:.2f}  "
                        f"macro F1 {100 * m['macro_f1']:.2f}  accuracy {100 * m['accuracy']:.2f}")
        # INT8 rows stay (the quantize stage replaces them when the student changes); members' rows are rewritten
        ctx.merge_metrics(metrics, drop=lambda row: row.startswith("teacher:"))
        return StageResult({**artifacts, "metrics": ctx.out / "metrics.json"}, unhashed=("metrics",))

    def intact(self, ctx: RunContext) -> str | None:
        models = [*self._models(ctx), *(["teacher"] if ctx.cfg.ensemble else [])]
        missing = [m for m in models if m not in ctx.read_metrics()]
        return f"metrics.json lacks {', '.join(missing)}" if missing else None
