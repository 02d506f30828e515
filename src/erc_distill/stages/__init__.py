"""The pipeline: stages as modules, run in order by :func:`run_pipeline`.

    teacher -> cache -> distill -> evaluate -> export -> quantize -> profile -> report

Each stage is a :class:`~erc_distill.stages.base.Stage` (key, needs, run) in its own module; the
runner (:mod:`~erc_distill.stages.runner`) skips a stage whose key and artifacts are unchanged and
keeps ``runs/NAME/manifest.json`` (:mod:`~erc_distill.stages.manifest`). A new stage (audio,
fusion, several teachers) is a new module added to :data:`PIPELINE`.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from erc_distill.config import STAGES, RunConfig, to_plain
from erc_distill.errors import ConfigError
from erc_distill.stages.base import RunContext, Stage, StageResult, default_cache_dir, stage_key
from erc_distill.stages.cache import CacheStage
from erc_distill.stages.distill import DistillStage
from erc_distill.stages.evaluate import EvaluateStage, evaluate_split
from erc_distill.stages.export import ExportStage
from erc_distill.stages.manifest import Manifest
from erc_distill.stages.profile import ProfileStage
from erc_distill.stages.quantize import QuantizeStage
from erc_distill.stages.report import ReportStage
from erc_distill.stages.runner import run_stages
from erc_distill.stages.teacher import TeacherStage

PIPELINE: tuple[Stage, ...] = (TeacherStage(), CacheStage(), DistillStage(), EvaluateStage(), ExportStage(),
                               QuantizeStage(), ProfileStage(), ReportStage())
assert tuple(s.name for s in PIPELINE) == STAGES


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("erc-distill", "torch", "transformers", "lightning", "torchmetrics", "tokenizers", "onnxruntime",
                 "nncf", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_machine(cfg: RunConfig) -> None:
    """Settings this machine cannot run, said before anything starts (a GPU run without a GPU)."""
    for name in ("teacher_train", "student_train"):
        accelerator = getattr(cfg, name).accelerator
        if accelerator in ("gpu", "cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"{accelerator} asked for, but torch sees no CUDA GPU on this machine "
                                  f"(torch {torch.__version__}); use --accelerator cpu or auto", field="--accelerator")


def resolve_precision(cfg: RunConfig, log: Callable[[str], None] = print) -> RunConfig:
    """``precision: auto`` -> what this machine runs natively (bf16-mixed or 32-true), said once."""
    from erc_distill.machine import resolve_precision as resolve

    out = cfg
    for name in ("teacher_train", "student_train"):
        train = getattr(cfg, name)
        precision, reason = resolve(train.precision, train.accelerator)
        if precision != train.precision or reason.startswith("warning"):
            log(f"{name.replace('_', ' ')} precision {precision}: {reason}")
        out = replace(out, **{name: replace(train, precision=precision)})
    return out


def resolve_model(name: str, modality: str) -> None:
    """OSError naming what to install or download unless the encoder ``name`` can be had here."""
    if modality == "audio":
        from erc_distill.audio.encoders import TINY_AUDIO_PRESETS, resolve_audio_encoder

        if name not in TINY_AUDIO_PRESETS:
            resolve_audio_encoder(name)
    else:
        from erc_distill.modeling import TINY_PRESETS
        from erc_distill.pretrained import resolve_pretrained

        if name not in TINY_PRESETS:
            resolve_pretrained(name)


def open_run(cfg: RunConfig, out: str | Path, cache_dir: str | Path | None = None, *,
             log: Callable[[str], None] = print, progress: bool = True, fetch: bool = True) -> RunContext:
    """The run's context: precision resolved, the corpus present (fetched when it can be) and fingerprinted,
    the manifest loaded (paths mapped if the folders moved) with this config, versions and machine."""
    from erc_distill.data import corpus_fingerprint
    from erc_distill.data.fetch import ensure_corpus
    from erc_distill.machine import machine_info

    check_machine(cfg)
    cfg = resolve_precision(cfg, log)
    from erc_distill.config import teacher_configs

    subs = [sub for _, sub in teacher_configs(cfg)] if cfg.ensemble else []
    for sub in subs:  # an entry may ask for a GPU of its own
        check_machine(sub)
    teachers = [sub.teacher for sub in subs]
    for name in (cfg.teacher if cfg.trains_teacher else None, *teachers, cfg.student):
        if name is not None:  # found before hours of teacher training, not after
            resolve_model(name, cfg.modality)
    ensure_corpus(cfg.data, cfg.data_dir, fetch=fetch, log=log)
    if "emorynlp" in cfg.transfer:
        ensure_corpus("emorynlp", cfg.data_dir, fetch=fetch, log=log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = default_cache_dir(cache_dir)
    if cache.exists() and not cache.is_dir():
        raise ConfigError(f"{cache} is a file, not a cache folder", field="--cache-dir")
    manifest = Manifest(out / "manifest.json")
    if manifest.note:
        log(manifest.note)
    manifest.relocate({"run": out, "cache": cache})
    fingerprint = corpus_fingerprint(cfg.data, cfg.data_dir)
    manifest.data.update(config=to_plain(cfg), data={"corpus": cfg.data, "fingerprint": fingerprint},
                         versions=package_versions(), machine=machine_info())
    return RunContext(cfg, out, cache, manifest, fingerprint, log, progress)


def run_pipeline(ctx: RunContext, stages: Iterable[str] = STAGES, force: Iterable[str] = ()) -> None:
    """Run ``stages`` (names, in pipeline order) of the run; ``force``: rerun these even if up to date."""
    wanted = set(stages)
    run_stages(ctx, [s for s in PIPELINE if s.name in wanted], force, known=PIPELINE)


__all__ = ["PIPELINE", "RunContext", "Stage", "StageResult", "Manifest", "open_run", "run_pipeline", "stage_key",
           "evaluate_split", "package_versions"]
