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
        inputs = ctx.modality.input_key(ctx, model_dir, "teacher")
        if ctx.cfg.transfer:  # the transfer turns are cached with train (keys without them stay as they were)
            inputs += f"+transfer:{ctx.transfer_set().report.fingerprint}"
        return CacheKey(weights_hash(model_dir), ctx.cfg.data, ("train", "dev"), inputs,
                        str(ctx.cfg.teacher), layers, ctx.cfg.limit, ctx.data_fingerprint)

    def key(self, ctx: RunContext) -> str:
        if ctx.cfg.ensemble:
            return stage_key(self._outputs_key(ctx))
        return stage_key(self._cache_key(ctx))

    def _outputs_key(self, ctx: RunContext) -> dict:
        from erc_distill.atomic import sha256_file

        c = ctx.cfg
        files = []
        for f in ctx.teacher_output_files():
            try:
                files.append(sha256_file(f)[:16])
            except OSError:
                from erc_distill.distill.outputs import read_teacher_outputs

                read_teacher_outputs(f)  # the ConfigError that says what is wrong with it
                raise
        transfer = ctx.transfer_set().report.fingerprint if c.transfer else None
        key = {"kind": "teacher-outputs", "files": files, "weights": list(c.teacher_weights), "tau": c.loss.tau,
               "data": ctx.data_fingerprint, "limit": c.limit, "transfer": transfer}
        if c.loss.feature_terms:  # each member's features too (from its own cache, keyed by its weights)
            key["features"] = {"terms": c.loss.feature_terms, "hidden_layers": list(c.hidden_layers),
                               "n": c.loss.hidden_layers if "hidden" in c.loss.weights else None}
        return key

    def _member_caches(self, ctx: RunContext, outputs: list) -> list:
        """Each of the run's teachers' own cache (logits, features, hidden as the loss asks): the single-teacher
        cache of that teacher, shared with any run of it; its model is loaded (or trained) for it. A member whose
        outputs file was written by other weights than its model now has (retrained since) is refused: the
        ensemble's logits and its features would come from two different teachers."""
        from erc_distill.distill.cache import TeacherCache
        from erc_distill.stages.runner import run_stages
        from erc_distill.stages.teacher import TeacherStage, members

        caches = []
        for (name, sub), out in zip(members(ctx), outputs):
            ctx.log(f"teacher {name}: its features for the feature terms ({', '.join(ctx.cfg.loss.feature_terms)})")
            try:
                run_stages(sub, [TeacherStage(), CacheStage()])
            except ConfigError as err:  # e.g. --hidden-layers past this member's depth: say which member
                raise ConfigError(err.message, field=err.field, source=f"teacher {name}") from None
            cache = TeacherCache(sub.manifest.artifact("cache", "cache"))
            made_by = out.meta.get("teacher_weights")
            if made_by and made_by != cache.key["teacher_weights"]:
                raise ConfigError(f"{out.path} was written by other weights ({made_by}) than the model it has now "
                                  f"({cache.key['teacher_weights']}; retrained since?): delete that file to label "
                                  "again", source=f"teacher {name}")
            caches.append(cache)
        return caches

    def _import_outputs(self, ctx: RunContext) -> StageResult:
        """The ensemble of teacher outputs (files given, or written by the run's teachers) at the student's τ, as
        this run's teacher cache."""
        from erc_distill.data import corpus_fingerprint
        from erc_distill.data.corpora import load_corpus
        from erc_distill.distill.cache import TeacherCache
        from erc_distill.distill.outputs import check_compatible, import_as_cache, read_teacher_outputs

        c = ctx.cfg
        outputs = [read_teacher_outputs(f) for f in ctx.teacher_output_files()]
        transfer_data = {"emorynlp": corpus_fingerprint("emorynlp", c.data_dir)} if "emorynlp" in c.transfer else {}
        check_compatible(outputs, c.data, ctx.labels, ctx.data_fingerprint, c.transfer, transfer_data, c.limit)

        def ids(split: str) -> list[str]:
            data = load_corpus(c.data, split, c.data_dir)
            dialogues = data.dialogues[: c.limit] if c.limit is not None else data.dialogues
            return [t.example_id for d in dialogues for t in d.turns]

        train = ids("train") + ([t.example_id for t in ctx.transfer_set().turns] if c.transfer else [])
        key = self._outputs_key(ctx)
        members = (lambda: self._member_caches(ctx, outputs)) if c.loss.feature_terms else None  # only when (re)made
        folder = import_as_cache(outputs, c.teacher_weights, c.loss.tau, {"train": train, "dev": ids("dev")},
                                 ctx.cache_dir / "teacher-cache" / stage_key(key), key, members)
        cache = TeacherCache(folder)
        cache.check()
        names = ", ".join(f"{o.path.stem} ({o.meta.get('teacher', '?')})" for o in outputs)
        ctx.log(f"teacher: ensemble of {len(outputs)} output file(s): {names}; KD target = weighted mean of tempered "
                f"probabilities at tau {c.loss.tau:g}" + (f"; features of each teacher side by side "
                                                          f"({'+'.join(map(str, cache.key['feature_dims']))} wide), one "
                                                          "projection each" if "feature_dims" in cache.key else ""))
        return StageResult({"cache": folder}, {"rows": len(cache), "teachers": [str(o.path) for o in outputs]})

    def run(self, ctx: RunContext) -> StageResult:
        from erc_distill.distill.cache import build_cache

        if ctx.cfg.ensemble:
            return self._import_outputs(ctx)

        key = self._cache_key(ctx)
        folder = ctx.cache_dir / "teacher-cache" / stage_key(key)
        model, tok = ctx.modality.load(ctx.manifest.artifact("teacher", "model"))
        if ctx.cfg.transfer:  # the teacher labels the student's transfer turns too
            c = ctx.cfg
            dm = ctx.datamodule(tok, c.teacher_context, c.teacher_train, transfer=True)
        else:
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

