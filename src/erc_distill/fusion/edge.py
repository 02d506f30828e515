"""The fused student on the robot: exported graphs, one per branch and one for the fusion head, a
per-turn runtime that runs only the branches a turn has, and its latency.

``edge/`` holds::

    text/    a text bundle (``erc-distill stream`` / ``serve`` read it as is) + ``model-features.onnx``
             (outputs logits, features) and its INT8 version ``model-features-int8.onnx``
    audio/   an audio bundle + ``model-features.onnx`` (logits, embedding) and ``model-features-int8.onnx``
    visual/  ``model.onnx`` (pixels, frame_mask -> logits, features) + ``visual.json`` (preprocessing)
    fusion.onnx   (text, audio, visual, audio_mask, visual_mask -> logits, features)
    edge.json     what is there, labels, the parity check

:class:`FusedRuntime` answers one turn at a time: text (with the rolling dialogue context, as the text
runtime does), optionally 16 kHz mono PCM samples and optionally video frames (RGB uint8). A turn
without speech or without a face in view runs the fusion head with that modality masked; a text-only
turn costs the text graph and the (tiny) fusion graph.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INT8_SUFFIX = "-int8"


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def export_fused(folder: str | Path, text_model: Any, tokenizer: Any, context: Any, audio_model: Any | None,
                 visual_model: Any | None, head: Any, test_turns: Sequence[Any], media_dir: Path | None,
                 frames_dir: Path | None, labels: Sequence[str], parity_turns: int = 24,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``folder`` (module doc), quantize the text and audio graphs (ONNX Runtime dynamic INT8), and
    check the float graphs end to end against PyTorch on test turns (fused logits); returns edge.json."""
    import torch

    from erc_distill.atomic import atomic_path, write_json
    from erc_distill.export.bundle import write_audio_bundle, write_bundle
    from erc_distill.export.onnx_export import export_audio_onnx, export_onnx, export_visual_onnx
    from erc_distill.export.quantize import quantize
    from erc_distill.fusion.heads import export_onnx as export_head

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_bundle(text_model, tokenizer, context, folder / "text")
    with atomic_path(folder / "text" / "model-features.onnx") as tmp:
        export_onnx(text_model, tmp, pad_id=tokenizer.pad_token_id or 0, with_features=True)
    quantize("ort-dynamic", folder / "text" / "model-features.onnx", folder / "text" / f"model-features{INT8_SUFFIX}.onnx")
    meta: dict[str, Any] = {"format": "erc-distill-fused/1", "labels": list(labels), "branches": ["text"],
                            "fusion": {"name": head.name, "text_dim": head.text_dim, "audio_dim": head.audio_dim,
                                       "visual_dim": head.visual_dim}}
    if audio_model is not None:
        write_audio_bundle(audio_model, folder / "audio")
        with atomic_path(folder / "audio" / "model-features.onnx") as tmp:
            export_audio_onnx(audio_model, tmp, with_features=True)
        quantize("ort-dynamic", folder / "audio" / "model-features.onnx",
                 folder / "audio" / f"model-features{INT8_SUFFIX}.onnx")
        meta["branches"].append("audio")
    if visual_model is not None:
        (folder / "visual").mkdir(exist_ok=True)
        with atomic_path(folder / "visual" / "model.onnx") as tmp:
            export_visual_onnx(visual_model, tmp, with_features=True)
        write_json(folder / "visual" / "visual.json", {"preprocessing": visual_model.preprocessing,
                                                       "frames": visual_model.frames, "labels": list(labels)})
        meta["branches"].append("visual")
    with atomic_path(folder / "fusion.onnx") as tmp:
        export_head(head, tmp)
    write_json(folder / "edge.json", meta)

    # end-to-end parity: the float graphs through the runtime vs the PyTorch students + head
    runtime = FusedRuntime(folder, int8=False)
    turns = _turns_with_media(test_turns, media_dir, frames_dir, parity_turns)
    worst, n = 0.0, 0
    stand_in = _stand_in_frames(frames_dir, runtime.frames) if visual_model is not None else None
    for dialogue, index in turns:
        turn = dialogue[index]
        audio, frames = load_turn_media(turn, media_dir, frames_dir, runtime.frames)
        frames = stand_in if frames is None else frames  # test turns without video: real frames from elsewhere
        got = runtime.logits(dialogue[: index + 1], audio, frames)
        want = _torch_fused(text_model, tokenizer, context, audio_model, visual_model, head, dialogue[: index + 1],
                            audio, frames, runtime)
        worst = max(worst, float(np.abs(got - want).max()))
        n += 1
    meta.update(parity_max_abs=worst, parity_turns=n, parity_frames="the turns' own, else " + (
        stand_in.source if stand_in is not None else "none"))
    if n and worst > 1e-3:
        from erc_distill.errors import ExportError

        raise ExportError(f"the fused graphs in {folder} differ from PyTorch by {worst:.2e} (allowed 1e-3)")
    write_json(folder / "edge.json", meta)
    log(f"edge graphs -> {folder}: {', '.join(meta['branches'])} + fusion ({head.name}); end-to-end parity max |Δ| "
        f"{worst:.2e} on {n} test turns")
    return meta


