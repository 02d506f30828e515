"""Streaming, per-turn emotion recognition: the robot hears a turn, gets a label.

Each conversation keeps its rolling context (:class:`StreamingContext`: every turn tokenized once);
``push`` builds turn t's input from turns <= t, runs the bundle's graph, and returns the label, the
probabilities and the latency (build + tokenize + inference).

With an audio bundle (:class:`~erc_distill.runtime.AudioBundle`) a turn may carry its speech: ``push``
then also classifies the clip (decode + log-mel + the audio graph) and the prediction carries that
answer in ``audio``. A clip that cannot be used (missing file, undecodable, too short) is masked for
the turn: the text prediction still comes, with ``audio_error`` saying why.

With a fused student (:class:`~erc_distill.fusion.edge.FusedRuntime`, the ``edge/`` folder of an
``erc-distill multimodal`` run) the turn's label is the fusion head's: text features, plus the speech
and the video frames the turn carries, each masked when absent or unusable (a turn with only text is
answered from text, as before). :attr:`Prediction.modalities` says which were used.

A recognizer runs for hours on whatever it is fed, so it is bounded: a text longer than
``max_text_chars`` is rejected (:class:`~erc_distill.errors.DataError`; the caller decides whether to
cut it and retry), at most ``max_conversations`` contexts are kept (the least recently used one is
evicted), and a conversation idle for more than ``idle_ttl_s`` seconds is forgotten. A rejected turn
leaves its conversation exactly as it was.

:func:`serve_lines` is the ``erc-distill stream`` protocol (JSON lines in, JSON lines out) on top.
"""

from __future__ import annotations

import base64
import dataclasses
import binascii
import json
import math
import time
from pathlib import Path
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from erc_distill.data.context import ModelInput, StreamingContext
from erc_distill.errors import BundleError, DataError, UserError
from erc_distill.runtime.bundle import Bundle, json_type

MAX_NAME_CHARS = 200
"""Default cap on a speaker name and a conversation id (characters)."""


MIN_AUDIO_SAMPLES = 400
"""Shortest clip classified (25 ms at 16 kHz: one analysis window); a shorter one is masked."""


@dataclass(frozen=True)
class AudioPrediction:
    """The audio bundle's answer for one turn's clip."""

    label: str
    probabilities: dict[str, float]
    latency_ms: float
    """Log-mel features + the audio graph (decoding a file or PCM happens before, in the caller)."""
    seconds: float
    """Length of the clip classified (after any cut)."""
    cut_seconds: float = 0.0
    """How much of the clip ``max_audio_seconds`` dropped."""


@dataclass(frozen=True)
class Prediction:
    conversation: str
    turn: int
    speaker: str
    label: str
    probabilities: dict[str, float]
    latency_ms: float
    tokens: int
    """Length of the built input."""
    audio: AudioPrediction | None = None
    """The audio bundle's answer when the turn came with a usable clip."""
    audio_error: str | None = None
    """Why the turn's clip was masked (missing, unreadable, too short), when it was."""
    modalities: tuple[str, ...] = ("text",)
    """What the label was computed from (a fused student: ``text`` plus ``audio`` / ``visual``)."""
    visual: dict[str, int] | None = None
    """With frames: ``{"frames": used, "faces": frames where a face was found}``."""
    visual_error: str | None = None
    """Why the turn's frames were masked, when they were."""


def _check_text(value: Any, field: str, limit: int, setting: str) -> str:
    """A str of at most ``limit`` characters that is valid Unicode (encodable as UTF-8)."""
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {json_type(value)}", field=field)
    if len(value) > limit:
        raise DataError(f"{len(value)} characters, over the limit of {limit} ({setting})", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"contains a lone surrogate (U+{ord(value[err.start]):04X} at character {err.start}), "
                        "which is not valid Unicode text", field=field) from None
    return value


