"""Streaming, per-turn emotion recognition: the robot hears a turn, gets a label.

Each conversation keeps its rolling context (:class:`StreamingContext`: every turn tokenized once);
``push`` builds turn t's input from turns <= t, runs the bundle's graph, and returns the label, the
probabilities and the latency (build + tokenize + inference).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from erc_distill.data.context import StreamingContext
from erc_distill.runtime.bundle import Bundle


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


class StreamingRecognizer:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.builder = bundle.builder()
        self.conversations: dict[str, StreamingContext] = {}

    def push(self, speaker: str, text: str, conversation: str = "default") -> Prediction:
        """Classify the next turn of ``conversation`` (a new id starts a new conversation)."""
        start = time.perf_counter()
        context = self.conversations.setdefault(conversation, self.builder.stream())
        x = context.push(speaker, text)
        p = self.bundle.probabilities([x])[0]
        latency = 1000 * (time.perf_counter() - start)
        labels = self.bundle.labels
        return Prediction(conversation, x.turn_index, speaker, labels[int(p.argmax())],
                          {label: float(v) for label, v in zip(labels, p)}, latency, len(x))

    def end(self, conversation: str = "default") -> None:
        """Forget a conversation's context."""
        self.conversations.pop(conversation, None)
