"""``teacher``: fine-tune the teacher; content-addressed in the cache folder, so runs share it.

With ``teachers`` (several), each is its own small run in ``RUN/teachers/NAME/`` (trained, or reused from
the cache when another run made it), and labels every turn of the corpus and the transfer turns once: the file
``<cache>/teacher-outputs/<data>-<encoder>-<key>.npz`` (:mod:`erc_distill.distill.outputs`), keyed by the
teacher's stage key and the transfer set; a member whose file is there is not loaded or trained at all. The
cache stage averages their tempered probabilities.

``<cache>/teachers/<data>-<teacher>-<key>/model/`` appears in one step (built in a temporary
folder with its ``result.json``, then renamed), so a kill never leaves a teacher that later runs
would trust half-made.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from erc_distill.atomic import atomic_dir, sha256_tree
from erc_distill.errors import ConfigError
from erc_distill.stages.base import RunContext, Stage, StageResult, params, stage_key
from erc_distill.stages.modality import new_model


def teacher_dir(ctx: RunContext, key: str) -> Path:
    return ctx.cache_dir / "teachers" / f"{ctx.cfg.data}-{Path(str(ctx.cfg.teacher)).name}-{key}"


class TeacherStage(Stage):
    name = "teacher"

    def applies(self, ctx: RunContext) -> bool:
        return ctx.cfg.trains_teacher or (ctx.cfg.ensemble and bool(ctx.cfg.teachers))

    def key(self, ctx: RunContext) -> str:
        if ctx.cfg.teachers:
            return stage_key([(name, _member_file(ctx, sub)[1].name) for name, sub in members(ctx)])
        c = ctx.cfg
        inputs = c.media if c.modality == "audio" else c.teacher_context
        return stage_key(c.teacher, c.data, ctx.data_fingerprint, inputs, c.teacher_train, c.teacher_loss.key(),
                         c.limit)

    def run(self, ctx: RunContext) -> StageResult:
        if ctx.cfg.teachers:
            return self._run_members(ctx)
        return self._train(ctx)

    def _run_members(self, ctx: RunContext) -> StageResult:
        """Each of the run's teachers: trained (or reused), then its outputs written once (or reused)."""
        from erc_distill.distill.outputs import read_teacher_outputs
        from erc_distill.stages.runner import run_stages
        from erc_distill.stages.teacher_outputs import export_teacher_outputs

        artifacts, info = {}, []
        subs = members(ctx)
        for i, (name, sub) in enumerate(subs, 1):
            ctx.log(f"teacher {i}/{len(subs)}: {name} ({sub.cfg.teacher}) in {sub.out}")
            key, path = _member_file(ctx, sub)
            path.parent.mkdir(parents=True, exist_ok=True)
            outputs = None
            if path.is_file():  # its outputs are all the ensemble needs: the model is not even loaded
                try:
                    outputs = read_teacher_outputs(path)
                    ctx.log(f"teacher {name}: outputs written before, reused from {path}")
                except ConfigError as err:  # a damaged file: written again
                    ctx.log(f"teacher {name}: its outputs file is damaged ({err}); labelling again")
            if outputs is None:
                run_stages(sub, [self])  # trained, or reused from the cache
                outputs = read_teacher_outputs(export_teacher_outputs(sub, path))
            scores = outputs.meta.get("metrics", {})
            info.append({"name": name, "teacher": str(sub.cfg.teacher), "key": key,
                         "params": outputs.meta.get("params"), "run": str(sub.out),
                         **{f"{s}_weighted_f1": scores.get(s, {}).get("weighted_f1") for s in ("dev", "test")}})
            artifacts[f"outputs:{name}"] = path
        return StageResult(artifacts, {"members": info})

    def _train(self, ctx: RunContext) -> StageResult:
        import torch

        from erc_distill.distill.objective import build_objective
        from erc_distill.distill.train import train_model
        from erc_distill.modeling import saved_weights_present

        folder = teacher_dir(ctx, self.key(ctx))
        model_dir, result_file = folder / "model", folder / "model" / "result.json"
        if model_dir.is_dir():
            result = json.loads(result_file.read_text()) if result_file.is_file() else None
            recorded = (result or {}).get("files_sha256")
            if recorded and saved_weights_present(model_dir) and \
                    sha256_tree(model_dir, exclude=frozenset({"result.json"})) != recorded:
                ctx.log(f"{model_dir} changed since it was trained (a damaged copy?); training it again")
                shutil.rmtree(model_dir)
                result = None
            if result is not None:
                if not saved_weights_present(model_dir):
                    raise ConfigError(f"{model_dir} holds the teacher's configs but not its weights (they stayed on "
                                      f"the machine that trained it): copy its model/ folder here, delete {folder} "
                                      "to retrain, or use --start-at to continue a copied run")
                ctx.log(f"teacher {ctx.cfg.teacher}: trained before, reused from {model_dir}")
                return StageResult({"model": model_dir}, result)
            if model_dir.is_dir():
                ctx.log(f"{model_dir} is incomplete (no result.json: an earlier run was killed); training again")
                shutil.rmtree(model_dir)
        c = ctx.cfg
        torch.manual_seed(c.teacher_train.seed)  # the head's initialisation follows the seed too
        model, tok = new_model(ctx, c.teacher, "teacher")
        if c.teacher_train.freeze_layers > model.num_layers:
            raise ConfigError(f"{c.teacher_train.freeze_layers} layers to freeze, but {c.teacher} has "
                              f"{model.num_layers}", field="--freeze-teacher-layers")
        dm = ctx.modality.datamodule(ctx, model, tok, "teacher")
        objective = build_objective(c.teacher_loss, len(ctx.labels), model.hidden_size,
                                    class_counts=ctx.class_counts(dm))
        ctx.log(f"teacher {c.teacher}: {params(model) / 1e6:.1f}M params; {objective}")
        trained = train_model(model, objective, dm, c.teacher_train, folder / "train", ctx.progress)
        info = {"train": asdict(trained), "params": params(model)}
        with atomic_dir(model_dir) as tmp:
            ctx.modality.save(model, tok, tmp)
            info["files_sha256"] = sha256_tree(tmp)  # checked when a later run reuses this teacher
            (tmp / "result.json").write_text(json.dumps(info, indent=2))
        return StageResult({"model": model_dir}, info)


