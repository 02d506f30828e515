"""The run: teacher -> cache -> distill -> evaluate, each stage skipped when its inputs did not change.

A run folder ``runs/NAME/`` holds ``manifest.json`` (config, package versions, per-stage key, wall
time and artifacts), ``metrics.json`` (per model, per split) and ``predictions_<model>_<split>.csv``.
The teacher and its output cache are content-addressed in the cache folder (``--cache-dir``,
``$ERC_DISTILL_CACHE`` or ``~/.cache/erc-distill``), so runs that share a teacher (e.g. student
seeds) train and cache it once. Every training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from erc_distill.data.context import ContextBuilder, ContextConfig, context_preset
from erc_distill.data.corpora import get_corpus
from erc_distill.data.datamodule import ErcDataModule
from erc_distill.data.paths import user_cache_dir
from erc_distill.distill.module import predict
from erc_distill.distill.objective import LossConfig, build_objective
from erc_distill.distill.train import TrainConfig, train_model
from erc_distill.modeling import PromptedClassifier, load_encoder, prepare_for_context
from erc_distill.report.metrics import compute_metrics
from erc_distill.config import STAGES

CACHE_ENV = "ERC_DISTILL_CACHE"


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Stage keys hash the parts each stage reads."""

    teacher: str | None = "mpnet-base"
    student: str = "minilm-l6"
    data: str = "meld"
    data_dir: str | None = None
    teacher_context: ContextConfig = field(default_factory=ContextConfig)
    student_context: ContextConfig = field(default_factory=ContextConfig)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3))
    teacher_loss: LossConfig = field(default_factory=LossConfig)
    student_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3))
    loss: LossConfig = field(default_factory=lambda: LossConfig(weights={"ce": 1.0, "dist": 1.0, "feature": 0.5}))
    limit: int | None = None
    """Use only the first ``limit`` dialogues of each split (``--quick``)."""
    hidden_layers: tuple[int, ...] = ()
    """Teacher layers cached at the mask position (for the ``hidden`` loss)."""

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and self.loss.needs_teacher


_NOT_IN_KEY = {"accelerator", "devices", "strategy", "checkpoint_every_n_steps", "eval_batch_size", "data_dir"}