def _first_frame_folder(frames_dir: Path | None) -> Path | None:
    """The first folder of frame images under ``frames_dir`` (by path), or None."""
    from erc_distill.media.frames import list_frame_images

    if frames_dir is None or not Path(frames_dir).is_dir():
        return None
    folders = sorted(p for p in Path(frames_dir).rglob("*") if p.is_dir() and list_frame_images(p))
    return folders[0] if folders else None


def _stand_in_frames(frames_dir: Path | None, n: int) -> Any:
    """Frames of the first frame folder under ``frames_dir`` (None if there is none), so the visual
    graph is part of the parity check even when no test turn has video."""
    from erc_distill.media.frames import load_frames

    folder = _first_frame_folder(frames_dir)
    return load_frames(folder, n) if folder is not None else None


def _torch_fused(text_model, tokenizer, context, audio_model, visual_model, head, history, audio, frames,
                 runtime: "FusedRuntime") -> np.ndarray:
    import torch

    from erc_distill.data.context import ContextBuilder

    builder = ContextBuilder(tokenizer, context)
    stream = builder.stream()
    for t in history:
        x = stream.push(t.speaker, t.text)
    with torch.no_grad():
        out = text_model(torch.tensor([x.input_ids]), torch.ones(1, len(x.input_ids), dtype=torch.long),
                         torch.tensor([x.mask_index]))
        t = out.features
        a = torch.zeros(1, head.audio_dim)
        v = torch.zeros(1, head.visual_dim)
        am = torch.zeros(1)
        vm = torch.zeros(1)
        if audio is not None and audio_model is not None:
            inputs, lengths = audio_model.prepare([audio])
            a, am = audio_model(inputs, lengths).features, torch.ones(1)
        if frames is not None and visual_model is not None:
            crops = runtime.crops(frames)
            pixels, mask = visual_model.prepare([crops])
            v, vm = visual_model(pixels, mask).features, torch.ones(1)
        return head(t, a, v, am, vm).logits.numpy()


@dataclass
class TurnResult:
    """One turn's answer: ``probabilities`` [C], ``label``, which modalities were used, milliseconds."""

    probabilities: np.ndarray
    label: str
    used: tuple[str, ...]
    ms: float


@dataclass
class Fused:
    """What :meth:`FusedRuntime.fuse` computed for one turn: the fused ``logits`` [1, C], the modalities
    ``used``, with frames ``visual`` = ``{"frames": used, "faces": frames with a face found}``, and with
    speech the speech student's own ``audio_logits`` [1, C] (its graph gives both, no second run)."""

    logits: np.ndarray
    used: tuple[str, ...]
    visual: dict[str, int] | None = None
    audio_logits: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        """softmax of the fused logits, [C]."""
        return _softmax(self.logits)[0]


