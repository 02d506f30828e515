"""Clips as training examples: decoded once, batched by length, joined to the teacher cache by id.

A :class:`ClipExample` is one turn's audio (mono 16 kHz float32 samples, read through the media
layer, cut to ``max_seconds``); a :class:`ClipBatch` holds the model's inputs for several clips
(``prepare``: log-mel ``[B, 80, T]`` for Whisper, samples ``[B, N]`` for waveform encoders, and the
valid ``lengths`` ``[B]``), the labels and, for training a student, the teacher's cached outputs for
the same example ids. :class:`ClipDataModule` is :class:`~erc_distill.data.datamodule.ExampleDataModule`
with clips: the same length-bucketed, resumable training loader and length-sorted evaluation.

A turn whose audio is missing or cannot be decoded is left out of the clip examples and counted
(the run log prints the media report of each split; :attr:`ClipDataModule.reports`): for an audio
model there is nothing to classify. The count shows in ``metrics.json`` (``n`` of each split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erc_distill.data.datamodule import ExampleDataModule, TeacherTargets, move_batch
from erc_distill.data.types import CorpusSplit
from erc_distill.media.clips import MediaReport

Prepare = Callable[[Sequence[np.ndarray]], tuple[torch.Tensor, torch.Tensor]]
"""Samples of several clips -> ``(inputs, lengths)`` (:meth:`AudioClassifier.prepare`)."""


@dataclass(frozen=True, eq=False)
class ClipExample:
    """One turn's clip: ``samples`` mono float32 at 16 kHz; ``label`` class index (-1: unlabelled)."""

    example_id: str
    samples: np.ndarray
    label: int
    dialogue_id: str
    turn_id: int
    speaker: str


@dataclass
class ClipBatch:
    """``inputs`` ``[B, n_mels, T]`` or ``[B, N]``; ``lengths``/``labels`` ``[B]``; ``teacher`` as in
    :class:`~erc_distill.data.datamodule.Batch`. ``input_name``: the exported graph's name for
    ``inputs`` (``features`` or ``samples``)."""

    inputs: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    example_ids: list[str]
    teacher: dict[str, torch.Tensor] | None = None
    input_name: str = "features"

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.inputs, self.lengths

    def onnx_feed(self) -> dict[str, np.ndarray]:
        return {self.input_name: self.inputs.numpy(), "lengths": self.lengths.numpy().astype(np.int64)}

    def to(self, device: torch.device | str) -> "ClipBatch":
        return move_batch(self, device)


class ClipCollator:
    """Features of a batch of clips (``prepare``) and the teacher targets of their ids."""

    def __init__(self, prepare: Prepare, input_name: str, teacher: TeacherTargets | None = None) -> None:
        self.prepare = prepare
        self.input_name = input_name
        self.teacher = teacher

    def __call__(self, examples: Sequence[ClipExample]) -> ClipBatch:
        inputs, lengths = self.prepare([e.samples for e in examples])
        ids = [e.example_id for e in examples]
        return ClipBatch(inputs, lengths, torch.tensor([e.label for e in examples]), ids,
                         self.teacher.lookup(ids) if self.teacher is not None else None, self.input_name)


class ClipDataModule(ExampleDataModule):
    """Train / dev / test clips of one corpus for an audio model.

    ``prepare`` and ``input_kind`` come from the model (:class:`~erc_distill.audio.model.AudioClassifier`);
    ``media_dir`` / ``max_seconds`` as in :func:`erc_distill.media.load_turn_audio`; ``log`` receives
    each split's media report once.
    """

    def __init__(self, corpus: str, prepare: Prepare, input_kind: str = "log-mel", data_dir: str | Path | None = None,
                 media_dir: str | Path | None = None, max_seconds: float | None = None, batch_size: int = 16,
                 eval_batch_size: int = 64, seed: int = 0, limit: int | None = None,
                 teacher: TeacherTargets | None = None, log: Callable[[str], None] | None = None,
                 progress: bool = False) -> None:
        super().__init__(corpus, data_dir, batch_size, eval_batch_size, seed, limit, teacher)
        self.prepare = prepare
        self.input_name = "features" if input_kind == "log-mel" else "samples"
        self.media_dir = media_dir
        self.max_seconds = max_seconds
        self.log = log
        self.progress = progress
        self.reports: dict[str, MediaReport] = {}

    def _build(self, data: CorpusSplit) -> list[ClipExample]:
        from erc_distill.media.clips import load_turn_audio

        turns = [t for d in data.dialogues for t in d.turns]
        clips, report = load_turn_audio(turns, self.media_dir, max_seconds=self.max_seconds, progress=self.progress)
        self.reports[data.split] = report
        if self.log is not None:
            self.log(f"{data.corpus} {data.split}: " + report.summary())
        return [ClipExample(t.example_id, clip.samples, data.labels.index(t.label) if t.label is not None else -1,
                            t.dialogue_id, t.turn_id, t.speaker)
                for t, clip in zip(turns, clips) if clip is not None]

    def _length(self, example: ClipExample) -> int:
        return len(example.samples)

    def _collator(self, with_teacher: bool) -> ClipCollator:
        return ClipCollator(self.prepare, self.input_name, self.teacher if with_teacher else None)

