"""A teacher-labelled transfer set for MELD distillation: unlabelled dialogues, no MELD dev/test leakage.

The teacher labels these dialogues with soft targets; the student trains on them with KD terms only
(no cross-entropy), so every turn has ``label=None`` and ``split="train"``. Sources
(:data:`TRANSFER_SOURCES`):

- ``emorynlp``: the Friends scenes of EmoryNLP, all three splits used as unlabelled text, corpus
  ``emorynlp-transfer`` (dialogue id = source split + scene id, e.g. ``dev-s01e15c01``). EmoryNLP and MELD are cut from
  the same episodes, so a scene is **removed** when

  1. it overlaps a MELD dev or test dialogue in time: same season and episode, and the scene's
     ``[first start, last end]`` span intersects the dialogue's (checked first), or
  2. one of its utterances has the same normalised text (:func:`normalise`) as a MELD dev or test
     utterance, counting only normalised texts longer than :data:`MIN_MATCH_CHARS` characters (short
     ones like "okay" are common phrases, not leakage).

- ``mask``: MELD *train* dialogues with speaker names replaced by ``Speaker 1``, ``Speaker 2``, ... in
  order of first appearance, corpus ``meld-mask``.
- ``short``: MELD *train* dialogues of at least 4 turns, cut to start at turn ``len // 2`` (later turns
  see a shorter history; turn ids kept, ``index`` renumbered from 0), corpus ``meld-short``.

MELD dev and test dialogues are never augmented. MELD train itself repeats a few dev/test texts, so a
train dialogue with a turn that matches by rule 2 is not augmented either: no transfer turn carries a
dev/test text. The corpus names keep every ``example_id`` unique and apart from real ``meld/`` ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from erc_distill.data.corpora import get_corpus, load_corpus
from erc_distill.data.csvio import read_csv
from erc_distill.data.paths import resolve_data_dir
from erc_distill.data.types import SPLITS, Dialogue, Turn
from erc_distill.config import TRANSFER_SOURCES
from erc_distill.errors import ConfigError, DataError

MIN_MATCH_CHARS = 20
"""A normalised text must be longer than this to count as a dev/test match."""
RULES = (
    "EmoryNLP scenes (train+dev+test, unlabelled) are removed when they overlap a MELD dev/test dialogue "
    "in time (same season and episode, intersecting [start, end] spans) or when one utterance's normalised "
    f"text (lower-case, non-alphanumeric runs -> one space, stripped; > {MIN_MATCH_CHARS} chars) equals a "
    "MELD dev/test utterance's; mask/short augment MELD train dialogues only, skipping those with such a "
    "text; short needs >= 4 turns and starts at turn len//2"
)
_SCENE = re.compile(r"^s(\d+)e(\d+)c\d+$")

Span = tuple[float, float]


def normalise(text: str) -> str:
    """Lower-case, every run of non-alphanumeric characters collapsed to one space, stripped."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


@dataclass(frozen=True)
class TransferReport:
    """What :func:`build_transfer_set` read, removed and kept (``scenes_read`` = removed + kept)."""

    sources: tuple[str, ...]
    scenes_read: int
    scenes_removed_time: int
    scenes_removed_text: int
    scenes_kept: int
    scene_turns_kept: int
    meld_train_removed_text: int
    """MELD train dialogues not augmented because a turn repeats a dev/test text."""
    mask_dialogues: int
    mask_turns: int
    short_dialogues: int
    short_turns: int
    rules: str
    fingerprint: str
    """sha256 (16 hex) over the sorted (example_id, speaker, text) of every transfer turn."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TransferSet:
    dialogues: tuple[Dialogue, ...]
    report: TransferReport

    @property
    def turns(self) -> list[Turn]:
        return [t for d in self.dialogues for t in d.turns]


def span(dialogue: Dialogue) -> Span | None:
    """``(first start, last end)`` of a dialogue's turns in seconds, None when it has no times."""
    starts = [t.media.start for t in dialogue.turns if t.media and t.media.start is not None]
    ends = [t.media.end for t in dialogue.turns if t.media and t.media.end is not None]
    return (min(starts), max(ends)) if starts and ends else None


def scene_episode(scene_id: str) -> tuple[int, int]:
    """(season, episode) of an EmoryNLP scene id ``s01e15c01``."""
    m = _SCENE.match(scene_id)
    if not m:
        raise DataError(f"EmoryNLP scene id {scene_id!r} is not like 's01e15c01'", field="dialogue")
    return int(m.group(1)), int(m.group(2))


def meld_episodes(root: Path, split: str) -> dict[str, tuple[int, int]]:
    """MELD dialogue id -> (season, episode), from the split's Season / Episode columns."""
    _, records = read_csv(get_corpus("meld").path(root, split), ("Dialogue_ID", "Season", "Episode"))
    return {r.fields["Dialogue_ID"].strip(): (int(r.fields["Season"]), int(r.fields["Episode"])) for r in records}


