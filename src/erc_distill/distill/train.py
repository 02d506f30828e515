"""One training run with Lightning: checkpoints, early stopping on dev weighted F1, resume."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from erc_distill.data.datamodule import ErcDataModule
from erc_distill.distill.module import ErcModule, OptimConfig
from erc_distill.distill.objective import Objective
from erc_distill.modeling import PromptedClassifier


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. ``devices``/``strategy``/``precision``/``accelerator`` go to ``lightning.Trainer``
    unchanged (e.g. ``--devices 4 --strategy ddp --precision bf16-mixed`` on a GPU node)."""

    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    accumulate: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze_layers: int = 0
    """Freeze the embeddings and this many lowest encoder layers."""
    patience: int = 2
    seed: int = 0
    max_steps: int = -1
    val_check_interval: float = 1.0
    checkpoint_every_n_steps: int = 100
    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"


@dataclass(frozen=True)
class TrainResult:
    best_dev_weighted_f1: float
    best_checkpoint: str
    epochs_run: int
    steps: int
    wall_s: float
    resumed_from: str | None


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
        callbacks=[best, last, stop],
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
    score = best.best_model_score
    return TrainResult(
        best_dev_weighted_f1=float(score) if score is not None else float("nan"),
        best_checkpoint=best_path,
        epochs_run=trainer.current_epoch,
        steps=trainer.global_step,
        wall_s=round(wall, 1),
        resumed_from=resumed,
    )
