"""The stage interface and the context stages share.

A stage is a small class: its ``name``, the stages it ``needs``, a ``key`` (a hash of exactly what
it reads: config parts, data fingerprint, upstream keys) and ``run``, which returns a
:class:`StageResult` (artifacts by name, and info for the manifest). The runner
(:mod:`erc_distill.stages.runner`) skips a stage whose key is unchanged and whose artifacts are
intact, and records hashes of what it makes.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from erc_distill.atomic import write_json
from erc_distill.config import RunConfig
from erc_distill.stages.manifest import Manifest

if TYPE_CHECKING:
    import torch

    from erc_distill.data.datamodule import ErcDataModule, ExampleDataModule
    from erc_distill.stages.modality import AudioModality, TextModality

CACHE_ENV = "ERC_DISTILL_CACHE"

#: Settings that cannot change a result, left out of every key.
NOT_IN_KEY = {"accelerator", "devices", "strategy", "checkpoint_every_n_steps", "eval_batch_size", "data_dir"}

#: Settings added after keys were first handed out, left out of a key while at this default value: a
#: newer erc-distill still finds the teachers, caches and students an older one made.
KEY_FROM_NON_DEFAULT = {"keep_layers": None}


def stage_key(*parts: Any) -> str:
    """Stable 16-hex hash of config parts (dataclasses as dicts, settings in NOT_IN_KEY left out, and those
    of KEY_FROM_NON_DEFAULT while at their default)."""

    def clean(x: Any) -> Any:
        if is_dataclass(x) and not isinstance(x, type):
            x = asdict(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in sorted(x.items()) if k not in NOT_IN_KEY
                    and not (k in KEY_FROM_NON_DEFAULT and v == KEY_FROM_NON_DEFAULT[k])}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    blob = json.dumps([clean(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StageResult:
    artifacts: dict[str, Path] = field(default_factory=dict)
    """Files or folders the stage made (hashed, and checked before a later skip)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything else for the manifest record (metrics summaries, parity numbers, ...)."""
    unhashed: tuple[str, ...] = ()
    """Artifacts checked for presence only (large folders another stage owns)."""


@dataclass
class RunContext:
    """What every stage reads: the config, the run and cache folders, the manifest, and shared helpers."""

    cfg: RunConfig
    out: Path
    cache_dir: Path
    manifest: Manifest
    data_fingerprint: str
    log: Callable[[str], None] = print
    progress: bool = True
    _said: set[str] = field(default_factory=set, repr=False)
    _transfer: Any = field(default=None, repr=False)

    def log_once(self, message: str) -> None:
        """``log`` a message the first time only (a media report that every stage's data module repeats)."""
        if message not in self._said:
            self._said.add(message)
            self.log(message)

    @property
    def modality(self) -> "TextModality | AudioModality":
        """How this run's models read the corpus (:mod:`erc_distill.stages.modality`)."""
        from erc_distill.stages.modality import modality_of

        return modality_of(self.cfg.modality)

    @property
    def labels(self) -> tuple[str, ...]:
        from erc_distill.data.corpora import get_corpus

        return get_corpus(self.cfg.data).labels

    @property
    def infer_device(self) -> str:
        """Where cache / evaluate forward passes run: the training accelerator's GPU, if any."""
        import torch

        wants_gpu = self.cfg.student_train.accelerator in ("gpu", "cuda", "auto")
        return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"

    def datamodule(self, tokenizer: Any, context: Any, train: Any, teacher: Any = None,
                   transfer: bool = False) -> "ErcDataModule":
        """Text examples built with ``context``; ``transfer``: the run's transfer turns join the training split."""
        from erc_distill.data.context import ContextBuilder
        from erc_distill.data.datamodule import ErcDataModule

        return ErcDataModule(self.cfg.data, ContextBuilder(tokenizer, context), self.cfg.data_dir,
                             batch_size=train.batch_size, eval_batch_size=train.eval_batch_size,
                             seed=train.seed, limit=self.cfg.limit, teacher=teacher,
                             transfer=self.transfer_split() if transfer and self.cfg.transfer else None)

    def transfer_set(self) -> Any:
        """The run's :class:`~erc_distill.data.transfer.TransferSet` (built once; None without ``--transfer``)."""
        if not self.cfg.transfer:
            return None
        if self._transfer is None:
            from erc_distill.data.transfer import build_transfer_set

            self._transfer = build_transfer_set(self.cfg.transfer, self.cfg.data_dir, self.cfg.limit)
            r = self._transfer.report
            self.log_once(f"transfer set {'+'.join(self.cfg.transfer)}: {len(self._transfer.turns)} unlabelled turns "
                          f"(fingerprint {r.fingerprint})")
        return self._transfer

    def transfer_split(self) -> Any:
        """The transfer turns as a (label-less) training split of the run's corpus."""
        from erc_distill.data.types import CorpusSplit

        return CorpusSplit("transfer", "train", self.labels, tuple(self.transfer_set().dialogues))

    def teacher_output_files(self) -> tuple[Path, ...]:
        """The ensemble's members: the ``teacher_outputs`` files, or the files the teacher stage wrote for the
        run's ``teachers`` (in their order); empty for a run with one teacher model or none."""
        if self.cfg.teacher_outputs:
            return tuple(Path(p) for p in self.cfg.teacher_outputs)
        if self.cfg.teachers and self.cfg.uses_teacher:
            members = self.manifest.record("teacher").get("members", [])
            return tuple(self.manifest.artifact("teacher", f"outputs:{m['name']}") for m in members)
        return ()

    def class_counts(self, dm: "ExampleDataModule") -> "torch.Tensor":
        import torch

        counts = Counter(e.label for e in dm.examples_of("train") if e.label >= 0)
        return torch.tensor([counts.get(i, 0) for i in range(len(self.labels))])

    def student_objective(self, model: Any, processor: Any) -> tuple["ExampleDataModule", Any]:
        """The student's data (joined to the teacher cache when the loss needs it) and its objective."""
        from erc_distill.distill.cache import TeacherCache
        from erc_distill.distill.objective import build_objective

        c = self.cfg
        teacher = TeacherCache(self.manifest.artifact("cache", "cache")) if c.uses_teacher else None
        dm = self.modality.datamodule(self, model, processor, "student", teacher)
        features = teacher.arrays["train"].get("features") if teacher else None
        key = teacher.key if teacher else {}  # an ensemble's: one width (and weight) per teacher
        teacher_dim = key.get("feature_dims") or (features.shape[1] if features is not None else None)
        objective = build_objective(c.loss, len(self.labels), model.hidden_size, teacher_dim,
                                    self.class_counts(dm), model.num_layers, key.get("feature_weights"))
        return dm, objective

    def scores(self, pred: Any, gold: Any) -> dict[str, Any]:
        """metrics.json's per-split entry from predicted and gold class indices (unlabelled turns left out)."""
        from erc_distill.report.metrics import compute_metrics

        keep = gold >= 0
        return compute_metrics(pred[keep], gold[keep], self.labels).to_dict()

    def read_metrics(self) -> dict[str, Any]:
        path = self.out / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return metrics if isinstance(metrics, dict) else {}

    def merge_metrics(self, extra: dict[str, Any], drop: Callable[[str], bool] = lambda name: False) -> Path:
        """Write ``extra``'s rows into ``metrics.json`` (the rows ``drop`` names are removed first)."""
        metrics = {k: v for k, v in self.read_metrics().items() if not drop(k)}
        metrics.update(extra)
        return write_json(self.out / "metrics.json", metrics)


class Stage(ABC):
    """One step of the pipeline. Subclasses set ``name`` and ``needs`` and implement ``key`` and ``run``."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()

    def applies(self, ctx: RunContext) -> bool:
        """Whether this run has the stage at all (the teacher stages only when the loss needs a teacher)."""
        return True

    @abstractmethod
    def key(self, ctx: RunContext) -> str: ...

    def intact(self, ctx: RunContext) -> str | None:
        """Beyond its artifacts' hashes: why a finished stage's outputs cannot be trusted (None: they can),
        e.g. its rows missing from the shared ``metrics.json``."""
        return None

    @abstractmethod
    def run(self, ctx: RunContext) -> StageResult: ...


def params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def default_cache_dir(cache_dir: str | Path | None) -> Path:
    from erc_distill.data.paths import user_cache_dir

    return Path(cache_dir or os.environ.get(CACHE_ENV) or user_cache_dir())
