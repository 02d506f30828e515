"""ERC metrics with torchmetrics: weighted F1 (the field's headline), macro F1, accuracy, per-class F1
and the confusion matrix.

For C classes with per-class F1_c and gold support n_c (N = sum n_c)::

    weighted_f1 = sum_c (n_c / N) * F1_c            # classes absent from gold weigh 0
    macro_f1    = (1 / C') * sum_c F1_c             # C' = classes present in gold or predictions
    accuracy    = (1 / N) * sum_i [pred_i == gold_i]
    F1_c        = 2 * TP_c / (2 * TP_c + FP_c + FN_c)   (0 when the denominator is 0)

``confusion[i][j]`` counts gold class i predicted as j. Values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)


@dataclass(frozen=True)
class ClassificationMetrics:
    weighted_f1: float
    macro_f1: float
    accuracy: float
    per_class: dict[str, float]
    """F1 of each label."""
    support: dict[str, int]
    confusion: list[list[int]]
    labels: tuple[str, ...]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"weighted F1 {100 * self.weighted_f1:.2f}  macro F1 {100 * self.macro_f1:.2f}  "
            f"accuracy {100 * self.accuracy:.2f}  (n={self.n})"
        )


def compute_metrics(
    preds: Sequence[int] | torch.Tensor, target: Sequence[int] | torch.Tensor, labels: Sequence[str]
) -> ClassificationMetrics:
    """Metrics of predicted class indices ``preds`` [N] against gold indices ``target`` [N]."""
    preds = torch.as_tensor(preds, dtype=torch.long).flatten()
    target = torch.as_tensor(target, dtype=torch.long).flatten()
    if preds.shape != target.shape:
        raise ValueError(f"preds has {preds.numel()} items but target has {target.numel()}")
    if preds.numel() == 0:
        raise ValueError("no predictions to score")
    c = len(labels)
    for name, t in (("preds", preds), ("target", target)):
        if int(t.min()) < 0 or int(t.max()) >= c:
            raise ValueError(f"{name} holds a class index outside 0..{c - 1} ({len(labels)} labels)")
    per_class = multiclass_f1_score(preds, target, num_classes=c, average=None, zero_division=0)
    present = torch.bincount(target, minlength=c).gt(0) | torch.bincount(preds, minlength=c).gt(0)
    support = torch.bincount(target, minlength=c)
    return ClassificationMetrics(
        weighted_f1=float(multiclass_f1_score(preds, target, num_classes=c, average="weighted", zero_division=0)),
        macro_f1=float(per_class[present].mean()),
        accuracy=float(multiclass_accuracy(preds, target, num_classes=c, average="micro")),
        per_class={label: float(v) for label, v in zip(labels, per_class)},
        support={label: int(v) for label, v in zip(labels, support)},
        confusion=multiclass_confusion_matrix(preds, target, num_classes=c).tolist(),
        labels=tuple(labels),
        n=int(target.numel()),
    )
