"""``cache``: the teacher's logits and mask-position features for train and dev, memory-mapped,
content-addressed by the teacher's weights, the data, the context and the tokenizer."""

from __future__ import annotations

import shutil

from erc_distill.errors import ConfigError
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
        if "hidden" in ctx.cfg.loss.weights or layers:
            depth = ctx.modality.depth(model_dir)
            n = ctx.cfg.loss.hidden_layers
            if not layers:  # default: the teacher's top n layers
                if not 1 <= n <= depth:
                    raise ConfigError(f"{n} layers to match, but the teacher has {depth}", field="--loss.hidden-layers")
                layers = tuple(range(depth - n + 1, depth + 1))
            if any(not 0 <= i <= depth for i in layers):
                raise ConfigError(f"teacher layers {list(layers)}: the teacher has 0..{depth} (0: embeddings)",
                                  field="--hidden-layers")
            if "hidden" in ctx.cfg.loss.weights and len(layers) != n:
                raise ConfigError(f"{len(layers)} cached teacher layers for {n} student layers "
                                  "(--loss.hidden-layers)", field="--hidden-layers")
        return CacheKey(weights_hash(model_dir), ctx.cfg.data, ("train", "dev"),
                        ctx.modality.input_key(ctx, model_dir, "teacher"),
                        str(ctx.cfg.teacher), layers, ctx.cfg.limit, ctx.data_fingerprint)

    def key(self, ctx: RunContext) -> str:
        return stage_key(self._cache_key(ctx))

    def run(self, ctx: RunContext) -> StageResult:
        from erc_distill.distill.cache import build_cache

        key = self._cache_key(ctx)
        folder = ctx.cache_dir / "teacher-cache" / stage_key(key)
        model, tok = ctx.modality.load(ctx.manifest.artifact("teacher", "model"))
        dm = ctx.modality.datamodule(ctx, model, tok, "teacher")
        try:
            cache = build_cache(model, dm, folder, key, device=ctx.infer_device, progress=ctx.progress)
            cache.check()
        except (ValueError, OSError) as err:  # a damaged cache folder (truncated or overwritten arrays)
            ctx.log(f"teacher cache {folder} is damaged ({err}); computing it again")
            shutil.rmtree(folder, ignore_errors=True)
            cache = build_cache(model, dm, folder, key, device=ctx.infer_device, progress=ctx.progress)
            cache.check()
        return StageResult({"cache": folder}, {"rows": len(cache)})
