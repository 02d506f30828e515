"""The loop that runs stages: skip what is up to date, run the rest, keep the manifest.

    for stage in stages:
        reason = manifest.verify(stage.name, key)      # key unchanged, status done, artifacts intact?
        if reason is None and stage not in force: skip
        else: record "running" -> stage.run(ctx) -> hash artifacts -> record "done"

A failing stage is recorded as ``failed`` with its error (what earlier stages made stays), and the
error propagates. Every manifest write is atomic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from erc_distill.atomic import sha256_tree
from erc_distill.errors import ConfigError
from erc_distill.stages.base import RunContext, Stage


def run_stages(ctx: RunContext, stages: Sequence[Stage], force: Iterable[str] = (),
               known: Sequence[Stage] = ()) -> None:
    """Run or skip ``stages`` in order; ``known``: every stage of the pipeline, to check ``needs`` against."""
    force = set(force)
    by_name = {s.name: s for s in (*known, *stages)}
    ctx.manifest.save()
    for stage in stages:
        if not stage.applies(ctx):
            continue
        for need in stage.needs:  # e.g. --start-at past a stage that never finished
            upstream = by_name.get(need)
            if upstream is not None and upstream.applies(ctx) and \
                    ctx.manifest.stages.get(need, {}).get("status") != "done":
                raise ConfigError(f"stage {stage.name} needs {need}, which has not finished in {ctx.out} "
                                  "(run the earlier stages, or start at one that has its inputs)")
        key = stage.key(ctx)
        reason = "--force" if stage.name in force else ctx.manifest.verify(stage.name, key) or stage.intact(ctx)
        if reason is None:
            ctx.log(f"[{stage.name}] up to date (key {key}), skipped")
            continue
        ctx.log(f"[{stage.name}] running (key {key}; {reason})")
        before = ctx.manifest.stages.get(stage.name) or {}
        ctx.manifest.stages[stage.name] = {"key": key, "status": "running"}
        ctx.manifest.save()
        start = time.perf_counter()
        try:
            result = stage.run(ctx)
        except BaseException as err:  # recorded; what the stage had before stays readable
            ctx.manifest.stages[stage.name] = {**before, "key": key, "status": "failed",
                                               "error": f"{type(err).__name__}: {err}"[:2000]}
            ctx.manifest.save()
            raise
        artifacts = {name: str(path) for name, path in result.artifacts.items()}
        hashes = {name: sha256_tree(path) for name, path in result.artifacts.items() if name not in result.unhashed}
        record = {"key": key, "status": "done", "wall_s": round(time.perf_counter() - start, 1),
                  "artifacts": artifacts, "hashes": hashes, **result.info}
        ctx.manifest.stages[stage.name] = record
        ctx.manifest.save()
        ctx.log(f"[{stage.name}] done in {record['wall_s']:.0f} s")