def _key(*parts: Any) -> str:
    """Stable hash of config parts (settings that cannot change results are left out)."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in sorted(x.items()) if k not in _NOT_IN_KEY}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    blob = json.dumps([clean(asdict(p) if hasattr(p, "__dataclass_fields__") else p) for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _artifact_ok(path: Path) -> bool:
    """An artifact a finished stage can be trusted with: present, and a saved model holds its weights."""
    if (path / "erc_model.json").is_file():
        return PromptedClassifier.has_weights(path)
    return path.exists()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("erc-distill", "torch", "transformers", "lightning", "torchmetrics", "tokenizers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Run:
    """A run folder and its manifest; :meth:`stage` runs or skips one stage."""

    def __init__(self, cfg: RunConfig, out: str | Path, cache_dir: str | Path | None = None,
                 progress: bool = True, log: Callable[[str], None] = print, device_profile: str = "cpu-2core",
                 quantize_methods: Sequence[str] = ("ort-dynamic", "ort-static", "nncf-ptq"),
                 qat_epochs: int = 1) -> None:
        self.cfg = cfg
        self.qat_epochs = qat_epochs
        self.device_profile = device_profile
        self.quantize_methods = tuple(quantize_methods)
        self.out = Path(out)
        self.cache_dir = Path(cache_dir or os.environ.get(CACHE_ENV) or user_cache_dir())
        self.progress = progress
        self.log = log
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.out / "manifest.json"
        self.manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {"stages": {}}
        self._relocate()
        self.manifest.update(config=asdict(cfg), versions=package_versions(), machine=_machine(),
                             paths={"run": str(self.out.resolve()), "cache": str(self.cache_dir.resolve())})
        self.labels = get_corpus(cfg.data).labels

    def _relocate(self) -> None:
        """A run folder (and cache folder) copied or moved elsewhere keeps working: artifact paths under the
        run and cache folders the manifest was written in are mapped to the ones this run uses."""
        before = self.manifest.get("paths", {})
        moves = [(before.get(k), str(now.resolve())) for k, now in (("run", self.out), ("cache", self.cache_dir))]
        moves = [(old, new) for old, new in moves if old and old != new]
        if not moves:
            return
        for record in self.manifest["stages"].values():
            for name, path in record.get("artifacts", {}).items():
                for old, new in moves:
                    if path == old or path.startswith(old.rstrip("/") + "/"):
                        record["artifacts"][name] = new + path[len(old.rstrip("/")):]
                        break

    # -- bookkeeping ---------------------------------------------------------------------------------
    def save_manifest(self) -> None:
        tmp = self.manifest_path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, default=str))
        os.replace(tmp, self.manifest_path)

    def stage(self, name: str, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        record = self.manifest["stages"].get(name)
        if record and record.get("key") == key and record.get("status") == "done" and all(
            _artifact_ok(Path(p)) for p in record.get("artifacts", {}).values()
        ):
            self.log(f"[{name}] up to date (key {key}), skipped")
            return record
        self.log(f"[{name}] running (key {key})")
        self.manifest["stages"][name] = {"key": key, "status": "running"}
        self.save_manifest()
        start = time.perf_counter()
        try:
            result = fn()
        except BaseException as err:  # the failed attempt is recorded; what the stage had before stays readable
            self.manifest["stages"][name] = {**(record or {}), "key": key, "status": "failed",
                                             "error": f"{type(err).__name__}: {err}"[:2000]}
            self.save_manifest()
            raise
        record = {"key": key, "status": "done", "wall_s": round(time.perf_counter() - start, 1), **result}
        self.manifest["stages"][name] = record
        self.save_manifest()
        self.log(f"[{name}] done in {record['wall_s']:.0f} s")
        return record

    def _datamodule(self, tokenizer: Any, context: ContextConfig, train: TrainConfig, teacher=None) -> ErcDataModule:
        return ErcDataModule(self.cfg.data, ContextBuilder(tokenizer, context), self.cfg.data_dir,
                             batch_size=train.batch_size, eval_batch_size=train.eval_batch_size,
                             seed=train.seed, limit=self.cfg.limit, teacher=teacher)

    def _student_objective(self, model: PromptedClassifier, tok: Any) -> tuple[ErcDataModule, Any]:
        """The student's data (joined to the teacher cache when the loss needs it) and its objective."""
        from erc_distill.distill.cache import TeacherCache

        c = self.cfg
        teacher = TeacherCache(self.manifest["stages"]["cache"]["artifacts"]["cache"]) if c.uses_teacher else None
        dm = self._datamodule(tok, c.student_context, c.student_train, teacher)
        teacher_dim = teacher.arrays["train"]["features"].shape[1] if teacher else None
        objective = build_objective(c.loss, len(self.labels), model.hidden_size, teacher_dim,
                                    self._class_counts(dm), model.num_layers)
        return dm, objective

    def _class_counts(self, dm: ErcDataModule) -> torch.Tensor:
        counts = Counter(e.label for e in dm.examples_of("train") if e.label >= 0)
        return torch.tensor([counts.get(i, 0) for i in range(len(self.labels))])

    # -- stages ---------------------------------------------------------------------------------------
    @property
    def infer_device(self) -> str:
        """Where the cache and evaluate stages run their forward passes: the training accelerator's GPU, if any."""
        wants_gpu = self.cfg.student_train.accelerator in ("gpu", "cuda", "auto")
        return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"

    @property
    def teacher_key(self) -> str:
        c = self.cfg
        return _key(c.teacher, c.data, c.teacher_context, c.teacher_train, c.teacher_loss.key(), c.limit)

    @property
    def teacher_dir(self) -> Path:
        return self.cache_dir / "teachers" / f"{self.cfg.data}-{Path(str(self.cfg.teacher)).name}-{self.teacher_key}"

    def run_teacher(self) -> dict[str, Any]:
        def fit() -> dict[str, Any]:
            folder = self.teacher_dir
            if (folder / "model" / "erc_model.json").is_file():
                if not PromptedClassifier.has_weights(folder / "model"):
                    raise RuntimeError(f"{folder / 'model'} holds the teacher's configs but not its weights (they stayed "
                                       "on the machine that trained it): copy its model/ folder here, delete "
                                       f"{folder} to retrain, or use --start-at to continue a copied run")
                result = json.loads((folder / "result.json").read_text())
                result["artifacts"] = {"model": str(folder / "model")}  # where it is now (the cache may have moved)
                return result
            c = self.cfg
            torch.manual_seed(c.teacher_train.seed)  # the head's initialisation follows the seed too
            model, tok = load_encoder(c.teacher, self.labels)
            prepare_for_context(model, tok, c.teacher_context)
            dm = self._datamodule(tok, c.teacher_context, c.teacher_train)
            objective = build_objective(c.teacher_loss, len(self.labels), model.hidden_size,
                                        class_counts=self._class_counts(dm))
            self.log(f"teacher {c.teacher}: {_params(model) / 1e6:.1f}M params; {objective}")
            result = train_model(model, objective, dm, c.teacher_train, folder / "train", self.progress)
            model.save(folder / "model", tok)
            out = {"artifacts": {"model": str(folder / "model")}, "train": asdict(result), "params": _params(model)}
            (folder / "result.json").write_text(json.dumps(out, indent=2))
            return out

        return self.stage("teacher", self.teacher_key, fit)

    def run_cache(self) -> dict[str, Any]:
        from erc_distill.distill.cache import CacheKey, build_cache, weights_hash

        model_dir = Path(self.manifest["stages"]["teacher"]["artifacts"]["model"])
        layers = self.cfg.hidden_layers
        if not layers and "hidden" in self.cfg.loss.weights:  # default: the teacher's top n layers
            depth = json.loads((model_dir / "encoder" / "config.json").read_text())["num_hidden_layers"]
            layers = tuple(range(depth - self.cfg.loss.hidden_layers + 1, depth + 1))
        key = CacheKey(weights_hash(model_dir), self.cfg.data, ("train", "dev"),
                       self.cfg.teacher_context.fingerprint(), str(self.cfg.teacher), layers, self.cfg.limit)
        stage_key = _key(key)
        folder = self.cache_dir / "teacher-cache" / stage_key

        def compute() -> dict[str, Any]:
            from transformers import AutoTokenizer

            model = PromptedClassifier.load(model_dir)
            tok = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
            dm = self._datamodule(tok, self.cfg.teacher_context, self.cfg.teacher_train)
            cache = build_cache(model, dm, folder, key, device=self.infer_device, progress=self.progress)
            return {"artifacts": {"cache": str(folder)}, "rows": len(cache)}

        return self.stage("cache", stage_key, compute)

    def run_distill(self) -> dict[str, Any]:
        c = self.cfg
        cache_dir = self.manifest["stages"]["cache"]["artifacts"]["cache"] if c.uses_teacher else None
        key = _key(c.student, c.data, c.student_context, c.student_train, c.loss.key(), c.limit,
                   self.manifest["stages"]["cache"]["key"] if cache_dir else None)

        def fit() -> dict[str, Any]:
            torch.manual_seed(c.student_train.seed)
            model, tok = load_encoder(c.student, self.labels)
            prepare_for_context(model, tok, c.student_context)
            dm, objective = self._student_objective(model, tok)
            self.log(f"student {c.student}: {_params(model) / 1e6:.1f}M params; {objective}")
            train_dir = self.out / "student" / f"train-{key}"
            for stale in (self.out / "student").glob("train-*"):
                if stale != train_dir:  # checkpoints of another config must not be resumed
                    shutil.rmtree(stale)
            result = train_model(model, objective, dm, c.student_train, train_dir, self.progress)
            model.save(self.out / "student" / "model", tok)
            return {"artifacts": {"model": str(self.out / "student" / "model")}, "train": asdict(result),
                    "params": _params(model), "objective": str(objective)}

        return self.stage("distill", key, fit)

    def run_evaluate(self) -> dict[str, Any]:
        models = {"student": self.manifest["stages"]["distill"]["artifacts"]["model"]}
        if "teacher" in self.manifest["stages"] and self.cfg.teacher is not None:
            models = {"teacher": self.manifest["stages"]["teacher"]["artifacts"]["model"], **models}
        key = _key([self.manifest["stages"][m if m == "teacher" else "distill"]["key"] for m in models])

        def evaluate() -> dict[str, Any]:
            from transformers import AutoTokenizer

            metrics: dict[str, Any] = {}
            artifacts = {"metrics": str(self.out / "metrics.json")}
            for name, folder in models.items():
                model = PromptedClassifier.load(folder)
                tok = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer")
                context = self.cfg.teacher_context if name == "teacher" else self.cfg.student_context
                train = self.cfg.teacher_train if name == "teacher" else self.cfg.student_train
                dm = self._datamodule(tok, context, train)
                metrics[name] = {"params": _params(model)}
                for split in ("dev", "test"):
                    path = self.out / f"predictions_{name}_{split}.csv"
                    m = evaluate_split(model, dm, split, path, self.infer_device)
                    metrics[name][split] = m
                    artifacts[f"predictions_{name}_{split}"] = str(path)
                    self.log(f"{name:>8} {split:<5} weighted F1 {100 * m['weighted_f1']:.2f}  "
                             f"macro F1 {100 * m['macro_f1']:.2f}  accuracy {100 * m['accuracy']:.2f}")
            tmp = self.out / ".metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            os.replace(tmp, self.out / "metrics.json")
            return {"artifacts": artifacts}

        return self.stage("evaluate", key, evaluate)

    def run_export(self) -> dict[str, Any]:
        """The student as an inference bundle (float ONNX), checked against PyTorch on dev."""
        record = self.manifest["stages"]["distill"]
        key = _key(record["key"], "bundle-v2")

        def export() -> dict[str, Any]:
            from transformers import AutoTokenizer

            from erc_distill.export.bundle import write_bundle
            from erc_distill.export.onnx_export import check_float_parity, fuse_transformer

            folder = Path(record["artifacts"]["model"])
            model = PromptedClassifier.load(folder).eval()
            tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
            bundle = write_bundle(model, tok, self.cfg.student_context, self.out / "bundle",
                                  provenance={"run": str(self.out), "distill_key": record["key"]})
            dm = self._datamodule(tok, self.cfg.student_context, self.cfg.student_train)
            parity = check_float_parity(model, bundle / "model.onnx", dm.eval_dataloader("dev"))
            self.log(f"bundle {bundle}: ONNX vs PyTorch on dev: {parity}")
            out = {"artifacts": {"bundle": str(bundle)}, "parity": asdict(parity)}
            fused = fuse_transformer(bundle / "model.onnx", bundle / "model-fused.onnx", model)
            if fused:  # the fused kernels compute the same function: held to the same parity
                fused_parity = check_float_parity(model, bundle / "model-fused.onnx", dm.eval_dataloader("dev"))
                self.log(f"fused graph ({', '.join(f'{v} {k}' for k, v in fused.items())}) vs PyTorch: {fused_parity}")
                out.update(fused=fused, fused_parity=asdict(fused_parity))
                out["artifacts"]["fused"] = str(bundle / "model-fused.onnx")
            else:
                self.log("no transformer fusion for this encoder: the INT8 graphs start from the plain graph")
            return out

        return self.stage("export", key, export)

    def run_quantize(self, methods: Sequence[str], budget_points: float | None = None, calibration_turns: int = 256,
                     min_agreement: float | None = None) -> dict[str, Any]:
        """INT8 graphs of the bundle's float graph, each checked on dev against the float graph.

        Defaults: the run's budget (1.0 dev weighted-F1 points, 99 % argmax agreement); ``--quick`` runs
        train on a slice where a few turns move these numbers, so they only report them.
        """
        quick = self.cfg.limit is not None
        if budget_points is None:
            budget_points = 100.0 if quick else 1.0
        if min_agreement is None:
            min_agreement = 0.0 if quick else 0.99
        if quick:
            self.log("quick run: INT8 checks report the F1 drop and agreement without failing on them")
        record = self.manifest["stages"]["export"]
        key = _key(record["key"], sorted(methods), budget_points, calibration_turns, min_agreement,
                   self.qat_epochs if "nncf-qat" in methods else None)

        def run() -> dict[str, Any]:
            from transformers import AutoTokenizer

            from erc_distill.errors import ExportError
            from erc_distill.export.quantize import (RECIPE_VERSION, QuantCheck, check_failures, check_int8,
                                                     ort_predictions, quantize)

            bundle = Path(record["artifacts"]["bundle"])
            model_dir = Path(self.manifest["stages"]["distill"]["artifacts"]["model"])
            tok = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
            dm = self._datamodule(tok, self.cfg.student_context, replace(self.cfg.student_train, eval_batch_size=8))
            train = list(dm.eval_dataloader("train"))
            step = max(1, len(train) // max(1, calibration_turns // 8))
            calibration = train[::step][: max(1, calibration_turns // 8)]  # spread over the length range
            dev = list(dm.eval_dataloader("dev"))
            float_pred, gold = ort_predictions(bundle / "model.onnx", dev)  # once, for every method
            artifacts, checks, metrics, results = {}, {}, {}, []
            fused = self.manifest["stages"]["export"]["artifacts"].get("fused")
            for method in methods:
                path, sidecar = bundle / f"model-int8-{method}.onnx", bundle / f"model-int8-{method}.json"
                method_key = _key(record["key"], method, calibration_turns, RECIPE_VERSION,
                                  self.qat_epochs if method == "nncf-qat" else None)
                done = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
                if done.get("key") == method_key and path.is_file():  # made by an earlier, interrupted attempt
                    self.log(f"{method:>12}: reused ({path.name}, key {method_key})")
                    artifacts[method], checks[method] = str(path), done["check"]
                    metrics[f"student-int8-{method}"] = done["metrics"]
                    results.append(QuantCheck(**{k: v for k, v in done["check"].items() if k != "drop_points"}))
                    continue
                reference = None
                if method == "nncf-qat":
                    path, reference = self._qat(path, calibration, method_key, tok, dev)
                else:  # dynamic INT8 starts from the fused graph (QAttention); the others from the plain one
                    source = Path(fused) if method == "ort-dynamic" and fused else bundle / "model.onnx"
                    path = quantize(method, source, path, calibration)
                int8_pred, _ = ort_predictions(path, dev)
                check = check_int8(method, float_pred, int8_pred, gold, self.labels,
                                   round(path.stat().st_size / 2**20, 2), reference)
                self.log(f"{method:>12}: dev weighted F1 {100 * check.int8_dev_weighted_f1:.2f} "
                         f"(float {100 * check.float_dev_weighted_f1:.2f}), agreement with float "
                         f"{100 * check.argmax_agreement:.2f}%"
                         + ("" if reference is None else f", with its PyTorch model {100 * check.export_agreement:.2f}%")
                         + f", {check.size_mb:.1f} MB")
                artifacts[method] = str(path)
                results.append(check)
                checks[method] = {**asdict(check), "drop_points": check.drop_points}
                test_pred, test_gold = ort_predictions(path, dm.eval_dataloader("test"))
                metrics[f"student-int8-{method}"] = {
                    "params": self.manifest["stages"]["distill"].get("params"), "file": str(path),
                    "dev": self._scores(int8_pred, gold), "test": self._scores(test_pred, test_gold)}
                sidecar.write_text(json.dumps({"key": method_key, "check": checks[method],
                                               "metrics": metrics[f"student-int8-{method}"]}, indent=2))
            self._merge_metrics(metrics)
            failures = check_failures(results, budget_points, min_agreement)
            if failures:  # every method was measured first, so the error shows all of them
                raise ExportError("INT8 checks failed (--budget / --quantize-methods to change):\n  "
                                  + "\n  ".join(failures))
            return {"artifacts": artifacts, "checks": checks}

        return self.stage("quantize", key, run)

    def _qat(self, onnx_path: Path, calibration: list, key: str, tok: Any, dev: list) -> tuple[Path, Any]:
        """NNCF quantization-aware fine-tuning of the distilled student with the distill objective."""
        from erc_distill.export.qat import quantize_aware_train

        c = self.cfg
        torch.manual_seed(c.student_train.seed)
        model = PromptedClassifier.load(self.manifest["stages"]["distill"]["artifacts"]["model"])
        dm, objective = self._student_objective(model, tok)
        train = replace(c.student_train, epochs=self.qat_epochs,
                        optim=replace(c.student_train.optim, lr=c.student_train.optim.lr / 5))
        self.log(f"nncf-qat: {self.qat_epochs} epoch(s) of {objective} at lr {train.optim.lr:g}")
        _, reference = quantize_aware_train(model, objective, dm, calibration, train, self.out / "qat" / f"train-{key}",
                                            onnx_path, tok.pad_token_id or 0, self.progress, reference_batches=dev)
        return onnx_path, reference

    def _scores(self, pred: Any, gold: Any) -> dict[str, Any]:
        """metrics.json's per-split entry from predicted and gold class indices (unlabelled turns left out)."""
        keep = gold >= 0
        return compute_metrics(pred[keep], gold[keep], self.labels).to_dict()

    def _merge_metrics(self, extra: dict[str, Any]) -> None:
        path = self.out / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        metrics.update(extra)
        tmp = self.out / ".metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, path)

    def run_profile(self, profile: str, turns: int | None = None, warmup: int = 20) -> dict[str, Any]:
        """Latency of every variant on the profile's device, each in a fresh process (honest peak RSS)."""
        import subprocess
        import sys

        export = self.manifest["stages"]["export"]["artifacts"]
        variants = {"student-fp32": (Path(export["bundle"]), None)}
        if "fused" in export:
            variants["student-fp32-fused"] = (Path(export["bundle"]), Path(export["fused"]).name)
        for method, path in self.manifest["stages"].get("quantize", {}).get("artifacts", {}).items():
            variants[f"student-int8-{method}"] = (Path(path).parent, Path(path).name)
        if "teacher" in self.manifest["stages"] and self.cfg.teacher is not None:
            variants["teacher-fp32"] = (self.out / "teacher_bundle", None)
        key = _key(profile, turns, warmup, {k: str(v) for k, v in variants.items()},
                   [self.manifest["stages"][s]["key"] for s in ("export", "quantize") if s in self.manifest["stages"]])

        def run() -> dict[str, Any]:
            from transformers import AutoTokenizer

            from erc_distill.export.bundle import write_bundle

            if "teacher-fp32" in variants and not (self.out / "teacher_bundle" / "bundle.json").is_file():
                folder = Path(self.manifest["stages"]["teacher"]["artifacts"]["model"])
                weights = PromptedClassifier.has_weights(folder)
                if not weights:  # e.g. trained on a GPU machine, run folder copied here without the teacher
                    self.log("teacher weights are not on this machine: timing its architecture, randomly "
                             "initialised from its saved config (latency does not depend on the weights)")
                write_bundle(PromptedClassifier.load(folder, weights=weights).eval(),
                             AutoTokenizer.from_pretrained(folder / "tokenizer"), self.cfg.teacher_context,
                             self.out / "teacher_bundle",
                             provenance={"teacher": str(folder), "weights": "trained" if weights else "random"})
            artifacts = {}
            for name, (bundle, model_file) in variants.items():
                out = self.out / f"profile_{name}.json"
                cmd = [sys.executable, "-m", "erc_distill.cli", "profile", "--bundle", str(bundle), "--profile", profile,
                       "--data", self.cfg.data, "--warmup", str(warmup), "--json", str(out)]
                cmd += ["--model-file", model_file] if model_file else []
                cmd += ["--turns", str(turns)] if turns else []
                cmd += ["--data-dir", self.cfg.data_dir] if self.cfg.data_dir else []
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"profiling {name} failed:\n{done.stderr[-2000:]}")
                self.log(f"{name:>24}: " + done.stdout.strip().splitlines()[1].strip())
                artifacts[name] = str(out)
            return {"artifacts": artifacts, "profile": profile}

        return self.stage("profile", key, run)

    def run(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        self.save_manifest()
        if self.cfg.uses_teacher:
            if "teacher" in stages:
                self.run_teacher()
            if "cache" in stages:
                self.run_cache()
        if "distill" in stages:
            self.run_distill()
        if "evaluate" in stages:
            self.run_evaluate()
        if "export" in stages:
            self.run_export()
        if "quantize" in stages:
            self.run_quantize(self.quantize_methods)
        if "profile" in stages:  # quick runs time 300 turns a variant, full runs the whole test split
            self.run_profile(self.device_profile, turns=300 if self.cfg.limit is not None else None)
        if "report" in stages:
            self.run_report()
        return self.manifest

    def run_report(self) -> dict[str, Any]:
        from erc_distill.report.accuracy_speed import write_report

        keys = [self.manifest["stages"][s]["key"] for s in ("evaluate", "quantize", "profile") if s in self.manifest["stages"]]
        # and the very files it reads: a profile measured again under the same key must show in the report
        inputs = [self.out / "metrics.json", *sorted(self.out.glob("profile_*.json"))]
        keys.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in inputs if p.is_file()})

        def report() -> dict[str, Any]:
            artifacts = write_report(self.out)
            self.log(f"report: {artifacts['report_md']}")
            return {"artifacts": artifacts}

        return self.stage("report", _key(keys, "report-v1"), report)


def evaluate_split(model: PromptedClassifier, dm: ErcDataModule, split: str, csv_path: Path,
                   device: str = "cpu") -> dict[str, Any]:
    """Predict ``split``, write ``example_id,dialogue_id,turn,speaker,gold,pred,p_<label>...`` and score it."""
    ids, logits, _, _ = predict(model, dm.eval_dataloader(split), device)
    probs = logits.softmax(-1)
    by_id = {e.example_id: e for e in dm.examples_of(split)}
    labels = model.labels
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["example_id", "dialogue_id", "turn", "speaker", "gold", "pred", *(f"p_{l}" for l in labels)])
        for eid, p in zip(ids, probs.tolist()):
            e = by_id[eid]
            pred = max(range(len(p)), key=p.__getitem__)
            w.writerow([eid, e.dialogue_id, e.turn_id, e.speaker, labels[e.label] if e.label >= 0 else "",
                        labels[pred], *(f"{x:.6f}" for x in p)])
    os.replace(tmp, csv_path)
    gold = torch.tensor([by_id[i].label for i in ids])
    keep = gold >= 0
    return compute_metrics(probs.argmax(-1)[keep], gold[keep], labels).to_dict()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def quick(cfg: RunConfig) -> RunConfig:
    """A few minutes end to end: 30 dialogues per split, one short epoch each, max_len 128."""
    short = lambda t: replace(t, epochs=1, checkpoint_every_n_steps=20)  # noqa: E731
    return replace(
        cfg, limit=30,
        teacher_context=replace(cfg.teacher_context, max_len=min(cfg.teacher_context.max_len, 128)),
        student_context=replace(cfg.student_context, max_len=min(cfg.student_context.max_len, 128)),
        teacher_train=short(cfg.teacher_train), student_train=short(cfg.student_train),
    )


__all__ = ["RunConfig", "Run", "STAGES", "context_preset", "quick", "evaluate_split"]
