"""Examples, length-bucketed batches with dynamic padding, and the Lightning data module.

A :class:`Batch` carries the student's tokens and, when a teacher cache is attached, the teacher's
outputs for the same examples, joined by ``example_id`` (never by token position: teacher and
student may use different tokenizers).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from erc_distill.data.context import ContextBuilder
from erc_distill.data.corpora import load_corpus
from erc_distill.data.types import CorpusSplit, Split


@dataclass(frozen=True)
class Example:
    """One turn as a training example: built ids, mask position, class index (-1: unlabelled)."""

    example_id: str
    input_ids: tuple[int, ...]
    mask_index: int
    label: int
    dialogue_id: str
    turn_id: int
    speaker: str


def build_examples(data: CorpusSplit, builder: ContextBuilder) -> list[Example]:
    """Every turn of ``data`` as an :class:`Example` (inputs built per dialogue, no future turns)."""
    out = []
    for d in data.dialogues:
        for turn, x in zip(d.turns, builder.build_dialogue(d)):
            label = data.labels.index(turn.label) if turn.label is not None else -1
            out.append(Example(turn.example_id, x.input_ids, x.mask_index, label, d.dialogue_id, turn.turn_id, turn.speaker))
    return out


class TeacherTargets(Protocol):
    """What a teacher cache gives a batch: rows looked up by example id."""

    def lookup(self, example_ids: Sequence[str]) -> dict[str, torch.Tensor]: ...


@dataclass
class Batch:
    """A padded batch. ``input_ids``/``attention_mask`` [B, T]; ``mask_index``/``labels`` [B];
    ``teacher``: cached teacher tensors (``logits`` [B, C], ``features`` [B, H_t], ``hidden`` [B, n, H_t]).

    Every batch type (this one, :class:`erc_distill.audio.data.ClipBatch`) has ``labels``,
    ``example_ids``, ``teacher``, :meth:`model_inputs` (the model's positional inputs), :meth:`onnx_feed`
    (the exported graph's inputs) and :meth:`to`; trainers, caches and exporters use only these."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_index: torch.Tensor
    labels: torch.Tensor
    example_ids: list[str]
    teacher: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.mask_index

    def onnx_feed(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids.numpy(), "attention_mask": self.attention_mask.numpy(),
                "mask_index": self.mask_index.numpy()}

    def to(self, device: torch.device | str) -> "Batch":
        """This batch with every tensor (teacher targets included) on ``device``."""
        return move_batch(self, device)


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (a dataclass of tensors, lists and a ``teacher`` dict) with its tensors on ``device``."""
    from dataclasses import fields, replace

    changes = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif f.name == "teacher" and value is not None:
            changes[f.name] = {k: v.to(device) for k, v in value.items()}
    return replace(batch, **changes)


class ExampleDataset(Dataset):
    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class Collator:
    """Pads to the longest example of the batch and joins teacher targets by example id."""

    def __init__(self, pad_id: int, teacher: TeacherTargets | None = None) -> None:
        self.pad_id = pad_id
        self.teacher = teacher

    def __call__(self, examples: Sequence[Example]) -> Batch:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        example_ids = [e.example_id for e in examples]
        return Batch(
            input_ids=ids,
            attention_mask=mask,
            mask_index=torch.tensor([e.mask_index for e in examples]),
            labels=torch.tensor([e.label for e in examples]),
            example_ids=example_ids,
            teacher=self.teacher.lookup(example_ids) if self.teacher is not None else None,
        )


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a different random order every epoch.

    Indices are shuffled, cut into pools of ``pool_batches * batch_size``, each pool sorted by
    length and cut into batches; then the batches are shuffled. Deterministic for (seed, epoch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, pool_batches: int = 50,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        self.num_replicas, self.rank = num_replicas, rank
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.pool = pool_batches * batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0
        """Batches of the current epoch already trained on (set by the trainer; saved in checkpoints)."""
        self._iter_epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where training is in the epoch: a resumed run continues with the next unseen batch."""
        return {"epoch": self._iter_epoch, "consumed": self.consumed, "batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, consumed = epoch + 1, 0
        self.epoch, self._skip = epoch, consumed

    def __iter__(self) -> Iterator[list[int]]:
        self._iter_epoch, skip, self._skip = self.epoch, self._skip, 0
        self.consumed = skip
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=self.lengths.__getitem__)
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        self.epoch += 1  # a fresh order next epoch even when nobody calls set_epoch
        if self.num_replicas > 1:  # DDP: rank r takes batches r, r + R, ...; every rank the same count
            batches = batches[self.rank :: self.num_replicas][: len(self)]
        return iter(batches[skip:])

    def __len__(self) -> int:
        n = len(self.lengths)
        total = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return total // self.num_replicas if self.num_replicas > 1 else total


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: by length (fast), every example exactly once."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class ResumableLoader(DataLoader):
    """A DataLoader whose position inside an epoch is saved in Lightning checkpoints (Lightning stores
    the ``state_dict`` of any train loader that has one), so a killed run resumes at the next batch
    instead of replaying its epoch from the start."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


class ExampleDataModule(L.LightningDataModule):
    """Train / dev / test examples of one corpus with the Lightning loaders every modality shares:
    length-bucketed, resumable training batches and length-sorted evaluation batches.

    Subclasses build the examples (:meth:`_build`), say how long one is (:meth:`_length`: tokens,
    samples) and collate them (:meth:`_collator`). ``limit``: keep only the first ``limit`` dialogues
    of each split (``--quick``).
    """

    def __init__(self, corpus: str, data_dir: str | Path | None = None, batch_size: int = 16,
                 eval_batch_size: int = 64, seed: int = 0, limit: int | None = None,
                 teacher: TeacherTargets | None = None, num_workers: int = 0) -> None:
        super().__init__()
        self.corpus = corpus
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.limit = limit
        self.teacher = teacher
        self.num_workers = num_workers
        self.splits: dict[str, CorpusSplit] = {}
        self.examples: dict[str, list[Any]] = {}

    @property
    def labels(self) -> tuple[str, ...]:
        return self.split("train").labels

    def split(self, name: Split) -> CorpusSplit:
        if name not in self.splits:
            data = load_corpus(self.corpus, name, self.data_dir)
            if self.limit is not None:
                data = CorpusSplit(data.corpus, data.split, data.labels, data.dialogues[: self.limit], data.files)
            self.splits[name] = data
        return self.splits[name]

    def examples_of(self, name: Split) -> list[Any]:
        if name not in self.examples:
            self.examples[name] = self._build(self.split(name))
        return self.examples[name]

    def _build(self, data: CorpusSplit) -> list[Any]:
        raise NotImplementedError

    def _length(self, example: Any) -> int:
        raise NotImplementedError

    def _collator(self, with_teacher: bool) -> Any:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        for name in ("train", "dev") if stage in (None, "fit") else ("dev", "test"):
            self.examples_of(name)

    def train_batches_per_epoch(self, world_size: int = 1) -> int:
        """Batches one rank sees per epoch (what :meth:`train_dataloader`'s sampler yields), computed
        without building the loader."""
        n = len(self.examples_of("train"))
        total = -(-n // self.batch_size)
        return total // world_size if world_size > 1 else total

    def train_dataloader(self) -> DataLoader:
        ex = self.examples_of("train")
        trainer = self.trainer  # set by Lightning during fit; None when used on its own
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = LengthBucketSampler([self._length(e) for e in ex], self.batch_size, seed=self.seed,
                                      num_replicas=replicas, rank=rank)
        return ResumableLoader(ExampleDataset(ex), batch_sampler=sampler, collate_fn=self._collator(True),
                               num_workers=self.num_workers)

    def eval_dataloader(self, name: Split) -> DataLoader:
        ex = self.examples_of(name)
        return DataLoader(ExampleDataset(ex), batch_sampler=sorted_batches([self._length(e) for e in ex],
                                                                           self.eval_batch_size),
                          collate_fn=self._collator(False), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("dev")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if hasattr(batch, "model_inputs"):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


class ErcDataModule(ExampleDataModule):
    """Text examples: each turn with its context, built by one tokenizer and context config."""

    def __init__(
        self,
        corpus: str,
        builder: ContextBuilder,
        data_dir: str | Path | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        seed: int = 0,
        limit: int | None = None,
        teacher: TeacherTargets | None = None,
        num_workers: int = 0,
        transfer: CorpusSplit | None = None,
    ) -> None:
        super().__init__(corpus, data_dir, batch_size, eval_batch_size, seed, limit, teacher, num_workers)
        self.builder = builder
        self.transfer = transfer
        """Unlabelled turns (label -1) added to the training examples: taught by the teacher's targets only."""

    def examples_of(self, name: Split) -> list[Example]:
        if name == "train" and self.transfer is not None and name not in self.examples:
            self.examples[name] = self._build(self.split(name)) + self._build(self.transfer)
        return super().examples_of(name)

    def _build(self, data: CorpusSplit) -> list[Example]:
        return build_examples(data, self.builder)

    def _length(self, example: Example) -> int:
        return len(example.input_ids)

    def _collator(self, with_teacher: bool) -> Collator:
        pad = self.builder.tokenizer.pad_token_id
        return Collator(pad if pad is not None else 0, self.teacher if with_teacher else None)
