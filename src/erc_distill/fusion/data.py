"""Frames as training examples, and teacher targets read from teacher-output files.

A :class:`FrameExample` is one turn's face crops (``frames`` of them, sampled uniformly from its video
or frame folder, :mod:`erc_distill.media.frames`), resized once to the model's input size and kept
as uint8 (8 frames of 224×224 RGB is 1.2 MB a turn; of the fer CNN's 64×64 grey, 32 KB).
:class:`FrameDataModule` is :class:`~erc_distill.data.datamodule.ExampleDataModule` with frames: the
same resumable training loader, joined to the teacher by example id. A turn with no video is left
out of the visual examples and counted (:attr:`FrameDataModule.reports`), as the audio branch does
with clips.

:func:`output_targets` turns teacher-output files (``erc-distill teacher-outputs``) into the
:class:`~erc_distill.distill.cache.TeacherCache` a data module looks targets up in: this is how the
text teacher teaches the audio and visual students (cross-modal distillation), by example id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erc_distill.data.datamodule import ExampleDataModule, TeacherTargets, move_batch
from erc_distill.data.types import CorpusSplit


@dataclass(frozen=True, eq=False)
class FrameExample:
    """One turn's crops, uint8 ``[N, S, S, C]`` at the model's input size; ``label`` -1: unlabelled."""

    example_id: str
    crops: np.ndarray
    label: int
    faces: int


@dataclass
class FrameBatch:
    """``pixels`` ``[B, N, C, S, S]``, ``frame_mask`` ``[B, N]``; the rest as in
    :class:`~erc_distill.data.datamodule.Batch`."""

    pixels: torch.Tensor
    frame_mask: torch.Tensor
    labels: torch.Tensor
    example_ids: list[str]
    teacher: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.pixels, self.frame_mask

    def onnx_feed(self) -> dict[str, np.ndarray]:
        return {"pixels": self.pixels.numpy(), "frame_mask": self.frame_mask.numpy()}

    def to(self, device: torch.device | str) -> "FrameBatch":
        return move_batch(self, device)


@dataclass
class FrameReport:
    """Turns of a split with frames, without, unreadable; frames where a face was found."""

    turns: int = 0
    with_frames: int = 0
    no_video: int = 0
    unreadable: int = 0
    frames: int = 0
    faces: int = 0
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        face = f", a face in {self.faces} of {self.frames} frames" if self.frames else ""
        bad = f", {self.unreadable} unreadable (e.g. {self.examples[0]})" if self.unreadable else ""
        return f"frames for {self.with_frames} of {self.turns} turns ({self.no_video} without video{bad}{face})"


def load_turn_frames(turns: Sequence[Any], media_dir: str | Path | None, n: int, cropper: Any, size: int,
                     grayscale: bool, progress: bool = False) -> tuple[list[np.ndarray | None], list[int], FrameReport]:
    """Each turn's crops as uint8 ``[n, size, size, C]`` (None: no video), faces found per turn, and the report."""
    from PIL import Image
    from tqdm.auto import tqdm

    from erc_distill.media.audio import MediaError
    from erc_distill.media.frames import load_frames, locate_frames

    report, out, faces = FrameReport(turns=len(turns)), [], []
    for turn in tqdm(turns, desc="frames", unit="turn", disable=not progress, leave=False):
        where = locate_frames(turn, media_dir)
        if where is None:
            report.no_video += 1
            out.append(None)
            faces.append(0)
            continue
        try:
            frames = load_frames(where, n)
        except MediaError as err:
            report.unreadable += 1
            if len(report.examples) < 5:
                report.examples.append(str(err))
            out.append(None)
            faces.append(0)
            continue
        crops = cropper.crop(frames)
        resized = [np.asarray(Image.fromarray(c).convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR))
                   for c in crops.images]
        arr = np.stack(resized)
        out.append(arr[..., None] if grayscale else arr)
        faces.append(crops.found)
        report.with_frames += 1
        report.frames += len(crops.images)
        report.faces += crops.found
    return out, faces, report


class FrameCollator:
    """Pixels of a batch of crops (the model's :meth:`~erc_distill.visual.model.VisualClassifier.prepare`)
    and the teacher targets of their ids."""

    def __init__(self, prepare: Callable[[Sequence[Any]], tuple[torch.Tensor, torch.Tensor]],
                 teacher: TeacherTargets | None = None) -> None:
        self.prepare = prepare
        self.teacher = teacher

    def __call__(self, examples: Sequence[FrameExample]) -> FrameBatch:
        pixels, mask = self.prepare([list(e.crops[..., 0] if e.crops.shape[-1] == 1 else e.crops) for e in examples])
        ids = [e.example_id for e in examples]
        return FrameBatch(pixels, mask, torch.tensor([e.label for e in examples]), ids,
                          self.teacher.lookup(ids) if self.teacher is not None else None)


class FrameDataModule(ExampleDataModule):
    """Train / dev / test turns of one corpus that have video, for a visual model
    (:class:`~erc_distill.visual.model.VisualClassifier`: its ``prepare`` and ``preprocessing``)."""

    def __init__(self, corpus: str, model: Any, data_dir: str | Path | None = None,
                 media_dir: str | Path | None = None, cropper: Any = None, batch_size: int = 16,
                 eval_batch_size: int = 32, seed: int = 0, limit: int | None = None,
                 teacher: TeacherTargets | None = None, log: Callable[[str], None] | None = None,
                 progress: bool = False) -> None:
        from erc_distill.media.frames import FaceCropper

        super().__init__(corpus, data_dir, batch_size, eval_batch_size, seed, limit, teacher)
        self.model = model
        self.media_dir = media_dir
        self.cropper = cropper if cropper is not None else FaceCropper(
            detector="auto" if model.preprocessing.get("face") else "none")
        self.log = log
        self.progress = progress
        self.reports: dict[str, FrameReport] = {}

    def _build(self, data: CorpusSplit) -> list[FrameExample]:
        p = self.model.preprocessing
        turns = [t for d in data.dialogues for t in d.turns]
        crops, faces, report = load_turn_frames(turns, self.media_dir, self.model.frames, self.cropper, int(p["size"]),
                                                bool(p["grayscale"]), self.progress)
        self.reports[data.split] = report
        if self.log is not None:
            self.log(f"{data.corpus} {data.split}: " + report.summary())
        return [FrameExample(t.example_id, c, data.labels.index(t.label) if t.label is not None else -1, f)
                for t, c, f in zip(turns, crops, faces) if c is not None]

    def _length(self, example: FrameExample) -> int:
        return int(example.crops.shape[0])

    def _collator(self, with_teacher: bool) -> FrameCollator:
        return FrameCollator(self.model.prepare, self.teacher if with_teacher else None)


def output_targets(files: Sequence[str | Path], split_ids: dict[str, Sequence[str]], folder: str | Path,
                   weights: Sequence[float] = (), tau: float = 1.0) -> Any:
    """A :class:`~erc_distill.distill.cache.TeacherCache` (logits only) of teacher-output files (their
    ensemble, :func:`~erc_distill.distill.outputs.ensemble`) for ``split_ids``; content-addressed by the
    files' hashes, weights and τ. Every id must be in every file: a ConfigError names the first missing."""
    from erc_distill.distill.cache import TeacherCache
    from erc_distill.distill.outputs import import_as_cache, read_teacher_outputs

    outputs = [read_teacher_outputs(f) for f in files]
    key = {"files": [o.sha256 for o in outputs], "weights": list(weights), "tau": tau}
    return TeacherCache(import_as_cache(outputs, weights, tau, split_ids, folder, key))
