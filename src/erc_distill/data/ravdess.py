"""RAVDESS speech (Livingstone & Russo 2018): records from file names, speaker-independent splits.

The corpus is a folder of clips (``Actor_01/`` … ``Actor_24/``), each named
``MM-VC-EE-II-SS-RR-AA.<ext>``: modality (01 audio-video, 02 video only, 03 audio only), vocal
channel (01 speech, 02 song), emotion (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry,
06 fearful, 07 disgust, 08 surprised), intensity (01 normal, 02 strong; neutral has no strong),
statement (01 "Kids are talking by the door", 02 "Dogs are sitting by the door"), repetition
(01, 02) and actor (01–24; odd male, even female). The speech set has 1440 clips: 24 actors ×
60 (96 neutral, 192 of each other emotion).

How it maps onto conversations (documented choices):

- **one clip, one dialogue of one turn.** RAVDESS is not conversational: grouping an actor's clips
  into a "dialogue" would invent a context whose previous turns are the same two sentences with
  other acted emotions. The dialogue id is the file's stem (``03-01-05-02-01-02-12``), the turn
  id 0, so ``example_id`` is ``ravdess/<split>/<stem>/0``;
- **speaker** ``"Actor 12 (female)"``; **text** the statement, as the authors write it (it
  carries no emotion: only the voice does); ``Turn.media.path`` the clip (absolute);
  ``Turn.source`` the clip with line 0 (the record is the whole file);
- **splits by actor**, fixed: actors 1–16 train (960 clips), 17–20 dev (240), 21–24 test (240);
  each side has as many male as female actors, no actor is in two splits;
- **labels** in the order of the emotion codes: neutral, calm, happy, sad, angry, fearful,
  disgust, surprised. ``ravdess-meld`` is the same corpus on MELD's 7 labels through
  :data:`RAVDESS_TO_MELD` (calm → neutral: MELD has no calm).

Files read: ``*.wav``, ``*.flac`` and ``*.mp4`` anywhere under the clip folder. Video-only clips
(modality 02, no audio track) are skipped; a song clip, an unknown code, a strong neutral, an
actor that disagrees with its ``Actor_NN`` folder or the same recording twice is a
:class:`DataError` naming the file and the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from erc_distill.data.types import SPLITS, CorpusSplit, Dialogue, MediaRef, SourceRef, Split, Turn
from erc_distill.errors import DataError

if TYPE_CHECKING:
    from erc_distill.data.corpora import CorpusSpec

RAVDESS_LABELS: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
"""The 8 emotions, in the order of their codes 01–08 (also the class index order)."""

RAVDESS_TO_MELD: Mapping[str, str] = {
    "neutral": "neutral",
    "calm": "neutral",
    "happy": "joy",
    "sad": "sadness",
    "angry": "anger",
    "fearful": "fear",
    "disgust": "disgust",
    "surprised": "surprise",
}
"""RAVDESS emotion -> MELD label (the ``ravdess-meld`` corpus). Calm has no MELD counterpart and
joins neutral (both are low-arousal, non-negative); the other seven are the same emotion."""

STATEMENTS: Mapping[int, str] = {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"}

SPLIT_ACTORS: Mapping[Split, tuple[int, ...]] = {
    "train": tuple(range(1, 17)),
    "dev": tuple(range(17, 21)),
    "test": tuple(range(21, 25)),
}
"""Speaker-independent splits: which actors each split holds (8/2/2 of each sex)."""

CLIP_SUFFIXES = (".wav", ".flac", ".mp4")
"""File types the reader lists (other files in the folder are ignored)."""

_FIELDS = ("modality", "vocal channel", "emotion", "intensity", "statement", "repetition", "actor")
_NAME = re.compile(r"^\d{2}(?:-\d{2}){6}$")
_ACTOR_FOLDER = re.compile(r"^Actor_(\d+)$")
_MODALITIES = {1: "audio-video", 2: "video-only", 3: "audio-only"}


@dataclass(frozen=True)
class RavdessName:
    """The seven fields of a RAVDESS file name, decoded."""

    modality: str
    """``audio-video``, ``video-only`` or ``audio-only``."""
    vocal_channel: str
    """``speech`` or ``song``."""
    emotion: str
    intensity: str
    """``normal`` or ``strong``."""
    statement: int
    repetition: int
    actor: int

    @property
    def sex(self) -> str:
        """``male`` for odd actors, ``female`` for even ones (the authors' convention)."""
        return "male" if self.actor % 2 else "female"

    @property
    def text(self) -> str:
        return STATEMENTS[self.statement]

    @property
    def speaker(self) -> str:
        return f"Actor {self.actor:02d} ({self.sex})"

    @property
    def split(self) -> Split:
        return ravdess_split(self.actor)

    @property
    def recording(self) -> tuple[str, str, str, int, int, int]:
        """What identifies a take regardless of the file's modality."""
        return (self.vocal_channel, self.emotion, self.intensity, self.statement, self.repetition, self.actor)


def parse_ravdess_name(path: str | Path) -> RavdessName:
    """Decode a RAVDESS file name (``03-01-05-02-01-02-12.wav``); a :class:`DataError` naming the
    file and the field otherwise (``modality``, ``vocal channel``, ``emotion``, ``intensity``,
    ``statement``, ``repetition``, ``actor``, or ``file name`` when it is not seven 2-digit codes)."""
    path = Path(path)
    stem = path.stem
    if not _NAME.match(stem):
        raise DataError(
            f"not a RAVDESS clip name: expected seven 2-digit codes MM-VC-EE-II-SS-RR-AA "
            f"(e.g. 03-01-05-02-01-02-12{path.suffix}), got {path.name!r}",
            file=path,
            field="file name",
        )
    codes = [int(part) for part in stem.split("-")]
    values = dict(zip(_FIELDS, codes))

    def bad(field: str, allowed: str) -> DataError:
        return DataError(f"{field} code {values[field]:02d} in {path.name!r} is not one of {allowed}",
                         file=path, field=field)

    if values["modality"] not in _MODALITIES:
        raise bad("modality", "01 (audio-video), 02 (video-only), 03 (audio-only)")
    if values["vocal channel"] not in (1, 2):
        raise bad("vocal channel", "01 (speech), 02 (song)")
    if not 1 <= values["emotion"] <= len(RAVDESS_LABELS):
        raise bad("emotion", ", ".join(f"{i:02d} ({label})" for i, label in enumerate(RAVDESS_LABELS, 1)))
    if values["intensity"] not in (1, 2):
        raise bad("intensity", "01 (normal), 02 (strong)")
    if values["statement"] not in STATEMENTS:
        raise bad("statement", "01 (kids), 02 (dogs)")
    if values["repetition"] not in (1, 2):
        raise bad("repetition", "01, 02")
    if not 1 <= values["actor"] <= 24:
        raise bad("actor", "01 to 24")
    emotion = RAVDESS_LABELS[values["emotion"] - 1]
    if emotion == "neutral" and values["intensity"] == 2:
        raise DataError(f"{path.name!r}: neutral has no strong intensity in RAVDESS (code 02)",
                        file=path, field="intensity")
    return RavdessName(
        modality=_MODALITIES[values["modality"]],
        vocal_channel="speech" if values["vocal channel"] == 1 else "song",
        emotion=emotion,
        intensity="normal" if values["intensity"] == 1 else "strong",
        statement=values["statement"],
        repetition=values["repetition"],
        actor=values["actor"],
    )


def ravdess_split(actor: int) -> Split:
    """The split of an actor (1–16 train, 17–20 dev, 21–24 test)."""
    for split, actors in SPLIT_ACTORS.items():
        if actor in actors:
            return split
    raise ValueError(f"RAVDESS has actors 1 to 24, not {actor}")


def ravdess_to_meld(label: str) -> str:
    """A RAVDESS emotion as a MELD label (:data:`RAVDESS_TO_MELD`)."""
    try:
        return RAVDESS_TO_MELD[label]
    except KeyError:
        raise ValueError(f"not a RAVDESS label: {label!r}; RAVDESS labels are: {', '.join(RAVDESS_LABELS)}") from None


def list_clips(folder: str | Path) -> list[Path]:
    """The clip files under ``folder`` (:data:`CLIP_SUFFIXES`, hidden files and folders left out), sorted."""
    folder = Path(folder)
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in CLIP_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_ravdess(spec: CorpusSpec, folder: str | Path, split: Split) -> CorpusSplit:
    """The clips of ``split``'s actors under ``folder`` as one-turn dialogues, labelled with
    ``spec.labels`` (an emotion is mapped through ``spec.label_aliases`` first: ``ravdess-meld``).

    Every clip in the folder is checked, whatever its split (a bad name or a duplicate anywhere is
    a :class:`DataError`), so all three splits agree on what the corpus is.
    """
    folder = Path(folder).absolute()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    files = list_clips(folder)
    if not files:
        raise DataError(
            f"no RAVDESS clips ({', '.join('*' + s for s in CLIP_SUFFIXES)}) under this folder; expected "
            "Actor_01/03-01-01-01-01-01-01.wav and the like",
            file=folder,
        )
    seen: dict[tuple, Path] = {}
    clips: list[tuple[RavdessName, Path]] = []
    for path in files:
        name = parse_ravdess_name(path)
        if name.modality == "video-only":
            continue  # no audio track: not a speech record
        if name.vocal_channel == "song":
            raise DataError(
                f"{path.name!r} is a song clip (vocal channel 02): the song set has other sentences and "
                "6 emotions; keep it out of the speech folder",
                file=path,
                field="vocal channel",
            )
        folder_actor = _ACTOR_FOLDER.match(path.parent.name)
        if folder_actor and int(folder_actor.group(1)) != name.actor:
            raise DataError(f"actor {name.actor:02d} in the name, but the file is in {path.parent.name}/",
                            file=path, field="actor")
        if name.recording in seen:
            raise DataError(f"the same recording as {seen[name.recording]}", file=path, field="file name")
        seen[name.recording] = path
        clips.append((name, path))

    wanted = [(name, path) for name, path in clips if name.split == split]
    if not wanted:
        actors = SPLIT_ACTORS[split]
        raise DataError(
            f"no clips of the {split} split's actors ({actors[0]}-{actors[-1]}) under this folder "
            f"({len(clips)} clips of other actors)",
            file=folder,
        )
    wanted.sort(key=lambda item: (item[0].actor, item[1].stem))
    dialogues = []
    for name, path in wanted:
        label = spec.label_aliases.get(name.emotion, name.emotion)
        if label not in spec.labels:
            raise DataError(f"emotion {name.emotion!r} has no label in {spec.name} ({', '.join(spec.labels)})",
                            file=path, field="emotion")
        turn = Turn(
            corpus=spec.name,
            split=split,
            dialogue_id=path.stem,
            turn_id=0,
            index=0,
            speaker=name.speaker,
            text=name.text,
            label=label,
            source=SourceRef(str(path), 0),
            media=MediaRef(path=str(path)),
        )
        dialogues.append(Dialogue(spec.name, split, path.stem, (turn,)))
    return CorpusSplit(spec.name, split, spec.labels, tuple(dialogues), files=(str(folder),))