def members(ctx: RunContext) -> list[tuple[str, RunContext]]:
    """(name, its own run context) of each of the run's ``teachers``: ``RUN/teachers/NAME`` with its manifest,
    sharing the run's cache folder (so the teacher's key, and its trained model, are the single-teacher ones)."""
    from erc_distill.config import teacher_configs, to_plain
    from erc_distill.stages import resolve_precision
    from erc_distill.stages.manifest import Manifest

    out = []
    transfer = ctx.transfer_set()  # built once: the entries change teacher-side settings only
    for name, cfg in teacher_configs(ctx.cfg):
        cfg = resolve_precision(cfg, log=ctx.log_once)  # an entry may set its own (auto) precision
        folder = ctx.out / "teachers" / name
        folder.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(folder / "manifest.json")
        manifest.data.update(config=to_plain(cfg), data=ctx.manifest.data.get("data"))
        out.append((name, RunContext(cfg, folder, ctx.cache_dir, manifest, ctx.data_fingerprint, ctx.log,
                                     ctx.progress, _said=ctx._said, _transfer=transfer)))
    return out


def _member_file(ctx: RunContext, sub: RunContext) -> tuple[str, Path]:
    """A member's teacher key and its outputs file in the cache, keyed by that teacher, the transfer turns it
    labels and the slice."""
    key = TeacherStage().key(sub)
    transfer = sub.transfer_set().report.fingerprint if sub.cfg.transfer else None
    name = f"{sub.cfg.data}-{Path(str(sub.cfg.teacher)).name}-{stage_key(key, transfer, sub.cfg.limit)}.npz"
    return key, ctx.cache_dir / "teacher-outputs" / name
