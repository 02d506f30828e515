"""Loss terms, each registered by name, each with its formula.

Every term is an ``nn.Module`` called as ``term(student: ModelOutput, batch: Batch) -> scalar``;
teacher outputs come from ``batch.teacher`` (the cache, joined by example id):
``logits`` [B, C], ``features`` [B, H_t] (mask-position state), ``hidden`` [B, n, H_t] (chosen layers).
Unlabelled examples (label -1) are ignored by supervised terms.

Notation: z_s, z_t student / teacher logits [B, C]; p^τ = softmax(z / τ); f mask-position features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from erc_distill.data.datamodule import Batch
from erc_distill.modeling import ModelOutput

LOSSES: dict[str, type[LossTerm]] = {}


def register(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: make a term available to ``--loss name=weight``."""

    def add(cls: type[LossTerm]) -> type[LossTerm]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__name__}, {cls.__name__})")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return add


class LossTerm(nn.Module):
    name = "?"
    needs_teacher = False
    needs_hidden = False  # the student must return hidden states

    def describe(self) -> str:
        """Short form for the objective's formula, e.g. ``dist(τ=4)``."""
        return self.name

    def _teacher(self, batch: Batch, key: str) -> torch.Tensor:
        if batch.teacher is None or key not in batch.teacher:
            raise ValueError(f"loss {self.name!r} needs teacher {key} (run the cache stage / attach a teacher cache)")
        return batch.teacher[key]


def _labelled(batch: Batch) -> torch.Tensor:
    return batch.labels >= 0


# ----------------------------------------------------------------------------------- supervised


@register("ce")
class CrossEntropy(LossTerm):
    """Cross-entropy, optionally class-weighted and focal (Lin et al., 2017).

    L = Σ_i w_{y_i} (1 − p_i)^γ (−log p_i) / Σ_i w_{y_i},   p_i = softmax(z_s)_i[y_i]
    (γ = 0 and w = 1: plain CE). ``class_weights`` [C] e.g. from :func:`inverse_frequency_weights`.
    """

    def __init__(self, class_weights: torch.Tensor | None = None, gamma: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float))
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def describe(self) -> str:
        parts = [f"γ={self.gamma:g}"] if self.gamma else []
        parts += ["class-weighted"] if self.class_weights is not None else []
        parts += [f"ls={self.label_smoothing:g}"] if self.label_smoothing else []
        return f"ce({', '.join(parts)})" if parts else "ce"

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        keep = _labelled(batch)
        logits, y = student.logits[keep], batch.labels[keep]
        if y.numel() == 0:
            return student.logits.sum() * 0
        nll = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing)
        if self.gamma:
            p = logits.softmax(-1).gather(1, y[:, None]).squeeze(1)
            nll = (1 - p) ** self.gamma * nll
        w = self.class_weights[y] if self.class_weights is not None else torch.ones_like(nll)
        return (w * nll).sum() / w.sum()


