"""Streaming, per-turn emotion recognition: the robot hears a turn, gets a label.

Each conversation keeps its rolling context (:class:`StreamingContext`: every turn tokenized once);
``push`` builds turn t's input from turns <= t, runs the bundle's graph, and returns the label, the
probabilities and the latency (build + tokenize + inference).

A recognizer runs for hours on whatever it is fed, so it is bounded: a text longer than
``max_text_chars`` is rejected (:class:`~erc_distill.errors.DataError`; the caller decides whether to
cut it and retry), at most ``max_conversations`` contexts are kept (the least recently used one is
evicted), and a conversation idle for more than ``idle_ttl_s`` seconds is forgotten. A rejected turn
leaves its conversation exactly as it was.

:func:`serve_lines` is the ``erc-distill stream`` protocol (JSON lines in, JSON lines out) on top.
"""

from __future__ import annotations

import json
import time
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

    ``evicted`` and ``expired`` count the conversations dropped by each bound, ``ended`` those closed
    with :meth:`end`; :meth:`stats` returns them with the number open.
    """

    def __init__(self, bundle: Bundle, max_text_chars: int = 2000, max_conversations: int = 1000,
                 idle_ttl_s: float | None = 3600.0, clock: Callable[[], float] = time.monotonic, *,
                 max_name_chars: int = MAX_NAME_CHARS) -> None:
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        if idle_ttl_s is not None and not idle_ttl_s > 0:
            raise ValueError(f"idle_ttl_s must be > 0 or None, got {idle_ttl_s}")
        if max_name_chars < 1:
            raise ValueError(f"max_name_chars must be >= 1, got {max_name_chars}")
        self.bundle = bundle
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

    def push(self, speaker: str, text: str, conversation: str = "default") -> Prediction:
        """Classify the next turn of ``conversation`` (a new id starts a new conversation).

        Raises :class:`DataError` for a turn that fails :meth:`check_turn` or whose input cannot be
        built (e.g. a speaker name too long for the prompt); the conversation is then left unchanged.
        Empty text is a valid turn (a non-verbal or inaudible one): the model still sees the speaker
        and the context, exactly as the offline builder does.
        """
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
    limit = max_line_bytes if max_line_bytes is not None else (
        LINE_BYTES_PER_CHAR * recognizer.max_text_chars + LINE_OVERHEAD_BYTES)
    summary = {"lines": 0, "blank": 0, "predictions": 0, "errors": 0, "ended": 0}
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
    p = recognizer.push(turn["speaker"], turn["text"], conversation)
    out: dict[str, Any] = {"conversation": p.conversation, "turn": p.turn, "speaker": p.speaker, "label": p.label,
                           "probabilities": {k: round(v, 6) for k, v in p.probabilities.items()},
                           "latency_ms": round(p.latency_ms, 3)}
    if end:
        out["ended"] = recognizer.end(p.conversation)
    return out
