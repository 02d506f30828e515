"""``quantize``: INT8 graphs of the bundle's float graph, each checked on dev against the float graph.

Every method is measured before the stage fails, so the error shows all failures with both numbers.
A method whose sidecar (``model-int8-<method>.json``) matches its key and whose graph is intact is
reused (an interrupted attempt keeps what it finished); an unreadable sidecar is recomputed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from erc_distill.atomic import sha256_file, write_json
from erc_distill.errors import ExportError
from erc_distill.stages.base import RunContext, Stage, StageResult, stage_key


def _limits(ctx: RunContext) -> tuple[float, float]:
    """(F1 budget in points, min QAT agreement): quick runs train on a slice where a few turns move
    these numbers, so by default they only report them."""
    q, quick = ctx.cfg.quantize, ctx.cfg.limit is not None
    budget = q.budget if q.budget is not None else (100.0 if quick else 1.0)
    agreement = q.min_agreement if q.min_agreement is not None else (0.0 if quick else 0.99)
    return budget, agreement


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        done = json.loads(path.read_text())
        return done if isinstance(done, dict) and {"key", "check", "metrics", "sha256"} <= set(done) else {}
    except (OSError, ValueError):
        return {}


class QuantizeStage(Stage):
    name = "quantize"
    needs = ("export",)

    def applies(self, ctx: RunContext) -> bool:
        return bool(ctx.cfg.quantize.methods)

    def key(self, ctx: RunContext) -> str:
        q = ctx.cfg.quantize
        return stage_key(ctx.manifest.record("export")["key"], sorted(q.methods), _limits(ctx), q.calibration_turns,
                         q.qat_epochs if "nncf-qat" in q.methods else None)

    def intact(self, ctx: RunContext) -> str | None:
        have = ctx.read_metrics()
        missing = [m for m in ctx.cfg.quantize.methods if f"student-int8-{m}" not in have]
        return f"metrics.json lacks {', '.join(missing)} (finished graphs are reused)" if missing else None

    def _method_key(self, ctx: RunContext, method: str) -> str:
        from erc_distill.export.quantize import RECIPE_VERSION

        q = ctx.cfg.quantize
        return stage_key(ctx.manifest.record("export")["key"], method, q.calibration_turns, RECIPE_VERSION,
                         q.qat_epochs if method == "nncf-qat" else None)

    def run(self, ctx: RunContext) -> StageResult:
        from erc_distill.export.quantize import QuantCheck, check_failures, check_int8, ort_predictions, quantize
        from erc_distill.runtime.bundle import record_bundle_file

        q = ctx.cfg.quantize
        budget, min_agreement = _limits(ctx)
        if ctx.cfg.limit is not None and q.budget is None:
            ctx.log("quick run: INT8 checks report the F1 drop and agreement without failing on them")
        export = ctx.manifest.record("export")["artifacts"]
        bundle = Path(export["bundle"])
        model, tok = ctx.modality.load(ctx.manifest.artifact("distill", "model"))
        dm = ctx.modality.datamodule(ctx, model, tok, "student")
        dm.eval_batch_size = 8
        train = list(dm.eval_dataloader("train"))
        n_batches = max(1, q.calibration_turns // 8)
        calibration = train[:: max(1, len(train) // n_batches)][:n_batches]  # spread over the length range
        dev = list(dm.eval_dataloader("dev"))
        float_pred, gold = ort_predictions(bundle / "model.onnx", dev)  # once, for every method
        artifacts: dict[str, Path] = {}
        checks: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        results = []
        for method in q.methods:
            path, sidecar = bundle / f"model-int8-{method}.onnx", bundle / f"model-int8-{method}.json"
            method_key = self._method_key(ctx, method)
            done = _read_sidecar(sidecar)
            if done.get("key") == method_key and path.is_file() and sha256_file(path) == done["sha256"]:
                ctx.log(f"{method:>12}: reused ({path.name}, key {method_key})")
                artifacts[method], checks[method] = path, done["check"]
                metrics[f"student-int8-{method}"] = done["metrics"]
                results.append(QuantCheck(**{k: v for k, v in done["check"].items() if k != "drop_points"}))
                continue
            reference = None
            if method == "nncf-qat":
                reference = self._qat(ctx, path, calibration, method_key, tok, dev)
            else:  # dynamic INT8 starts from the fused graph (QAttention); the others from the plain one
                source = Path(export["fused"]) if method == "ort-dynamic" and "fused" in export else bundle / "model.onnx"
                path = quantize(method, source, path, calibration)
            int8_pred, _ = ort_predictions(path, dev)
            check = check_int8(method, float_pred, int8_pred, gold, ctx.labels,
                               round(path.stat().st_size / 2**20, 2), reference)
            ctx.log(f"{method:>12}: dev weighted F1 {100 * check.int8_dev_weighted_f1:.2f} "
                    f"(float {100 * check.float_dev_weighted_f1:.2f}), agreement with float "
                    f"{100 * check.argmax_agreement:.2f}%"
                    + ("" if reference is None else f", with its PyTorch model {100 * check.export_agreement:.2f}%")
                    + f", {check.size_mb:.1f} MB")
            artifacts[method] = path
            results.append(check)
            checks[method] = {**asdict(check), "drop_points": check.drop_points}
            test_pred, test_gold = ort_predictions(path, dm.eval_dataloader("test"))
            metrics[f"student-int8-{method}"] = {
                "params": ctx.manifest.record("distill").get("params"), "file": str(path),
                "dev": ctx.scores(int8_pred, gold), "test": ctx.scores(test_pred, test_gold)}
            record_bundle_file(bundle, path.name)
            write_json(sidecar, {"key": method_key, "sha256": sha256_file(path), "check": checks[method],
                                 "metrics": metrics[f"student-int8-{method}"]})
        ctx.merge_metrics(metrics, drop=lambda name: name.startswith("student-int8-"))  # methods no longer asked for go
        failures = check_failures(results, budget, min_agreement)
        if failures:  # every method was measured first, so the error shows all of them
            raise ExportError("INT8 checks failed (--budget / --quantize-methods to change):\n  " + "\n  ".join(failures))
        return StageResult(artifacts, {"checks": checks})

    def _qat(self, ctx: RunContext, onnx_path: Path, calibration: list, key: str, tok: Any, dev: list) -> Any:
        """NNCF quantization-aware fine-tuning of the distilled student with the distill objective."""
        import torch

        from erc_distill.export.qat import quantize_aware_train

        c = ctx.cfg
        torch.manual_seed(c.student_train.seed)
        model, _ = ctx.modality.load(ctx.manifest.artifact("distill", "model"))
        dm, objective = ctx.student_objective(model, tok)
        train = replace(c.student_train, epochs=c.quantize.qat_epochs,
                        optim=replace(c.student_train.optim, lr=c.student_train.optim.lr / 5))
        ctx.log(f"nncf-qat: {train.epochs} epoch(s) of {objective} at lr {train.optim.lr:g}")
        _, reference = quantize_aware_train(model, objective, dm, calibration, train, ctx.out / "qat" / f"train-{key}",
                                            onnx_path, getattr(tok, "pad_token_id", None) or 0, ctx.progress, reference_batches=dev)
        return reference
