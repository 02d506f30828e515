"""``distill``: train the student on the objective, joined to the teacher cache by example id."""

from __future__ import annotations

import shutil
from dataclasses import asdict

from erc_distill.atomic import atomic_dir
from erc_distill.errors import ConfigError
from erc_distill.stages.base import RunContext, Stage, StageResult, params, stage_key
from erc_distill.stages.modality import new_model


class DistillStage(Stage):
    name = "distill"
    needs = ("cache",)

    def key(self, ctx: RunContext) -> str:
        c = ctx.cfg
        cache_key = ctx.manifest.record("cache")["key"] if c.uses_teacher else None
        inputs = c.media if c.modality == "audio" else c.student_context
        transfer = [ctx.transfer_set().report.fingerprint] if c.transfer else []  # keys without it stay as they were
        return stage_key(c.student, c.data, ctx.data_fingerprint, inputs, c.student_train, c.loss.key(), c.limit,
                         cache_key, *transfer)

    def run(self, ctx: RunContext) -> StageResult:
        import torch

        from erc_distill.distill.train import train_model

        c, key = ctx.cfg, self.key(ctx)
        torch.manual_seed(c.student_train.seed)
        model, tok = new_model(ctx, c.student, "student")
        if c.student_train.freeze_layers > model.num_layers:
            raise ConfigError(f"{c.student_train.freeze_layers} layers to freeze, but {c.student} has "
                              f"{model.num_layers}", field="--student-train.freeze-layers")
        dm, objective = ctx.student_objective(model, tok)
        ctx.log(f"student {c.student}: {params(model) / 1e6:.1f}M params; {objective}")
        train_dir = ctx.out / "student" / f"train-{key}"
        for stale in (ctx.out / "student").glob("train-*"):
            if stale != train_dir:  # checkpoints of another config must not be resumed
                shutil.rmtree(stale)
        trained = train_model(model, objective, dm, c.student_train, train_dir, ctx.progress)
        with atomic_dir(ctx.out / "student" / "model") as tmp:
            ctx.modality.save(model, tok, tmp)
        return StageResult({"model": ctx.out / "student" / "model"},
                           {"train": asdict(trained), "params": params(model), "objective": str(objective)})
