"""The training objective: a weighted sum of named loss terms, ``--loss ce=1,dist=1,feature=0.5``.

    L = Σ_k w_k · L_k        (each L_k logged separately, unweighted)

``str(objective)`` prints the formula, e.g. ``L = 1·ce + 1·dist(τ=4) + 0.5·feature(τ=1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from erc_distill.config import TERM_FIELDS, LossConfig, parse_loss_spec  # noqa: F401 (re-exported)
from erc_distill.data.datamodule import Batch
from erc_distill.distill.losses import (
    DIST,
    LOSSES,
    CrossEntropy,
    FeatureKD,
    HiddenMSE,
    HintonKD,
    LossTerm,
    PerTeacher,
    SPCLPrototype,
    SupCon,
    inverse_frequency_weights,
)
from erc_distill.modeling import ModelOutput


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    """Unweighted value of each term (detached), for logging."""


class Objective(nn.Module):
    def __init__(self, terms: dict[str, tuple[LossTerm, float]]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict({name: term for name, (term, _) in terms.items()})
        self.weights = {name: w for name, (_, w) in terms.items()}

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms.values())

    @property
    def needs_hidden(self) -> bool:
        return any(t.needs_hidden for t in self.terms.values())

    def set_progress(self, progress: float) -> None:
        """Tell schedule-aware terms (SPCL's curriculum) the fraction of training done, in [0, 1]."""
        for term in self.terms.values():
            if hasattr(term, "progress"):
                term.progress = progress

    def forward(self, student: ModelOutput, batch: Batch) -> LossOutput:
        values = {name: term(student, batch) for name, term in self.terms.items()}
        total = sum(self.weights[name] * v for name, v in values.items())
        return LossOutput(total, {name: v.detach() for name, v in values.items()})

    def __str__(self) -> str:
        return "L = " + " + ".join(f"{self.weights[n]:g}·{t.describe()}" for n, t in self.terms.items())


def build_objective(
    cfg: LossConfig,
    num_classes: int,
    student_dim: int,
    teacher_dim: int | Sequence[int] | None = None,
    class_counts: torch.Tensor | None = None,
    student_layers: int | None = None,
    teacher_weights: Sequence[float] | None = None,
) -> Objective:
    """Instantiate the terms of ``cfg`` for these widths (projections are created where they differ).
    ``teacher_dim``: the teacher's feature width, or one width per teacher (an ensemble: each feature-level term
    becomes a :class:`PerTeacher` mean with one projection per teacher, weighted by ``teacher_weights``); None when
    there are no teacher features (teacher output files give logits only), which the feature terms need."""
    featured = cfg.feature_terms
    if featured and teacher_dim is None:
        raise ValueError(f"{', '.join(featured)} need the teacher's features")
    dims = [teacher_dim] if teacher_dim is None or isinstance(teacher_dim, int) else [int(d) for d in teacher_dim]
    if len(dims) > 1:  # one projection per teacher, the term averaged over them
        terms_k = [build_objective(cfg, num_classes, student_dim, d, class_counts, student_layers) for d in dims]
        per_teacher = {n: (PerTeacher([o.terms[n] for o in terms_k], dims, teacher_weights), terms_k[0].weights[n])
                       for n in featured}
        return Objective({n: per_teacher.get(n, (terms_k[0].terms[n], w)) for n, w in terms_k[0].weights.items()})
    teacher_dim = dims[0]
    terms: dict[str, tuple[LossTerm, float]] = {}
    for name, weight in cfg.weights.items():
        if name == "ce":
            weights = None
            if cfg.class_weight_power:
                if class_counts is None:
                    raise ValueError("class-weighted ce needs the training label counts")
                weights = inverse_frequency_weights(class_counts, cfg.class_weight_power)
            term: LossTerm = CrossEntropy(weights, cfg.focal_gamma, cfg.label_smoothing)
        elif name == "kd":
            term = HintonKD(cfg.tau)
        elif name == "dist":
            term = DIST(cfg.tau)
        elif name == "feature":
            term = FeatureKD(student_dim, teacher_dim, cfg.feature_tau)
        elif name == "hidden":
            if student_layers is None:
                raise ValueError("the hidden loss needs the student's layer count")
            if not 1 <= cfg.hidden_layers <= student_layers:
                from erc_distill.errors import ConfigError

                raise ConfigError(f"{cfg.hidden_layers} layers to match, but the student has {student_layers}",
                                  field="--loss.hidden-layers")
            first = student_layers - cfg.hidden_layers + 1  # hidden_states[0] is the embeddings
            term = HiddenMSE(student_dim, teacher_dim, list(range(first, student_layers + 1)))
        elif name == "supcon":
            term = SupCon(cfg.contrastive_tau)
        elif name == "spcl":
            term = SPCLPrototype(num_classes, student_dim, cfg.spcl_queue, cfg.spcl_k, cfg.contrastive_tau,
                                 curriculum=cfg.spcl_curriculum)
        else:  # registered by a plug-in: built without arguments
            term = LOSSES[name]()
        terms[name] = (term, weight)
    return Objective(terms)
