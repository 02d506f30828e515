"""One training run with Lightning: checkpoints, early stopping on dev weighted F1, resume."""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from erc_distill.data.datamodule import ErcDataModule
from erc_distill.config import TrainConfig
from erc_distill.distill.module import ErcModule
from erc_distill.errors import TrainingError
from erc_distill.distill.objective import Objective
from erc_distill.modeling import PromptedClassifier


@dataclass(frozen=True)
class TrainResult:
    best_dev_weighted_f1: float
    best_checkpoint: str
    epochs_run: int
    steps: int
    wall_s: float
    resumed_from: str | None


class ExactResume(Callback):
    """Makes a resumed fit continue exactly where the checkpoint was taken.

    Lightning restores weights, optimizer, scheduler and loop counters; this adds the rest: the train
    sampler's position in the epoch (kept up to date here, saved by :class:`ResumableLoader`) and the
    torch / numpy / Python RNG states (dropout), so resumed weights equal an uninterrupted run's.
    Lightning runs checkpoint callbacks last, so the position is current when ``last.ckpt`` is written.
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if sampler is not None and hasattr(sampler, "consumed"):
            sampler.consumed = trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()  # plain types: checkpoints load weights_only
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached": float(cached)}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._rng:  # restored from a checkpoint: continue the random streams where they were
            torch.set_rng_state(self._rng["torch"])
            n = self._rng["numpy"]
            np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
            random.setstate(self._rng["python"])
            if "cuda" in self._rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng["cuda"])
            self._rng = None


def _readable_checkpoint(path: Path) -> bool:
    """Whether a torch checkpoint (a zip archive) is whole: its directory reads and every member's CRC matches."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def check_finite(model: torch.nn.Module, where: str) -> None:
    """TrainingError naming the first parameter with a NaN or infinite value."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingError(f"{where}: parameter {name} holds non-finite values; lower the learning rate, "
                                "check the loss weights and temperatures, or use precision 32-true")


def train_model(
    model: PromptedClassifier,
    objective: Objective,
    datamodule: ErcDataModule,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
) -> TrainResult:
    """Fit ``model`` in place; on return it holds the best weights (by dev weighted F1).

    ``out_dir/checkpoints/last.ckpt`` (every ``checkpoint_every_n_steps`` and each epoch) lets a killed
    run resume where it stopped; ``out_dir/checkpoints/best.ckpt`` keeps the best weights;
    ``out_dir/log/`` holds the per-step CSV log.
    """
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a Lightning-internal deprecation
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.freeze_layers:
        model.freeze_lower(cfg.freeze_layers)
    module = ErcModule(model, objective, cfg.optim)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_weighted_f1", mode="max",
                           save_top_k=1, save_weights_only=True, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last-step", save_last=True,
                           every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=0,
                           enable_version_counter=False)
    stop = EarlyStopping(monitor="val_weighted_f1", mode="max", patience=cfg.patience)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate,
        val_check_interval=cfg.val_check_interval,
        callbacks=[ExactResume(), best, last, stop],
        logger=CSVLogger(out_dir, name="log", version=""),
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(10, len(datamodule.train_dataloader()) // 2)),
        num_sanity_val_steps=0,
        deterministic=False,
        use_distributed_sampler=False,
    )
    resume = ckpt_dir / "last.ckpt"
    if resume.is_file() and not _readable_checkpoint(resume):  # damaged (a disk full, a bad copy): start over
        resume.replace(resume.with_name("last.ckpt.broken"))
        warnings.warn(f"{resume} is damaged (moved to last.ckpt.broken); training starts from the beginning")
    resumed = str(resume) if resume.is_file() else None
    module.train()  # from_pretrained leaves modules in eval mode (dropout off)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resumed)
    wall = time.perf_counter() - start
    if trainer.interrupted:  # Lightning swallows Ctrl-C / SIGTERM: the run is not finished
        raise KeyboardInterrupt(f"training interrupted at step {trainer.global_step}; rerun to resume from {resume}")
    best_path = best.best_model_path or str(ckpt_dir / "best.ckpt")
    if Path(best_path).is_file():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    check_finite(module.model, f"training in {out_dir}")
    score = best.best_model_score
    return TrainResult(
        best_dev_weighted_f1=float(score) if score is not None else float("nan"),
        best_checkpoint=best_path,
        epochs_run=trainer.current_epoch,
        steps=trainer.global_step,
        wall_s=round(wall, 1),
        resumed_from=resumed,
    )