class StreamingRecognizer:
    """Classifies turns as they come, one rolling context per conversation id.

    ``max_text_chars``: longest accepted turn text; ``max_conversations``: contexts kept at once
    (least recently used evicted first); ``idle_ttl_s``: a conversation without a turn for longer is
    forgotten (checked on each :meth:`push`; None: never); ``clock``: seconds, monotonic (a fake one in
    tests); ``max_name_chars``: longest speaker name and conversation id.

    ``audio_bundle``: an :class:`~erc_distill.runtime.AudioBundle` that classifies the clip a turn may
    carry; ``max_audio_seconds``: longer clips keep their first ``max_audio_seconds`` (the cut is
    reported in :attr:`AudioPrediction.cut_seconds`, never silent).

    ``fused``: a :class:`~erc_distill.fusion.edge.FusedRuntime` (``bundle`` is then its text bundle):
    the label is the fusion head's, from the text and whatever speech / frames the turn carries;
    ``max_frames``: most frames accepted with one turn (the visual branch samples its own count).

    ``evicted`` and ``expired`` count the conversations dropped by each bound, ``ended`` those closed
    with :meth:`end`; :meth:`stats` returns them with the number open.
    """

    def __init__(self, bundle: Bundle, max_text_chars: int = 2000, max_conversations: int = 1000,
                 idle_ttl_s: float | None = 3600.0, clock: Callable[[], float] = time.monotonic, *,
                 max_name_chars: int = MAX_NAME_CHARS, audio_bundle: Any = None,
                 max_audio_seconds: float = 30.0, fused: Any = None, max_frames: int = 64) -> None:
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        if idle_ttl_s is not None and not idle_ttl_s > 0:
            raise ValueError(f"idle_ttl_s must be > 0 or None, got {idle_ttl_s}")
        if max_name_chars < 1:
            raise ValueError(f"max_name_chars must be >= 1, got {max_name_chars}")
        if not max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {max_audio_seconds}")
        if audio_bundle is not None and getattr(audio_bundle, "modality", None) != "audio":
            raise ValueError(f"audio_bundle must be an AudioBundle, got {type(audio_bundle).__name__}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.fused = fused
        self.max_frames = max_frames
        if fused is not None and audio_bundle is None:
            audio_bundle = getattr(fused, "audio", None)  # the fused student's own speech branch
        self.bundle = bundle
        self.audio_bundle = audio_bundle
        self.max_audio_seconds = float(max_audio_seconds)
        self.builder = bundle.builder()
        self.max_text_chars = max_text_chars
        self.max_conversations = max_conversations
        self.idle_ttl_s = idle_ttl_s
        self.max_name_chars = max_name_chars
        self.clock = clock
        self.conversations: OrderedDict[str, StreamingContext] = OrderedDict()
        """Open conversations, least recently used first."""
        self._last_used: dict[str, float] = {}
        self.evicted = 0
        self.expired = 0
        self.ended = 0

    def check_turn(self, speaker: Any, text: Any, conversation: Any = "default") -> tuple[str, str, str]:
        """Validate a turn without touching any state; returns ``(speaker, text, conversation)``.

        Raises :class:`DataError` (with ``field`` set) for a value that is not a string, is too long, or
        holds a lone surrogate. The conversation id may also be an int (it becomes its decimal string).
        """
        conversation = self.check_conversation(conversation)
        speaker = _check_text(speaker, "speaker", self.max_name_chars, "max_name_chars")
        text = _check_text(text, "text", self.max_text_chars, "max_text_chars")
        return speaker, text, conversation

    def check_conversation(self, conversation: Any) -> str:
        """A conversation id as the recognizer keys it (a str; an int becomes its decimal string)."""
        if isinstance(conversation, int) and not isinstance(conversation, bool):
            conversation = str(conversation)
        elif not isinstance(conversation, str):
            raise DataError(f"must be a string or an integer, got {json_type(conversation)}", field="conversation")
        return _check_text(conversation, "conversation", self.max_name_chars, "max_name_chars")

    def expire(self) -> int:
        """Forget the conversations idle for more than ``idle_ttl_s``; returns how many."""
        if self.idle_ttl_s is None:
            return 0
        now, n = self.clock(), 0
        while self.conversations:
            oldest = next(iter(self.conversations))
            if now - self._last_used[oldest] <= self.idle_ttl_s:
                break
            self._drop(oldest)
            n += 1
        self.expired += n
        return n

    def prepare(self, speaker: str, text: str, conversation: str = "default") -> "PendingTurn":
        """Validate a turn and build its input from the conversation's rolling context.

        The first half of :meth:`push`, for a caller that runs the model itself (the server batches
        the inputs of several conversations into one call): pass the returned turn's ``input`` to the
        bundle, then :meth:`complete` it with its probabilities, or :meth:`cancel` it. Until then the
        conversation's context has moved on by this turn but is not yet committed; no other turn of
        the same conversation may be prepared in between (the caller serializes each conversation).
        Raises :class:`DataError` as :meth:`push` does, leaving the conversation unchanged.
        """
        start = time.perf_counter()
        speaker, text, conversation = self.check_turn(speaker, text, conversation)
        self.expire()
        context = self.conversations.get(conversation)
        if context is None:
            context = self.builder.stream()
        undo = _Undo(context, speaker)
        try:
            x = context.push(speaker, text)
        except BaseException as err:
            undo(context)
            if isinstance(err, ValueError) and not isinstance(err, UserError):  # the builder's own checks
                raise DataError(f"cannot build this turn's input: {err}") from err
            raise
        return PendingTurn(conversation, speaker, x, start, context, undo)

    def complete(self, turn: "PendingTurn", probabilities: np.ndarray) -> Prediction:
        """Commit a prepared turn with its probabilities (one row, in the bundle's label order).

        Non-finite probabilities cancel the turn and raise :class:`BundleError`."""
        p = np.asarray(probabilities)
        if not np.isfinite(p).all():
            self.cancel(turn)
            raise BundleError(f"{self.bundle.folder / self.bundle.model_file}: the graph returned "
                              f"non-finite logits for conversation {turn.conversation!r}, turn {turn.input.turn_index}")
        self._touch(turn.conversation, turn.context)
        latency = 1000 * (time.perf_counter() - turn.started)
        labels, x = self.bundle.labels, turn.input
        return Prediction(turn.conversation, x.turn_index, turn.speaker, labels[int(p.argmax())],
                          {label: float(v) for label, v in zip(labels, p)}, latency, len(x))

    def cancel(self, turn: "PendingTurn") -> None:
        """Undo a prepared turn: its conversation's context is as it was before :meth:`prepare`."""
        turn.undo(turn.context)

    def classify_audio(self, audio: Any) -> AudioPrediction:
        """The audio bundle's answer for one clip: a 16 kHz :class:`~erc_distill.media.AudioClip`
        (:func:`~erc_distill.media.load_audio` resamples to it) or mono float samples at 16 kHz in [-1, 1].

        Raises :class:`DataError` (``field="audio"``) when there is no audio bundle or the samples are
        not a 1-D float array, and :class:`~erc_distill.media.MediaError` for a clip too short to
        classify (under :data:`MIN_AUDIO_SAMPLES`) or holding non-finite samples.
        """
        from erc_distill.media.audio import TARGET_RATE

        if self.audio_bundle is None:
            raise DataError("this recognizer has no audio bundle (pass audio_bundle=, or --audio-bundle to "
                            "erc-distill stream)", field="audio")
        start = time.perf_counter()
        samples, cut = self.check_samples(audio)
        p = self.audio_bundle.probabilities([samples])[0]
        if not np.isfinite(p).all():
            bundle = self.audio_bundle
            raise BundleError(f"{bundle.folder / bundle.model_file}: the graph returned non-finite logits for a "
                              f"{len(samples) / TARGET_RATE:.2f} s clip")
        labels = self.audio_bundle.labels
        return AudioPrediction(labels[int(p.argmax())], {label: float(v) for label, v in zip(labels, p)},
                               1000 * (time.perf_counter() - start), len(samples) / TARGET_RATE, cut)

    def check_samples(self, audio: Any) -> tuple[np.ndarray, float]:
        """A clip as float32 16 kHz samples cut to ``max_audio_seconds``, and the seconds cut; the errors of
        :meth:`classify_audio`."""
        from erc_distill.media.audio import TARGET_RATE, AudioClip, MediaError

        cut = 0.0
        if isinstance(audio, AudioClip):
            if audio.sample_rate != TARGET_RATE:
                raise DataError(f"the clip is at {audio.sample_rate} Hz; the audio bundle reads {TARGET_RATE} Hz "
                                "(load it with load_audio, which resamples)", field="audio")
            samples, cut = audio.samples, audio.cut_seconds
        elif isinstance(audio, np.ndarray):
            if audio.ndim != 1 or audio.dtype.kind != "f":
                raise DataError(f"expected mono float samples (one dimension), got a {audio.dtype} array of shape "
                                f"{audio.shape}", field="audio")
            samples = audio
        else:
            raise DataError(f"expected an AudioClip or a float numpy array, got {type(audio).__name__}", field="audio")
        keep = int(self.max_audio_seconds * TARGET_RATE)
        if len(samples) > keep:
            cut += (len(samples) - keep) / TARGET_RATE
            samples = samples[:keep]
        if len(samples) < MIN_AUDIO_SAMPLES:
            raise MediaError(f"the clip has {len(samples)} samples; at least {MIN_AUDIO_SAMPLES} "
                             f"({1000 * MIN_AUDIO_SAMPLES / TARGET_RATE:g} ms) are needed", file="<audio>")
        samples = np.asarray(samples, dtype=np.float32)
        if not np.isfinite(samples).all():
            raise MediaError("the clip holds non-finite samples", file="<audio>")
        return samples, cut

    def check_frames(self, frames: Any) -> list[np.ndarray]:
        """A turn's frames as a list of uint8 RGB ``[H, W, 3]`` images: a :class:`~erc_distill.media.frames.Frames`,
        a uint8 ``[N, H, W, 3]`` array or a list of ``[H, W, 3]`` arrays (at most ``max_frames``).
        Raises :class:`DataError` (``field="frames"``) otherwise, or without a visual branch."""
        from erc_distill.media.frames import Frames

        if self.fused is None or getattr(self.fused, "visual_session", None) is None:
            raise DataError("this recognizer has no visual branch (a fused student's edge folder with a visual "
                            "student: erc-distill stream --edge RUN/multimodal/edge)", field="frames")
        images = list(frames.images) if isinstance(frames, Frames) else list(frames) \
            if isinstance(frames, (list, tuple, np.ndarray)) else None
        if images is None:
            raise DataError(f"expected Frames, an array or a list of images, got {type(frames).__name__}", field="frames")
        if not images:
            raise DataError("no frames given", field="frames")
        if len(images) > self.max_frames:
            raise DataError(f"{len(images)} frames, over the limit of {self.max_frames} (max_frames)", field="frames")
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3 \
                    or min(im.shape[:2]) < 1:
                what = f"a {im.dtype} array of shape {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise DataError(f"frame {i}: expected uint8 RGB [H, W, 3], got {what}", field="frames")
        return images

    def push(self, speaker: str, text: str, conversation: str = "default", audio: Any = None,
             frames: Any = None) -> Prediction:
        """Classify the next turn of ``conversation`` (a new id starts a new conversation).

        Raises :class:`DataError` for a turn that fails :meth:`check_turn` or whose input cannot be
        built (e.g. a speaker name too long for the prompt); the conversation is then left unchanged.
        Empty text is a valid turn (a non-verbal or inaudible one): the model still sees the speaker
        and the context, exactly as the offline builder does.

        ``audio``: the turn's speech, as :meth:`classify_audio` takes it (needs an audio bundle); a
        clip that cannot be classified is masked (:attr:`Prediction.audio_error` says why) and the
        text prediction still comes.

        ``frames``: the turn's video frames, as :meth:`check_frames` takes them (needs a fused student
        with a visual branch). With a fused student the label is the fusion head's, from the text and
        the speech / frames that could be used.
        """
        from erc_distill.media.audio import MediaError

        if self.fused is not None:
            return self._push_fused(speaker, text, conversation, audio, frames)
        if frames is not None:
            self.check_frames(frames)  # raises: no visual branch
        audio_prediction, audio_error = None, None
        if audio is not None:
            self.check_turn(speaker, text, conversation)  # a bad turn costs no audio inference
            try:
                audio_prediction = self.classify_audio(audio)
            except MediaError as err:
                audio_error = str(err)
        prediction = self._push_text(speaker, text, conversation)
        if audio is None:
            return prediction
        return dataclasses.replace(prediction, audio=audio_prediction, audio_error=audio_error)

    def _push_fused(self, speaker: str, text: str, conversation: str, audio: Any, frames: Any) -> Prediction:
        from erc_distill.media.audio import MediaError

        self.check_turn(speaker, text, conversation)
        images = self.check_frames(frames) if frames is not None else None
        samples = audio_error = None
        cut = 0.0
        if audio is not None:
            try:
                samples, cut = self.check_samples(audio)
            except MediaError as err:
                audio_error = str(err)
        turn = self.prepare(speaker, text, conversation)
        parts: dict[str, float] = {}
        try:
            out = self.fused.fuse(turn.input, samples, images, timings=parts)
        except BaseException as err:
            self.cancel(turn)
            if isinstance(err, ValueError) and not isinstance(err, UserError):
                raise DataError(f"cannot build this turn's input: {err}") from err
            raise
        audio_prediction = None
        if out.audio_logits is not None:  # the speech student's own answer, from the same run of its graph
            from erc_distill.media.audio import TARGET_RATE

            z = out.audio_logits[0] - out.audio_logits[0].max()
            pa = np.exp(z) / np.exp(z).sum()
            labels = self.fused.labels
            audio_prediction = AudioPrediction(labels[int(pa.argmax())], {k: float(v) for k, v in zip(labels, pa)},
                                               1000 * parts["speech log-mel + graph"], len(samples) / TARGET_RATE, cut)
        prediction = self.complete(turn, out.probabilities)
        return dataclasses.replace(prediction, audio=audio_prediction, audio_error=audio_error, modalities=out.used,
                                   visual=out.visual)

    def _push_text(self, speaker: str, text: str, conversation: str) -> Prediction:
        turn = self.prepare(speaker, text, conversation)
        try:
            p = self.bundle.probabilities([turn.input])[0]
        except BaseException as err:
            self.cancel(turn)
            if isinstance(err, ValueError) and not isinstance(err, UserError):
                raise DataError(f"cannot build this turn's input: {err}") from err
            raise
        return self.complete(turn, p)

    def end(self, conversation: str = "default") -> bool:
        """Forget a conversation's context; True if it was open."""
        if conversation not in self.conversations:
            return False
        self._drop(conversation)
        self.ended += 1
        return True

    def stats(self) -> dict[str, int]:
        """``{"open", "evicted", "expired", "ended"}`` conversation counts."""
        return {"open": len(self.conversations), "evicted": self.evicted, "expired": self.expired,
                "ended": self.ended}

    def _touch(self, conversation: str, context: StreamingContext) -> None:
        is_new = conversation not in self.conversations  # also one expired while its turn was in flight
        self.conversations[conversation] = context
        self.conversations.move_to_end(conversation)
        self._last_used[conversation] = self.clock()
        if is_new:
            while len(self.conversations) > self.max_conversations:
                self._drop(next(iter(self.conversations)))
                self.evicted += 1

    def _drop(self, conversation: str) -> None:
        del self.conversations[conversation]
        del self._last_used[conversation]


@dataclass(frozen=True)
class PendingTurn:
    """A turn built by :meth:`StreamingRecognizer.prepare`, waiting for its probabilities."""

    conversation: str
    speaker: str
    input: ModelInput
    """The built model input (feed it to :meth:`Bundle.probabilities`)."""
    started: float
    """``time.perf_counter()`` when the turn was received (the prediction's latency starts here)."""
    context: StreamingContext
    undo: "_Undo"


class _Undo:
    """Restores a :class:`StreamingContext` to its state before one ``push``.

    ``push`` appends the turn and may drop any number of the oldest ones (the ``k + 1`` bound, and
    turns that can never fit ``max_len`` again), so the window's turns are kept by reference: O(window).
    """

    def __init__(self, context: StreamingContext, speaker: str) -> None:
        self.window = list(context._window)
        self.turns_seen = context.turns_seen
        self.new_speaker = speaker if speaker not in context._speakers else None

    def __call__(self, context: StreamingContext) -> None:
        window = context._window
        if len(window) != len(self.window) or any(a is not b for a, b in zip(window, self.window)):
            window.clear()
            window.extend(self.window)
        if self.new_speaker is not None:
            context._speakers.pop(self.new_speaker, None)
        context.turns_seen = self.turns_seen


# -- the `erc-distill stream` protocol --------------------------------------------------------------

LINE_BYTES_PER_CHAR = 12
"""``json.dumps`` (ensure_ascii) writes a character outside the BMP as 12 bytes (``\\ud83d\\ude00``)."""
LINE_OVERHEAD_BYTES = 4096
"""Room for the keys, the speaker and the conversation id."""


PCM_RATE_FOR_LIMIT = 48_000
"""The line limit leaves room for ``max_audio_seconds`` of base64 PCM at up to this rate."""

FRAME_BYTES_FOR_LIMIT = 256 * 1024
"""With a visual branch, the line limit leaves room for ``max_frames`` encoded images of up to this size
(a 640×480 JPEG is ~50 KB)."""


def default_line_limit(recognizer: StreamingRecognizer) -> int:
    """Longest line :func:`serve_lines` parses: any text under ``max_text_chars`` however it is escaped,
    plus, with an audio bundle, ``max_audio_seconds`` of 48 kHz PCM16 in base64 (4 bytes per 3)."""
    limit = LINE_BYTES_PER_CHAR * recognizer.max_text_chars + LINE_OVERHEAD_BYTES
    if recognizer.audio_bundle is not None:
        limit += 4 * math.ceil(2 * PCM_RATE_FOR_LIMIT * recognizer.max_audio_seconds / 3)
    if _has_visual(recognizer):
        limit += 4 * math.ceil(FRAME_BYTES_FOR_LIMIT * recognizer.max_frames / 3)
    return limit


def _has_visual(recognizer: StreamingRecognizer) -> bool:
    return getattr(recognizer.fused, "visual_session", None) is not None


def _bounded_lines(lines: Iterable[str | bytes], limit: int) -> Iterator[tuple[str | bytes | None, int, str]]:
    """``(line, size, unit)``; ``line`` is None for a line over ``limit`` ``unit`` s (bytes, or
    characters for text lines).

    From a file object (anything with ``readline``, e.g. ``sys.stdin.buffer``) at most ``limit + 1``
    units are read at a time, so an endless line never sits in memory whole.
    """
    readline = getattr(lines, "readline", None)
    if readline is None:
        for line in lines:
            yield (line if len(line) <= limit else None), len(line), _unit(line)
        return
    while True:
        line = readline(limit + 1)
        if not line:
            return
        newline = b"\n" if isinstance(line, bytes) else "\n"
        if len(line) <= limit or line.endswith(newline):
            yield line, len(line), _unit(line)
            continue
        size, unit = len(line), _unit(line)
        while not line.endswith(newline):  # skip the rest of the oversize line
            line = readline(limit + 1)
            if not line:
                break
            size += len(line)
        yield None, size, unit


def _unit(line: str | bytes) -> str:
    return "bytes" if isinstance(line, (bytes, bytearray)) else "characters"


def _error_text(err: DataError) -> str:
    return (f"field {err.field!r}: " if err.field else "") + err.message


def serve_lines(recognizer: StreamingRecognizer, lines: Iterable[str | bytes], write: Callable[[str], None], *,
                max_line_bytes: int | None = None) -> dict[str, int]:
    """Run the ``erc-distill stream`` protocol: one JSON object per input line, one JSON line out for each.

    Input line (UTF-8): ``{"conversation": ID, "speaker": S, "text": T}``; ``conversation`` is optional
    (default ``"default"``; a string, or an integer that becomes its decimal string), ``speaker`` and
    ``text`` are required strings (``text`` may be empty: a turn without words still moves the
    context). Other keys are ignored. ``"end": true`` ends the conversation after the line: alone
    (``{"conversation": ID, "end": true}``) it answers ``{"conversation": ID, "ended": BOOL}`` (whether
    it was open); with a turn, the turn is classified first and its prediction carries ``"ended"``.

    With an audio bundle (``recognizer.audio_bundle``) a turn may carry its speech, one of:
    ``"pcm16"``: base64 of 16-bit little-endian mono PCM, with ``"sample_rate"`` (an integer, default
    16000; other rates are resampled), or ``"audio_path"``: a file the media layer reads (wav, flac,
    mp4, ...). Its prediction then carries ``"audio": {"label", "probabilities", "latency_ms",
    "seconds", "cut_seconds"}`` (latency: decode + features + graph), or ``"audio": {"error": ...}``
    when the clip is masked (a missing or unreadable file, too short). A line with audio to a stream
    without an audio bundle, both keys, or a malformed ``pcm16`` / ``sample_rate`` is a line error.

    With a fused student (``recognizer.fused``) the label is the fusion head's and the prediction
    carries ``"modalities"``; a turn may also carry its video, one of ``"frames"``: a list of base64
    JPEG / PNG images in time order (at most ``recognizer.max_frames``), or ``"video_path"``: a video file
    or a folder of frame images. Its prediction then carries ``"visual": {"frames", "faces"}``, or
    ``"visual": {"error": ...}`` when the frames could not be decoded (the turn is answered without them).

    Output, through ``write`` (called with one JSON text per line, without the newline):
    ``{"conversation", "turn", "speaker", "label", "probabilities", "latency_ms"}`` per turn, or
    ``{"error": "line N: ...", "line": N}`` for a line that cannot be used: not UTF-8, not JSON, not
    an object, nested too deeply, over ``max_line_bytes``, a missing or non-string ``speaker`` or
    ``text``, a text over ``recognizer.max_text_chars``, lone surrogates, a bad ``conversation`` or
    ``end``. The stream always goes on with the next line. ``N`` counts physical lines from 1; blank
    lines are skipped without output.

    ``lines``: text or byte lines (iterate ``sys.stdin.buffer`` so that bad UTF-8 is reported per line;
    a file object is read with bounded ``readline`` calls). ``max_line_bytes``: longest line parsed
    (default ``12 * recognizer.max_text_chars + 4096``, room for any text under the cap however it is
    escaped); longer lines are rejected unparsed.

    Returns a summary: ``{"lines", "blank", "predictions", "errors", "ended", "evicted", "expired",
    "open"}`` (``evicted``/``expired``: conversations dropped by the recognizer's bounds during this
    call; ``open``: conversations open at the end).
    """
    limit = max_line_bytes if max_line_bytes is not None else default_line_limit(recognizer)
    summary = {"lines": 0, "blank": 0, "predictions": 0, "errors": 0, "ended": 0}
    if recognizer.audio_bundle is not None:
        summary.update(audio=0, audio_masked=0)
    if _has_visual(recognizer):
        summary.update(visual=0, visual_masked=0)
    evicted, expired = recognizer.evicted, recognizer.expired
    number = 0
    for raw, size, unit in _bounded_lines(lines, limit):
        number += 1
        summary["lines"] = number
        try:
            if raw is None:
                raise DataError(f"line of {size} {unit}, over the limit of {limit} (not parsed)")
            out = _serve_one(recognizer, raw, number)
        except DataError as err:
            out = {"error": f"line {number}: {_error_text(err)}", "line": number}
        except BundleError as err:
            out = {"error": f"line {number}: {err}", "line": number}
        except Exception as err:  # a bug or a runtime failure: report it on the line, keep serving
            out = {"error": f"line {number}: internal error ({type(err).__name__}: {err})", "line": number}
        if out is None:
            summary["blank"] += 1
            continue
        if "error" in out:
            summary["errors"] += 1
        else:
            summary["predictions"] += "label" in out
            summary["ended"] += bool(out.get("ended"))
            for kind in ("audio", "visual"):
                if kind in out:
                    summary[f"{kind}_masked" if "error" in out[kind] else kind] += 1
        write(json.dumps(out))
    summary.update(evicted=recognizer.evicted - evicted, expired=recognizer.expired - expired,
                   open=len(recognizer.conversations))
    return summary


def _serve_one(recognizer: StreamingRecognizer, raw: str | bytes, number: int) -> dict[str, Any] | None:
    """The output object of one line (None for a blank line); raises DataError for a bad one."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    if number == 1:
        raw = raw.removeprefix("\ufeff")
    if not raw.strip():
        return None
    try:
        turn = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"not JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError("not JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise DataError(f"not JSON ({err})") from None
    if not isinstance(turn, dict):
        raise DataError(f"not a JSON object (got {json_type(turn)})")
    end = turn.get("end", False)
    if not isinstance(end, bool):
        raise DataError(f"must be true or false, got {json_type(end)}", field="end")
    conversation = turn.get("conversation", "default")
    if end and "text" not in turn and "speaker" not in turn:
        conversation = recognizer.check_conversation(conversation)
        return {"conversation": conversation, "ended": recognizer.end(conversation)}
    for key in ("speaker", "text"):
        if key not in turn:
            raise DataError(f"missing {key!r}")
    audio, decode_ms, audio_error = _turn_audio(recognizer, turn)
    frames, frames_error = _turn_frames(recognizer, turn)
    # a masked clip or unusable frames: the turn is answered without them
    p = recognizer.push(turn["speaker"], turn["text"], conversation, audio=audio, frames=frames)
    out: dict[str, Any] = {"conversation": p.conversation, "turn": p.turn, "speaker": p.speaker, "label": p.label,
                           "probabilities": _rounded(p.probabilities), "latency_ms": round(p.latency_ms, 3)}
    if recognizer.fused is not None:
        out["modalities"] = list(p.modalities)
    if p.visual is not None:
        out["visual"] = dict(p.visual)
    elif frames_error is not None:
        out["visual"] = {"error": frames_error}
    if p.audio is not None:
        a = p.audio
        out["audio"] = {"label": a.label, "probabilities": _rounded(a.probabilities),
                        "latency_ms": round(a.latency_ms + decode_ms, 3), "seconds": round(a.seconds, 4),
                        "cut_seconds": round(a.cut_seconds, 4)}
    elif audio_error is not None or p.audio_error is not None:
        out["audio"] = {"error": audio_error or p.audio_error}
    if end:
        out["ended"] = recognizer.end(p.conversation)
    return out


def _rounded(probabilities: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in probabilities.items()}


def _turn_frames(recognizer: StreamingRecognizer, turn: dict[str, Any]) -> tuple[list[np.ndarray] | None, str | None]:
    """``(frames or None, masked reason or None)`` for a line's ``frames`` (a list of base64 JPEG / PNG
    images, in time order) or ``video_path`` (a video file or a folder of frame images, sampled to the
    visual branch's count). A malformed field is a :class:`DataError`; an image or video that cannot be
    decoded masks the turn's visual input (its reason returned)."""
    keys = [k for k in ("frames", "video_path") if k in turn]
    if not keys:
        return None, None
    if len(keys) == 2:
        raise DataError("give the turn's video as 'frames' or as 'video_path', not both", field="frames")
    key = keys[0]
    if not _has_visual(recognizer):
        raise DataError("this stream has no visual branch; start it with --edge (a multimodal run's edge folder "
                        "with a visual student)", field=key)
    from erc_distill.media.audio import MediaError

    if key == "video_path":
        if not isinstance(turn[key], str):
            raise DataError(f"must be a string, got {json_type(turn[key])}", field=key)
        from erc_distill.media.frames import load_frames

        try:
            return list(load_frames(Path(turn[key]).expanduser(), recognizer.fused.frames).images), None
        except MediaError as err:
            return None, str(err)
        except ImportError as err:  # a video needs PyAV (the audio extra)
            return None, f"cannot decode {turn[key]!r}: {err}"
    items = turn[key]
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise DataError(f"must be a list of base64 strings (JPEG / PNG), got {json_type(items)}", field=key)
    if not items:
        raise DataError("an empty list", field=key)
    if len(items) > recognizer.max_frames:
        raise DataError(f"{len(items)} frames, over the limit of {recognizer.max_frames} (max_frames)", field=key)
    import io

    from PIL import Image, UnidentifiedImageError

    images = []
    for i, item in enumerate(items):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"frame {i}: not base64 ({err})", field=key) from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > 4096 * 4096:
                    return None, f"frame {i}: {im.width}x{im.height} pixels, over 4096x4096"
                images.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            return None, f"frame {i}: not a readable image ({type(err).__name__}: {err})"[:300]
    return images, None


