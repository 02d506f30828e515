"""Training a fusion head on the frozen students' features (TelME's second stage), with Lightning.

The text, audio and visual students are trained first (the audio and visual ones by the text teacher,
:mod:`erc_distill.fusion.multimodal`); their pooled features are computed once
(:class:`BranchFeatures`) and only the fusion head learns::

    f = Fusion(t, a, v, m_a, m_v)                        # erc_distill.fusion.heads
    L = CE(z, y) + w_kd · τ² KL(softmax(z_T/τ) ‖ softmax(z/τ))   (the KD term when teacher logits are given)

**Modality dropout**: in training, each present non-verbal modality of a sample is hidden with
probability ``p`` (its mask set to 0), so the head learns to answer from text alone; a robot turn
without a face, or without speech, then takes a path the head was trained on. The head is chosen on
dev weighted F1 (never test).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from erc_distill.fusion.heads import FusionHead, build_fusion_head


@dataclass(frozen=True)
class BranchFeatures:
    """Per turn of one split: ``text`` [N, Dt], ``audio`` [N, Da], ``visual`` [N, Dv] (zeros where
    absent), ``audio_mask`` / ``visual_mask`` [N] bool, ``labels`` [N] (-1 unlabelled), the text
    student's ``text_logits`` [N, C] and, when known, the teacher's ``teacher_logits`` [N, C]."""

    ids: tuple[str, ...]
    labels: np.ndarray
    text: np.ndarray
    audio: np.ndarray
    visual: np.ndarray
    audio_mask: np.ndarray
    visual_mask: np.ndarray
    text_logits: np.ndarray
    audio_logits: np.ndarray
    visual_logits: np.ndarray
    teacher_logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: np.ndarray) -> "BranchFeatures":
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return BranchFeatures(tuple(self.ids[i] for i in rows), *(pick(getattr(self, f)) for f in (
            "labels", "text", "audio", "visual", "audio_mask", "visual_mask", "text_logits", "audio_logits",
            "visual_logits", "teacher_logits")))

    def with_media(self) -> np.ndarray:
        """Rows where audio or video is present."""
        return np.flatnonzero(self.audio_mask | self.visual_mask)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        teacher = self.teacher_logits if self.teacher_logits is not None else np.zeros_like(self.text_logits)
        return (t(self.text).float(), t(self.audio).float(), t(self.visual).float(), t(self.audio_mask).float(),
                t(self.visual_mask).float(), t(self.labels).long(), t(teacher).float())

    def save(self, path: str | Path) -> Path:
        from erc_distill.atomic import atomic_path

        arrays = {k: getattr(self, k) for k in ("labels", "text", "audio", "visual", "audio_mask", "visual_mask",
                                                 "text_logits", "audio_logits", "visual_logits")}
        if self.teacher_logits is not None:
            arrays["teacher_logits"] = self.teacher_logits
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, ids=np.asarray(self.ids), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "BranchFeatures":
        with np.load(path, allow_pickle=False) as z:
            get = {k: z[k] for k in z.files}
        return cls(tuple(str(i) for i in get.pop("ids")), **get)


@dataclass(frozen=True)
class FusionTrainConfig:
    """``epochs`` (early stopping on dev weighted F1, ``patience`` epochs), AdamW ``lr`` / ``weight_decay``,
    ``modality_dropout`` p, ``kd`` weight and ``tau`` of the teacher term (0: CE only)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 5
    modality_dropout: float = 0.3
    kd: float = 1.0
    tau: float = 2.0
    seed: int = 0


class FusionModule(L.LightningModule):
    """A fusion head trained on precomputed features; keeps the best dev weighted F1 state in memory."""

    def __init__(self, head: FusionHead, cfg: FusionTrainConfig) -> None:
        super().__init__()
        self.head = head
        self.cfg = cfg
        self.best_f1 = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self._dev: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, text, audio, visual, audio_mask, visual_mask):  # noqa: D102
        return self.head(text, audio, visual, audio_mask, visual_mask)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        text, audio, visual, am, vm, y, zt = batch
        p = self.cfg.modality_dropout
        if p > 0:
            am = am * (torch.rand_like(am) >= p).float()
            vm = vm * (torch.rand_like(vm) >= p).float()
        z = self.head(text, audio, visual, am, vm).logits
        labelled = y >= 0
        loss = F.cross_entropy(z[labelled], y[labelled]) if labelled.any() else z.sum() * 0
        if self.cfg.kd > 0 and zt.abs().sum() > 0:
            tau = self.cfg.tau
            kd = F.kl_div(F.log_softmax(z / tau, -1), F.log_softmax(zt / tau, -1), log_target=True,
                          reduction="batchmean") * tau * tau
            loss = loss + self.cfg.kd * kd
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        text, audio, visual, am, vm, y, _ = batch
        self._dev.append((self.head(text, audio, visual, am, vm).logits.argmax(-1), y))

    def on_validation_epoch_end(self) -> None:
        from torchmetrics.functional.classification import multiclass_f1_score

        pred = torch.cat([p for p, _ in self._dev]).cpu()
        gold = torch.cat([g for _, g in self._dev]).cpu()
        self._dev.clear()
        keep = gold >= 0
        f1 = float(multiclass_f1_score(pred[keep], gold[keep], self.head.num_labels, average="weighted")) \
            if keep.any() else 0.0
        self.log("val_weighted_f1", f1, prog_bar=True)
        if f1 > self.best_f1:
            self.best_f1 = f1
            self.best_state = {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def train_fusion(name: str, train: BranchFeatures, dev: BranchFeatures, num_labels: int, cfg: FusionTrainConfig,
                 progress: bool = False, **options: Any) -> tuple[FusionHead, float]:
    """A ``name`` head (:func:`~erc_distill.fusion.heads.build_fusion_head`) fitted on ``train``, its best
    dev state restored; returns it (eval mode) and that dev weighted F1."""
    from lightning.pytorch.callbacks import EarlyStopping

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    head = build_fusion_head(name, train.text.shape[1], train.audio.shape[1], train.visual.shape[1], num_labels,
                             **options)
    module = FusionModule(head, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(*train.tensors()), batch_size=cfg.batch_size, shuffle=True, generator=g)
    dev_loader = DataLoader(TensorDataset(*dev.tensors()), batch_size=256)
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[EarlyStopping("val_weighted_f1", mode="max", patience=cfg.patience)])
    trainer.fit(module, loader, dev_loader)
    if module.best_state is not None:
        head.load_state_dict(module.best_state)
    return head.eval(), module.best_f1


@torch.no_grad()
def fusion_logits(head: FusionHead, data: BranchFeatures, audio: bool = True, visual: bool = True) -> np.ndarray:
    """``head``'s logits on ``data`` [N, C]; ``audio`` / ``visual`` False hide that modality everywhere."""
    text, a, v, am, vm, _, _ = data.tensors()
    am = am if audio else torch.zeros_like(am)
    vm = vm if visual else torch.zeros_like(vm)
    return head.eval()(text, a, v, am, vm).logits.numpy()