def inverse_frequency_weights(counts: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """w_c = (N / (C · n_c))^power, normalised to mean 1 (power 1: balanced; 0.5: softened)."""
    counts = counts.float().clamp(min=1)
    w = (counts.sum() / (len(counts) * counts)) ** power
    return w / w.mean()


# ----------------------------------------------------------------------------------- response KD


@register("kd")
class HintonKD(LossTerm):
    """Hinton et al. (2015): τ² · KL(p_t^τ ‖ p_s^τ), averaged over the batch."""

    needs_teacher = True

    def __init__(self, tau: float = 4.0):
        super().__init__()
        self.tau = tau

    def describe(self) -> str:
        return f"kd(τ={self.tau:g})"

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        t = self._teacher(batch, "logits").float() / self.tau
        s = student.logits / self.tau
        return self.tau**2 * F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of matching rows of a, b [N, D]; eps is tiny because at τ = 4 the
    softened probabilities vary little, so their norms are small."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


@register("dist")
class DIST(LossTerm):
    """DIST (Huang et al., 2022), TelME's response-level KD, on P_s = p_s^τ, P_t = p_t^τ [B, C]:

    L = τ² · [β (1 − mean_i ρ(P_s[i, :], P_t[i, :])) + γ (1 − mean_c ρ(P_s[:, c], P_t[:, c]))]

    ρ is the Pearson correlation; the first part is inter-class (per sample), the second intra-class
    (per class, across the batch). TelME uses τ = 4 on MELD, β = γ = 1.
    """

    needs_teacher = True

    def __init__(self, tau: float = 4.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        self.tau, self.beta, self.gamma = tau, beta, gamma

    def describe(self) -> str:
        return f"dist(τ={self.tau:g})"

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        ps = (student.logits / self.tau).softmax(-1)
        pt = (self._teacher(batch, "logits").float() / self.tau).softmax(-1)
        inter = 1 - _pearson_rows(ps, pt).mean()
        intra = 1 - _pearson_rows(ps.T, pt.T).mean()
        return self.tau**2 * (self.beta * inter + self.gamma * intra)


# ----------------------------------------------------------------------------------- feature KD


class _Projected(LossTerm):
    """A term that maps student features to the teacher's width with a learned linear layer when they differ."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)


@register("feature")
class FeatureKD(_Projected):
    """TelME's feature-level KD: batch-relational similarity distillation.

    With L2-normalised teacher features T [B, H] and projected student features S [B, H]:
    L = (1/B) Σ_i KL(softmax(T Tᵀ / τ)_i ‖ softmax(T Sᵀ / τ)_i)
    """

    needs_teacher = True

    def __init__(self, student_dim: int, teacher_dim: int, tau: float = 1.0):
        super().__init__(student_dim, teacher_dim)
        self.tau = tau

    def describe(self) -> str:
        return f"feature(τ={self.tau:g})"

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        t = F.normalize(self._teacher(batch, "features").float(), dim=-1)
        s = F.normalize(self.proj(student.features), dim=-1)
        target = F.log_softmax(t @ t.T / self.tau, -1)
        pred = F.log_softmax(t @ s.T / self.tau, -1)
        return F.kl_div(pred, target, reduction="batchmean", log_target=True)


@register("hidden")
class HiddenMSE(LossTerm):
    """Hidden-state transfer at the mask position (TinyBERT-style), learned projections when widths differ:

    L = (1/|M|) Σ_{(i, j) ∈ M} MSE(W_i h_s^(i), h_t^(j)),   h [B, H] taken at the mask position,

    M maps student layers to the cached teacher layers (``batch.teacher['hidden']`` [B, n, H_t]),
    by default the last n student layers, bottom to top.
    """

    needs_teacher = True
    needs_hidden = True

    def __init__(self, student_dim: int, teacher_dim: int, student_layers: list[int]):
        super().__init__()
        self.student_layers = list(student_layers)
        self.projs = nn.ModuleList(
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)
            for _ in self.student_layers
        )

    def describe(self) -> str:
        return f"hidden[s{self.student_layers}]"

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        if student.hidden_states is None:
            raise ValueError("the hidden loss needs the student's hidden states (output_hidden_states=True)")
        teacher = self._teacher(batch, "hidden").float()
        if teacher.shape[1] != len(self.student_layers):
            raise ValueError(f"teacher cache has {teacher.shape[1]} hidden layers, the map has {len(self.student_layers)}")
        losses = [
            F.mse_loss(proj(student.layer_features(layer, batch)), teacher[:, k])
            for k, (layer, proj) in enumerate(zip(self.student_layers, self.projs))
        ]
        return torch.stack(losses).mean()


class PerTeacher(LossTerm):
    """A feature-level term taught by K teachers at once, each through its own projection W_k:

        L = Σ_k w_k L_term(W_k S, T_k),   Σ_k w_k = 1 (the ensemble's ``--teacher-weights``; default 1/K)

    ``batch.teacher['features']`` [B, Σ_k H_k] and ``['hidden']`` [B, n, Σ_k H_k] hold the teachers' widths
    side by side (the ensemble's cache writes them so); ``terms[k]`` (e.g. a :class:`FeatureKD` with its own
    student→H_k projection) sees teacher k's slice only; a teacher of weight 0 is skipped. Teachers may differ
    in width (mpnet 768, RoBERTa-large 1024).
    """

    def __init__(self, terms: list[LossTerm], teacher_dims: list[int], weights: list[float] | None = None) -> None:
        super().__init__()
        if len(terms) != len(teacher_dims) or not terms or (weights is not None and len(weights) != len(terms)):
            raise ValueError(f"{len(terms)} terms for {len(teacher_dims)} teacher widths and "
                             f"{len(weights) if weights is not None else len(terms)} weights")
        self.members = nn.ModuleList(terms)
        self.teacher_dims = [int(d) for d in teacher_dims]
        w = [1.0] * len(terms) if weights is None else [float(x) for x in weights]
        if min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"teacher weights {w}: >= 0, not all 0")
        self.weights = [x / sum(w) for x in w]
        self.name = terms[0].name
        self.needs_teacher = True
        self.needs_hidden = terms[0].needs_hidden

    def describe(self) -> str:
        how = "mean" if len(set(self.weights)) == 1 else "weighted mean (" + ":".join(f"{w:.2g}" for w in self.weights) + ")"
        return f"{how} over {len(self.members)} teachers of {self.members[0].describe()}"

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        from dataclasses import replace

        if batch.teacher is None:
            raise ValueError(f"loss {self.name!r} needs the teachers' features (run the cache stage)")
        width = sum(self.teacher_dims)
        sliced = {k: v for k, v in batch.teacher.items() if k in ("features", "hidden")}
        for k, v in sliced.items():
            if v.shape[-1] != width:
                raise ValueError(f"teacher {k} are {v.shape[-1]} wide, the {len(self.members)} teachers' widths sum "
                                 f"to {width} ({'+'.join(map(str, self.teacher_dims))})")
        total, start = 0.0, 0
        for term, dim, w in zip(self.members, self.teacher_dims, self.weights):
            if w > 0:
                own = {**batch.teacher, **{k: v[..., start:start + dim] for k, v in sliced.items()}}
                total = total + w * term(student, replace(batch, teacher=own))
            start += dim
        return total


# ----------------------------------------------------------------------------------- contrastive


def _contrastive(z: torch.Tensor, y: torch.Tensor, keys: torch.Tensor, key_y: torch.Tensor, tau: float,
                 exclude: torch.Tensor) -> torch.Tensor:
    """Mean over anchors with ≥ 1 positive of −(1/|P(i)|) Σ_{p ∈ P(i)} log(exp(z_i·k_p/τ) / Σ_{a ∈ A(i)} exp(z_i·k_a/τ)).

    z [B, H] anchors with labels y [B]; keys [K, H] with labels key_y [K]; ``exclude`` [B, K] marks
    pairs left out of A(i) and P(i) (an anchor and itself).
    """
    logits = (z @ keys.T / tau).masked_fill(exclude, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (y[:, None] == key_y[None, :]) & ~exclude
    n_pos = positive.sum(1)
    has = n_pos > 0
    if not has.any():
        return z.sum() * 0
    return -(log_prob.masked_fill(~positive, 0).sum(1)[has] / n_pos[has]).mean()


@register("supcon")
class SupCon(LossTerm):
    """Supervised contrastive loss L_out (Khosla et al., 2020) on z = normalize(f_s) [B, H]:

    L = (1/|I|) Σ_{i ∈ I} −(1/|P(i)|) Σ_{p ∈ P(i)} log( exp(z_i·z_p/τ) / Σ_{a ≠ i} exp(z_i·z_a/τ) ),

    P(i) = other samples with i's label; I = anchors with |P(i)| > 0.
    """

    def __init__(self, tau: float = 0.1):
        super().__init__()
        self.tau = tau

    def describe(self) -> str:
        return f"supcon(τ={self.tau:g})"

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        keep = _labelled(batch)
        z = F.normalize(student.features[keep], dim=-1)
        y = batch.labels[keep]
        return _contrastive(z, y, z, y, self.tau, torch.eye(len(z), dtype=torch.bool, device=z.device))


@register("spcl")
class SPCLPrototype(LossTerm):
    """SPCL's prototype contrastive loss (Song et al., EMNLP 2022), without the curriculum.

    Per-class queues keep the last ``queue_size`` normalised features (detached). Each step, each
    class's prototype is the mean of ``k`` features drawn from its queue. With batch features z and
    keys = [batch features; prototypes]:

    L = (1/|I|) Σ_i −(1/|P(i)|) Σ_{p ∈ P(i)} log( exp(z_i·k_p/τ) / Σ_{a ≠ i} exp(z_i·k_a/τ) ),

    P(i) = same-label batch samples and i's class prototype. Before a class has features in its
    queue it has no prototype (the loss reduces to SupCon).

    Curriculum (``curriculum=True``, SPCL's easy-to-hard schedule): an anchor's difficulty is
    d_i = 1 − cos(z_i, prototype_{y_i}); only anchors with d_i at or below the q-quantile of the batch
    count, q = 0.5 + 0.5 · progress, where ``progress`` in [0, 1] is the fraction of training done
    (set by the training loop on the objective).
    """

    def __init__(self, num_classes: int, dim: int, queue_size: int = 64, k: int = 8, tau: float = 0.1,
                 seed: int = 0, curriculum: bool = False):
        super().__init__()
        self.num_classes, self.queue_size, self.k, self.tau = num_classes, queue_size, k, tau
        self.curriculum = curriculum
        self.progress = 1.0
        self.register_buffer("queue", torch.zeros(num_classes, queue_size, dim))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.generator = torch.Generator().manual_seed(seed)

    def describe(self) -> str:
        return f"spcl(τ={self.tau:g}, K={self.k}, queue={self.queue_size}{', curriculum' if self.curriculum else ''})"

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototypes [C', H], their classes [C']) for classes whose queue is not empty."""
        protos, classes = [], []
        for c in range(self.num_classes):
            n = int(self.filled[c])
            if n == 0:
                continue
            pick = torch.randint(n, (min(self.k, n),), generator=self.generator).to(self.queue.device)
            protos.append(F.normalize(self.queue[c, pick].mean(0), dim=-1))
            classes.append(c)
        if not protos:
            return self.queue.new_zeros(0, self.queue.shape[-1]), self.filled.new_zeros(0)
        return torch.stack(protos), torch.tensor(classes, device=self.queue.device)

    @torch.no_grad()
    def _curriculum_anchors(self, z, y, protos, proto_y) -> torch.Tensor | None:
        """Anchors easy enough for the current stage of training (None: no prototypes yet)."""
        if len(protos) == 0 or len(z) == 0:
            return None
        own = torch.full((len(z),), -1, dtype=torch.long, device=z.device)
        for j, c in enumerate(proto_y.tolist()):
            own[y == c] = j
        has = own >= 0
        difficulty = torch.zeros(len(z), device=z.device)
        difficulty[has] = 1 - (z[has] * protos[own[has]].to(z.dtype)).sum(-1)
        q = 0.5 + 0.5 * min(max(self.progress, 0.0), 1.0)
        return (difficulty <= torch.quantile(difficulty, q)) | ~has

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor, y: torch.Tensor) -> None:
        for feat, c in zip(z.detach(), y.tolist()):
            self.queue[c, self.ptr[c]] = feat
            self.ptr[c] = (self.ptr[c] + 1) % self.queue_size
            self.filled[c] = min(int(self.filled[c]) + 1, self.queue_size)

    def forward(self, student: ModelOutput, batch: Batch) -> torch.Tensor:
        keep = _labelled(batch)
        z = F.normalize(student.features[keep], dim=-1)
        y = batch.labels[keep]
        protos, proto_y = self.prototypes()
        keys = torch.cat([z, protos.to(z.dtype)])
        key_y = torch.cat([y, proto_y])
        exclude = torch.zeros(len(z), len(keys), dtype=torch.bool, device=z.device)
        exclude[:, : len(z)] = torch.eye(len(z), dtype=torch.bool, device=z.device)
        anchors = self._curriculum_anchors(z, y, protos, proto_y) if self.curriculum and self.training else None
        if anchors is not None:
            loss = _contrastive(z[anchors], y[anchors], keys, key_y, self.tau, exclude[anchors])
        else:
            loss = _contrastive(z, y, keys, key_y, self.tau, exclude)
        if self.training:
            self.enqueue(z, y)
        return loss
