"""``teacher``: fine-tune the teacher; content-addressed in the cache folder, so runs share it.

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
        return ctx.cfg.trains_teacher

    def key(self, ctx: RunContext) -> str:
        c = ctx.cfg
        inputs = c.media if c.modality == "audio" else c.teacher_context
        return stage_key(c.teacher, c.data, ctx.data_fingerprint, inputs, c.teacher_train, c.teacher_loss.key(),
                         c.limit)

    def run(self, ctx: RunContext) -> StageResult:
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