class FusedRuntime:
    """Loads ``edge/`` (module doc). ``int8``: the INT8 text / audio graphs (the float ones otherwise)."""

    def __init__(self, folder: str | Path, threads: int | None = None, int8: bool = True,
                 face_detector: str = "auto") -> None:
        from erc_distill.export.onnx_export import ort_session
        from erc_distill.media.frames import FaceCropper
        from erc_distill.runtime.bundle import Bundle

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "edge.json").read_text())
        self.labels = tuple(self.meta["labels"])
        suffix = INT8_SUFFIX if int8 else ""
        self.text = Bundle.load(self.folder / "text", threads=threads, verify=False, spin=False)
        self.text_session = ort_session(self.folder / "text" / f"model-features{suffix}.onnx", threads, spin=False)
        self.builder = self.text.builder()
        self.audio_session = self.visual_session = None
        self.frames = 0
        if "audio" in self.meta["branches"]:
            from erc_distill.runtime.audio_bundle import AudioBundle

            self.audio = AudioBundle.load(self.folder / "audio", threads=threads, verify=False, spin=False)
            self.audio_session = ort_session(self.folder / "audio" / f"model-features{suffix}.onnx", threads, spin=False)
        if "visual" in self.meta["branches"]:
            vmeta = json.loads((self.folder / "visual" / "visual.json").read_text())
            self.visual_pre = vmeta["preprocessing"]
            self.frames = int(vmeta["frames"])
            self.visual_session = ort_session(self.folder / "visual" / "model.onnx", threads, spin=False)
            self.cropper = FaceCropper(detector=face_detector if self.visual_pre.get("face") else "none")
        self.fusion_session = ort_session(self.folder / "fusion.onnx", threads, spin=False)
        f = self.meta["fusion"]
        self.dims = (f["audio_dim"], f["visual_dim"])

    def crops(self, frames: Any) -> list[np.ndarray]:
        """Face crops (or whole frames) of ``frames`` (:class:`~erc_distill.media.frames.Frames` or images)."""
        return self.cropper.crop(frames).images

    @classmethod
    def is_edge(cls, folder: str | Path) -> bool:
        """Whether ``folder`` is a fused student's ``edge/`` (it has ``edge.json``)."""
        return (Path(folder) / "edge.json").is_file()

    def last_input(self, history: Sequence[Any]) -> Any:
        """The built input of the last turn of ``history`` (objects with speaker, text), from a fresh context."""
        stream = self.builder.stream()
        for t in history:
            x = stream.push(t.speaker, t.text)
        return x

    def text_features(self, history: Sequence[Any]) -> np.ndarray:
        """The text graph's features [1, Dt] of the last turn of ``history``."""
        return self.input_features(self.last_input(history))

    def input_features(self, x: Any) -> np.ndarray:
        """The text graph's features [1, Dt] of one built input (:class:`~erc_distill.data.context.ModelInput`)."""
        feed = {"input_ids": np.array([x.input_ids], np.int64), "attention_mask": np.ones((1, len(x.input_ids)), np.int64),
                "mask_index": np.array([x.mask_index], np.int64)}
        return self.text_session.run(None, feed)[1]

    def audio_features(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The speech graph's logits [1, C] and pooled features [1, Da] of mono 16 kHz float samples
        (log-mel computed here)."""
        features, lengths = self.audio.features([samples])
        logits, pooled = self.audio_session.run(None, {"features": features, "lengths": lengths.astype(np.int64)})
        return logits, pooled

    def visual_features(self, frames: Any, timings: dict[str, float] | None = None) -> tuple[np.ndarray, int, int]:
        """The visual graph's features [1, Dv] of a turn's frames (:class:`~erc_distill.media.frames.Frames`
        or RGB uint8 images; face-cropped here, at most ``self.frames`` of them, uniformly picked), and
        how many frames were used and in how many a face was found."""
        from erc_distill.media.frames import frames_to_array, uniform_indices

        t0 = time.perf_counter()
        crops = self.cropper.crop(frames)
        images = crops.images
        t1 = time.perf_counter()
        if len(images) > self.frames:
            images = [images[i] for i in uniform_indices(len(images), self.frames)]
        p = self.visual_pre
        size, channels = int(p["size"]), 1 if p["grayscale"] else 3
        pixels = np.zeros((1, self.frames, channels, size, size), np.float32)
        mask = np.zeros((1, self.frames), bool)
        pixels[0, : len(images)] = frames_to_array(images, size, p["mean"], p["std"], p["grayscale"])
        mask[0, : len(images)] = True
        v = self.visual_session.run(None, {"pixels": pixels, "frame_mask": mask})[1]
        if timings is not None:
            timings["face crop"] = t1 - t0
            timings["visual graph"] = time.perf_counter() - t1
        return v, len(images), crops.found

    def fuse(self, x: Any, audio: np.ndarray | None = None, frames: Any = None,
             timings: dict[str, float] | None = None) -> Fused:
        """The fused answer for one built input with its speech / frames when given (a modality this edge
        has no branch for is ignored). ``timings``: filled with seconds per part (text graph, speech
        log-mel + graph, face crop, visual graph, fusion graph)."""
        clock = time.perf_counter
        t0 = clock()
        t = self.input_features(x)
        t1 = clock()
        a = np.zeros((1, self.dims[0]), np.float32)
        v = np.zeros((1, self.dims[1]), np.float32)
        am = np.zeros(1, np.float32)
        vm = np.zeros(1, np.float32)
        used, seen, audio_logits = ["text"], None, None
        parts: dict[str, float] = {"text graph": t1 - t0}
        if audio is not None and self.audio_session is not None:
            (audio_logits, a), am = self.audio_features(audio), np.ones(1, np.float32)
            used.append("audio")
            parts["speech log-mel + graph"] = clock() - t1
        if frames is not None and self.visual_session is not None:
            v, n, faces = self.visual_features(frames, parts)
            vm, seen = np.ones(1, np.float32), {"frames": n, "faces": faces}
            used.append("visual")
        t2 = clock()
        z = self.fusion_session.run(None, {"text": t, "audio": a, "visual": v, "audio_mask": am, "visual_mask": vm})[0]
        parts["fusion graph"] = clock() - t2
        if timings is not None:
            timings.update(parts)
        return Fused(z, tuple(used), seen, audio_logits)

    def logits(self, history: Sequence[Any], audio: np.ndarray | None = None, frames: Any = None) -> np.ndarray:
        """Fused logits [1, C] of the last turn of ``history``, with its speech / frames when given."""
        return self.fuse(self.last_input(history), audio, frames).logits

    def classify(self, history: Sequence[Any], audio: np.ndarray | None = None, frames: Any = None) -> TurnResult:
        t0 = time.perf_counter()
        out = self.fuse(self.last_input(history), audio, frames)
        p = out.probabilities
        return TurnResult(p, self.labels[int(p.argmax())], out.used, 1000 * (time.perf_counter() - t0))


def load_turn_media(turn: Any, media_dir: Path | None, frames_dir: Path | None, n_frames: int) -> tuple[Any, Any]:
    """A turn's speech samples (16 kHz mono) and frames, each None when absent or unreadable."""
    from erc_distill.media.audio import MediaError, load_audio
    from erc_distill.media.clips import locate_clip
    from erc_distill.media.frames import load_frames, locate_frames

    audio = frames = None
    where = locate_clip(turn, media_dir) if media_dir is not None else None
    if where is not None and where.path.is_file():
        try:
            audio = load_audio(where.path, start=where.start, end=where.end).samples
        except MediaError:
            audio = None
    located = locate_frames(turn, frames_dir) if frames_dir is not None and n_frames else None
    if located is not None:
        try:
            frames = load_frames(located, n_frames)
        except MediaError:
            frames = None
    return audio, frames


def _turns_with_media(turns: Sequence[Any], media_dir: Path | None, frames_dir: Path | None,
                      limit: int) -> list[tuple[list[Any], int]]:
    """(dialogue's turns, index) of the first ``limit`` turns that have speech or frames (else any turns)."""
    from erc_distill.media.clips import resolve_media
    from erc_distill.media.frames import locate_frames

    dialogues: dict[str, list[Any]] = {}
    for t in turns:
        dialogues.setdefault(t.dialogue_id, []).append(t)
    picked, fallback = [], []
    for d in dialogues.values():
        for i, t in enumerate(d):
            path = resolve_media(t, media_dir) if media_dir is not None else None
            has = (path is not None and path.is_file()) or (frames_dir is not None and locate_frames(t, frames_dir))
            (picked if has else fallback).append((d, i))
    return (picked or fallback)[:limit]


def profile_fused(folder: str | Path, test_turns: Sequence[Any], media_dir: Path | None, frames_dir: Path | None,
                  n_turns: int = 100, threads: int = 2, face_detector: str = "auto",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Per-turn latency (batch 1, ``threads`` ONNX Runtime threads, INT8 text / audio graphs) as the robot
    runs it: each dialogue a rolling context (every turn tokenized once), and for ``n_turns`` test turns
    with speech: text only (context + text graph + fusion), text + speech (+ WAV decode, log-mel, speech
    graph) and text + speech + 8 frames (+ JPEG decode, face detection and crop, visual graph; the frames
    are a real frame folder's, the test turns having none). p50 / p99 per path, and p50 per part."""
    from erc_distill.machine import machine_info, machine_summary
    from erc_distill.media.audio import load_audio
    from erc_distill.media.clips import locate_clip
    from erc_distill.media.frames import load_frames

    runtime = FusedRuntime(folder, threads=threads, int8=True, face_detector=face_detector)
    picked = _turns_with_media(test_turns, media_dir, frames_dir, n_turns)
    frames_source = _first_frame_folder(frames_dir) if runtime.visual_session is not None else None
    paths = ["text only", "text + speech"] + (["text + speech + face frames"] if frames_source else [])
    times: dict[str, list[float]] = {p: [] for p in paths}
    parts: dict[str, list[float]] = {}
    clock = time.perf_counter
    wanted: dict[int, tuple[list[Any], set[int]]] = {}
    for dialogue, index in picked:
        wanted.setdefault(id(dialogue), (dialogue, set()))[1].add(index)
    for _ in range(3):  # warm-up
        runtime.logits(picked[0][0][: picked[0][1] + 1])
    for dialogue, indices in wanted.values():
        stream = runtime.builder.stream()
        for i, turn in enumerate(dialogue[: max(indices) + 1]):
            t0 = clock()
            x = stream.push(turn.speaker, turn.text)
            build = clock() - t0
            if i not in indices:
                continue
            runs: dict[str, dict[str, float]] = {}
            t0 = clock()
            runtime.fuse(x, timings=runs.setdefault("text only", {}))
            times["text only"].append(build + clock() - t0)
            where = locate_clip(turn, media_dir) if media_dir is not None else None
            if where is None or not where.path.is_file():
                continue
            t0 = clock()
            audio = load_audio(where.path, start=where.start, end=where.end).samples
            decode = clock() - t0
            runtime.fuse(x, audio, timings=runs.setdefault("text + speech", {}))
            times["text + speech"].append(build + clock() - t0)
            if frames_source is not None:
                t0 = clock()
                audio = load_audio(where.path, start=where.start, end=where.end).samples
                t1 = clock()
                frames = load_frames(frames_source, runtime.frames)
                t2 = clock()
                full = runs.setdefault("text + speech + face frames", {"speech decode": t1 - t0,
                                                                       "frames decode": t2 - t1})
                runtime.fuse(x, audio, frames, timings=full)
                times["text + speech + face frames"].append(build + clock() - t0)
            last = runs.get("text + speech + face frames") or runs["text + speech"]
            last.setdefault("speech decode", decode)
            for name, sec in {"context + tokenize": build, **last}.items():
                parts.setdefault(name, []).append(sec)
    ms = lambda v, q: 1000 * float(np.percentile(v, q))  # noqa: E731
    out_paths = {name: {"p50_ms": ms(v, 50), "p99_ms": ms(v, 99), "n": len(v)} for name, v in times.items() if v}
    out = {"threads": threads, "turns": len(picked), "int8": True, "cpu": machine_summary(machine_info()),
           "paths": out_paths, "parts_p50_ms": {k: ms(v, 50) for k, v in parts.items()},
           "frames_source": str(frames_source) if frames_source else None}
    for name, p in out_paths.items():
        log(f"latency {name}: p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms (n={p['n']})")
    log("parts (p50 ms): " + ", ".join(f"{k} {v:.1f}" for k, v in out["parts_p50_ms"].items()))
    return out