def _turn_audio(recognizer: StreamingRecognizer, turn: dict[str, Any]) -> tuple[Any, float, str | None]:
    """``(clip or None, decode milliseconds, masked reason or None)`` for a line's ``pcm16`` / ``audio_path``.

    A malformed field is a :class:`DataError` (the line fails); a clip that cannot be decoded is
    masked (its reason returned), since the turn's text can still be classified."""
    keys = [k for k in ("pcm16", "audio_path") if k in turn]
    if not keys:
        if "sample_rate" in turn:
            raise DataError("given without 'pcm16'", field="sample_rate")
        return None, 0.0, None
    if len(keys) == 2:
        raise DataError("give the turn's audio as 'pcm16' or as 'audio_path', not both", field="pcm16")
    key = keys[0]
    if recognizer.audio_bundle is None:
        raise DataError("this stream has no audio bundle; start it with --audio-bundle", field=key)
    if not isinstance(turn[key], str):
        raise DataError(f"must be a string, got {json_type(turn[key])}", field=key)
    from erc_distill.media.audio import MediaError, audio_from_pcm16, load_audio

    start = time.perf_counter()
    if key == "pcm16":
        rate = turn.get("sample_rate", 16000)
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= 384_000:
            raise DataError(f"must be an integer from 1000 to 384000 (Hz), got {rate!r}"[:200], field="sample_rate")
        try:
            data = base64.b64decode(turn[key], validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataError(f"not base64 ({err})", field=key) from None
        make = lambda: audio_from_pcm16(data, rate, max_seconds=recognizer.max_audio_seconds)  # noqa: E731
    else:
        if "sample_rate" in turn:
            raise DataError("only with 'pcm16' (a file says its own rate)", field="sample_rate")
        path = Path(turn[key]).expanduser()
        make = lambda: load_audio(path, max_seconds=recognizer.max_audio_seconds)  # noqa: E731
    try:
        clip = make()
    except MediaError as err:
        return None, 0.0, str(err)
    except ImportError as err:  # a file needs the audio extra (soundfile / PyAV)
        return None, 0.0, f"cannot decode {turn[key]!r}: {err}"
    return clip, 1000 * (time.perf_counter() - start), None
