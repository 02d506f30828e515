"""Typed records for conversations: what every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "dev", "test"]
SPLITS: tuple[Split, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class SourceRef:
    """Where a record came from: a file and its 1-based physical line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class MediaRef:
    """Where a turn's audio / video lives, when the corpus has it.

    ``path`` may be relative to the corpus's media folder (MELD ships ``dia{D}_utt{U}.mp4`` names
    whose files are a separate download); ``start``/``end`` are seconds in the source episode or
    session, when the corpus gives them.
    """

    path: str | None = None
    video_path: str | None = None
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class Turn:
    """One utterance of a conversation.

    ``turn_id`` is the corpus's own turn number (MELD/EmoryNLP ``Utterance_ID``; it may have
    gaps); ``index`` is the 0-based position inside the dialogue after ordering by ``turn_id``.
    ``label`` is one of the corpus's labels, or None for an unlabelled turn.
    """

    corpus: str
    split: Split
    dialogue_id: str
    turn_id: int
    index: int
    speaker: str
    text: str
    label: str | None
    source: SourceRef
    media: MediaRef | None = None

    @property
    def example_id(self) -> str:
        """Stable id of this turn as a training example: ``corpus/split/dialogue/turn``.

        Teacher and student outputs are joined on it, never on token positions.
        """
        return f"{self.corpus}/{self.split}/{self.dialogue_id}/{self.turn_id}"


@dataclass(frozen=True)
class Dialogue:
    """A conversation: its turns in spoken order (sorted by ``turn_id``)."""

    corpus: str
    split: Split
    dialogue_id: str
    turns: tuple[Turn, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.turns)

    @property
    def speakers(self) -> tuple[str, ...]:
        """Speakers in order of first appearance."""
        return tuple(dict.fromkeys(t.speaker for t in self.turns))

    def turn(self, turn_id: int) -> Turn:
        """The turn whose corpus turn id is ``turn_id`` (a DataError naming the ids that exist)."""
        for t in self.turns:
            if t.turn_id == turn_id:
                return t
        have = ", ".join(str(t.turn_id) for t in self.turns)
        from erc_distill.errors import DataError

        raise DataError(f"dialogue {self.dialogue_id} has no turn {turn_id} (turn ids: {have})",
                        file=f"{self.corpus}/{self.split}")


@dataclass(frozen=True)
class CorpusSplit:
    """All dialogues of one split of one corpus, with the corpus's label order."""

    corpus: str
    split: Split
    labels: tuple[str, ...]
    dialogues: tuple[Dialogue, ...]
    files: tuple[str, ...] = ()

    @property
    def turns(self) -> list[Turn]:
        return [t for d in self.dialogues for t in d.turns]

    def dialogue(self, dialogue_id: str | int) -> Dialogue:
        key = str(dialogue_id)
        for d in self.dialogues:
            if d.dialogue_id == key:
                return d
        from erc_distill.errors import DataError

        raise DataError(f"no dialogue {key!r}", file=f"{self.corpus}/{self.split}", field="dialogue")