def held_out(root: Path) -> tuple[set[str], dict[tuple[int, int], list[Span]]]:
    """MELD dev + test: the normalised texts that count as a match, and the spans of each episode."""
    texts: set[str] = set()
    spans: dict[tuple[int, int], list[Span]] = {}
    for split in ("dev", "test"):
        episodes = meld_episodes(root, split)
        for d in load_corpus("meld", split, root).dialogues:
            texts.update(n for n in (normalise(t.text) for t in d.turns) if len(n) > MIN_MATCH_CHARS)
            if (s := span(d)) is not None:
                spans.setdefault(episodes[d.dialogue_id], []).append(s)
    return texts, spans


def _copy(d: Dialogue, corpus: str, turns: tuple[Turn, ...], speakers: dict[str, str] | None = None,
          dialogue_id: str | None = None) -> Dialogue:
    """``turns`` as an unlabelled train dialogue of ``corpus`` (index renumbered from 0; ``dialogue_id``: a new id)."""
    dialogue_id = dialogue_id or d.dialogue_id
    turns = tuple(
        dataclasses.replace(t, corpus=corpus, split="train", label=None, index=i, dialogue_id=dialogue_id,
                            speaker=speakers[t.speaker] if speakers else t.speaker)
        for i, t in enumerate(turns)
    )
    return Dialogue(corpus, "train", dialogue_id, turns)


def mask_speakers(d: Dialogue) -> Dialogue:
    """``d`` as ``meld-mask``: speakers renamed ``Speaker 1``, ``Speaker 2``, ... by first appearance."""
    names = {name: f"Speaker {i}" for i, name in enumerate(d.speakers, 1)}
    return _copy(d, "meld-mask", d.turns, names)


def shorten(d: Dialogue) -> Dialogue | None:
    """``d`` as ``meld-short`` from turn ``len // 2`` on; None for a dialogue of fewer than 4 turns."""
    return _copy(d, "meld-short", d.turns[len(d) // 2:]) if len(d) >= 4 else None


def build_transfer_set(sources: Iterable[str] | str, data_dir: str | Path | None = None, limit: int | None = None) -> TransferSet:
    """Build the transfer set from ``sources`` (names in :data:`TRANSFER_SOURCES`; rules in the module doc).

    ``limit``: only the first ``limit`` EmoryNLP scenes (sorted by id) are considered and only the first
    ``limit`` MELD train dialogues are augmented (a quick run). Unknown sources are a ConfigError.
    """
    sources = tuple(dict.fromkeys([sources] if isinstance(sources, str) else sources))
    unknown = [s for s in sources if s not in TRANSFER_SOURCES]
    if unknown or not sources:
        what = f"unknown transfer source(s) {', '.join(map(repr, unknown))}" if unknown else "no transfer source"
        raise ConfigError(f"{what}; known: {', '.join(TRANSFER_SOURCES)}", field="--transfer")
    if limit is not None and limit < 0:
        raise ConfigError(f"must be >= 0, got {limit}", field="--limit")
    root = resolve_data_dir(data_dir)
    texts, spans = held_out(root)

    def leaks_text(d: Dialogue) -> bool:
        return any(normalise(t.text) in texts for t in d.turns)

    def leaks_time(d: Dialogue) -> bool:
        s = span(d)
        return s is not None and any(s[0] <= e and b <= s[1] for b, e in spans.get(scene_episode(d.dialogue_id), ()))

    dialogues: list[Dialogue] = []
    read = by_time = by_text = 0
    if "emorynlp" in sources:
        scenes = sorted((d for split in SPLITS for d in load_corpus("emorynlp", split, root).dialogues),
                        key=lambda d: d.dialogue_id)
        for d in scenes[:limit]:
            read += 1
            if leaks_time(d):
                by_time += 1
            elif leaks_text(d):
                by_text += 1
            else:
                # the source split in the id: scene ids are unique in the real corpus, not in every copy of it
                dialogues.append(_copy(d, "emorynlp-transfer", d.turns, dialogue_id=f"{d.split}-{d.dialogue_id}"))
    kept = len(dialogues)

    train_removed = 0
    augmented: dict[str, list[Dialogue]] = {"mask": [], "short": []}
    if "mask" in sources or "short" in sources:
        for d in load_corpus("meld", "train", root).dialogues[:limit]:
            if leaks_text(d):
                train_removed += 1
                continue
            if "mask" in sources:
                augmented["mask"].append(mask_speakers(d))
            if "short" in sources and (short := shorten(d)) is not None:
                augmented["short"].append(short)
    dialogues += augmented["mask"] + augmented["short"]

    rows = sorted((t.example_id, t.speaker, t.text) for d in dialogues for t in d.turns)
    fingerprint = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    report = TransferReport(
        sources=sources,
        scenes_read=read,
        scenes_removed_time=by_time,
        scenes_removed_text=by_text,
        scenes_kept=kept,
        scene_turns_kept=sum(len(d) for d in dialogues[:kept]),
        meld_train_removed_text=train_removed,
        mask_dialogues=len(augmented["mask"]),
        mask_turns=sum(len(d) for d in augmented["mask"]),
        short_dialogues=len(augmented["short"]),
        short_turns=sum(len(d) for d in augmented["short"]),
        rules=RULES,
        fingerprint=fingerprint,
    )
    return TransferSet(tuple(dialogues), report)
