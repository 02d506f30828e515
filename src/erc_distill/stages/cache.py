"""``cache``: the teacher's logits and mask-position features for train and dev, memory-mapped,
content-addressed by the teacher's weights, the data, the context and the tokenizer."""

from __future__ import annotations

import json

from erc_distill.stages.base import RunContext, Stage, StageResult, stage_key


class CacheStage(Stage):
    name = "cache"
    needs = ("teacher",)

    def applies(self, ctx: RunContext) -> bool:
        return ctx.cfg.uses_teacher

    def _cache_key(self, ctx: RunContext):
        from erc_distill.distill.cache import CacheKey, weights_hash

        model_dir = ctx.manifest.artifact("teacher", "model")
        layers = ctx.cfg.hidden_layers
        if not layers and "hidden" in ctx.cfg.loss.weights:  # default: the teacher's top n layers
            depth = json.loads((model_dir / "encoder" / "config.json").read_text())["num_hidden_layers"]
            layers = tuple(range(depth - ctx.cfg.loss.hidden_layers + 1, depth + 1))
        return CacheKey(weights_hash(model_dir), ctx.cfg.data, ("train", "dev"), ctx.cfg.teacher_context.fingerprint(),
                        str(ctx.cfg.teacher), layers, ctx.cfg.limit, ctx.data_fingerprint)

    def key(self, ctx: RunContext) -> str:
        return stage_key(self._cache_key(ctx))

    def run(self, ctx: RunContext) -> StageResult:
        from transformers import AutoTokenizer

        from erc_distill.distill.cache import build_cache
        from erc_distill.modeling import PromptedClassifier

        key = self._cache_key(ctx)
        folder = ctx.cache_dir / "teacher-cache" / stage_key(key)
        model_dir = ctx.manifest.artifact("teacher", "model")
        model = PromptedClassifier.load(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        dm = ctx.datamodule(tok, ctx.cfg.teacher_context, ctx.cfg.teacher_train)
        cache = build_cache(model, dm, folder, key, device=ctx.infer_device, progress=ctx.progress)
        return StageResult({"cache": folder}, {"rows": len(cache)})
