"""``profile``: per-turn latency of every variant on the device profile, each in a fresh process
(honest peak RSS), by ``erc-distill profile``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from erc_distill.atomic import sha256_file
from erc_distill.errors import ExportError
from erc_distill.stages.base import RunContext, Stage, StageResult, stage_key


def _relative(folder: Path, root: Path) -> str:
    folder = folder.resolve()
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)


class ProfileStage(Stage):
    name = "profile"
    needs = ("export", "quantize")

    def _variants(self, ctx: RunContext) -> dict[str, tuple[Path, str | None]]:
        export = ctx.manifest.record("export")["artifacts"]
        bundle = Path(export["bundle"])
        variants: dict[str, tuple[Path, str | None]] = {"student-fp32": (bundle, None)}
        if "fused" in export:
            variants["student-fp32-fused"] = (bundle, Path(export["fused"]).name)
        if ctx.cfg.quantize.methods and "quantize" in ctx.manifest.stages:
            for method, path in ctx.manifest.record("quantize").get("artifacts", {}).items():
                variants[f"student-int8-{method}"] = (Path(path).parent, Path(path).name)
        if ctx.cfg.trains_teacher and "teacher" in ctx.manifest.stages:
            variants["teacher-fp32"] = (ctx.out / "teacher_bundle", None)
        return variants

    def key(self, ctx: RunContext) -> str:
        from erc_distill.profiles import load_profile

        p = ctx.cfg.profile
        device = load_profile(p.device)
        upstream = [ctx.manifest.record(s)["key"] for s in ("export", "quantize") if s in ctx.manifest.stages]
        # where each variant lives, relative to the run folder (the same folder spelled another way, or
        # moved, is the same run); the graphs themselves are in the upstream keys
        root = ctx.out.resolve()
        where = {name: [_relative(folder, root), graph] for name, (folder, graph) in self._variants(ctx).items()}
        return stage_key(device, p.turns, p.warmup, where, upstream, ctx.data_fingerprint)

    def run(self, ctx: RunContext) -> StageResult:
        p = ctx.cfg.profile
        variants = self._variants(ctx)
        if "teacher-fp32" in variants:
            self._teacher_bundle(ctx)
        artifacts = {}
        for name, (bundle, model_file) in variants.items():
            out = ctx.out / f"profile_{name}.json"
            cmd = [sys.executable, "-m", "erc_distill.cli", "profile", "--bundle", str(bundle), "--profile", p.device,
                   "--data", ctx.cfg.data, "--warmup", str(p.warmup), "--json", str(out)]
            cmd += ["--model-file", model_file] if model_file else []
            cmd += ["--turns", str(p.turns)] if p.turns else []
            cmd += ["--data-dir", ctx.cfg.data_dir] if ctx.cfg.data_dir else []
            if ctx.cfg.modality == "audio":
                cmd += ["--max-seconds", str(ctx.cfg.media.max_seconds)]
                cmd += ["--media-dir", ctx.cfg.media.dir] if ctx.cfg.media.dir else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise ExportError(f"profiling {name} failed:\n{done.stderr[-2000:]}")
            ctx.log(f"{name:>24}: " + done.stdout.strip().splitlines()[1].strip())
            artifacts[name] = out
        return StageResult(artifacts, {"profile": p.device})

    def _teacher_bundle(self, ctx: RunContext) -> None:
        """The teacher as a bundle, for its latency (made once; random weights when they are elsewhere)."""
        from erc_distill.modeling import saved_weights_present

        folder = ctx.manifest.artifact("teacher", "model")
        target = ctx.out / "teacher_bundle"
        made = (target / "bundle.json").is_file() and (target / ".teacher.sha256").is_file()
        source = sha256_file(folder / "head.safetensors") if (folder / "head.safetensors").is_file() else "none"
        if made and (target / ".teacher.sha256").read_text() == source:
            return
        weights = saved_weights_present(folder)
        if not weights:  # e.g. trained on a GPU machine, run folder copied here without the teacher
            ctx.log("teacher weights are not on this machine: timing its architecture, randomly initialised from "
                    "its saved config (latency does not depend on the weights)")
        model, tok = ctx.modality.load(folder, weights)
        ctx.modality.write_bundle(ctx, model.eval(), tok, target,
                                  provenance={"teacher": str(folder), "weights": "trained" if weights else "random"})
        (target / ".teacher.sha256").write_text(source)
