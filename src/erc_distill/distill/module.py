"""The LightningModule that trains a teacher or a student with an :class:`Objective`."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics.classification import MulticlassF1Score

from erc_distill.config import OptimConfig
from erc_distill.data.datamodule import Batch
from erc_distill.distill.objective import Objective
from erc_distill.modeling import ModelOutput, PromptedClassifier


class ErcModule(L.LightningModule):
    """Model + objective; logs every loss term and the dev weighted F1 (``val_weighted_f1``)."""

    def __init__(self, model: PromptedClassifier, objective: Objective, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.optim = optim or OptimConfig()
        n = len(model.labels)
        self.val_f1 = MulticlassF1Score(num_classes=n, average="weighted")

    def forward(self, batch: Batch, output_hidden_states: bool = False) -> ModelOutput:
        return self.model(*batch.model_inputs(), output_hidden_states=output_hidden_states)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        total = self.total_steps() if self._trainer is not None else 1
        self.objective.set_progress(self.global_step / total)
        out = self(batch, output_hidden_states=self.objective.needs_hidden)
        loss = self.objective(out, batch)
        if not torch.isfinite(loss.total):
            from erc_distill.errors import TrainingError

            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in loss.terms.items())
            raise TrainingError(f"non-finite loss at step {self.global_step} (epoch {self.current_epoch}): {terms}; "
                                "lower the learning rate, check loss weights / temperatures, or use precision 32-true")
        self.log("train_loss", loss.total, prog_bar=True, batch_size=len(batch))
        for name, value in loss.terms.items():
            self.log(f"train_{name}", value, batch_size=len(batch))
        return loss.total

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self(batch)
        keep = batch.labels >= 0
        self.val_f1.update(out.logits[keep].argmax(-1), batch.labels[keep])

    def on_validation_epoch_end(self) -> None:
        self.log("val_weighted_f1", self.val_f1.compute(), prog_bar=True)
        self.val_f1.reset()

    def total_steps(self) -> int:
        """Optimizer steps of the whole fit: ceil(batches per epoch / accumulate) · epochs, capped by max_steps.

        Computed from the datamodule instead of ``trainer.estimated_stepping_batches``, which builds the
        train loader before a checkpoint's loader state is restored (and so breaks an exact resume).
        """
        trainer = self.trainer
        batches = trainer.datamodule.train_batches_per_epoch(trainer.world_size)
        steps = -(-batches // trainer.accumulate_grad_batches) * max(1, trainer.max_epochs or 1)
        if trainer.max_steps and trainer.max_steps > 0:
            steps = min(steps, trainer.max_steps)
        return max(1, steps)

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        cfg = self.optim
        groups = self.model.layer_groups()
        top = len(groups) - 2  # index of the last encoder layer
        param_groups = []
        for depth, params in enumerate(groups[:-1]):
            params = [p for p in params if p.requires_grad]
            if params:
                param_groups.append({"params": params, "lr": cfg.lr * cfg.layer_decay ** (top - depth)})
        head = [p for p in groups[-1] if p.requires_grad] + [p for p in self.objective.parameters() if p.requires_grad]
        param_groups.append({"params": head, "lr": cfg.head_lr})
        for g in param_groups:
            g["weight_decay"] = cfg.weight_decay
        optimizer = torch.optim.AdamW(param_groups)
        total = self.total_steps()
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def predict(model: PromptedClassifier, loader, device: str | torch.device = "cpu", hidden_layers: list[int] | None = None):
    """Run ``model`` over a loader: (example ids, logits [N, C], features [N, H], hidden [N, n, H] or None)."""
    model.eval().to(device)
    ids, logits, features, hidden = [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        out = model(*batch.model_inputs(), output_hidden_states=bool(hidden_layers))
        ids += batch.example_ids
        logits.append(out.logits.float().cpu())
        features.append(out.features.float().cpu())
        if hidden_layers:
            hidden.append(torch.stack([out.layer_features(i, batch) for i in hidden_layers], 1).float().cpu())
    return ids, torch.cat(logits), torch.cat(features), (torch.cat(hidden) if hidden_layers else None)
