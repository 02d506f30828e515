"""Which file holds a turn's audio, and loading the clips of many turns without failing on one.

Corpus conventions (:func:`locate_clip`; ``media_dir`` is the ``--media-dir`` folder):

- **MELD** (and MELD dyadic): ``Turn.media.path`` is ``{split folder}/dia{D}_utt{U}.mp4`` with the
  folders of MELD.Raw (``train_splits``, ``dev_splits_complete``, ``output_repeated_splits_test``;
  the dyadic variant keeps MELD's original dialogue / utterance numbers), relative to
  ``media_dir``. Found as ``media_dir/<split folder>/<name>``, else ``media_dir/<name>`` when the media
  dir is that split folder itself (its name is the turn's split folder: MELD reuses ``dia{D}_utt{U}``
  in every split, so a flat folder of one split never lends its clips to another's turns), each also with a ``.wav`` / ``.flac`` of the same stem
  (audio extracted beforehand). The clip is the utterance: the CSV's StartTime / EndTime are
  positions in the episode and are not applied.
- **IEMOCAP**: ``Wav_Path``, absolute or relative to ``media_dir`` (``Video_Path`` when there is
  no wav). A file named after the utterance (``<dialogue>_F000.wav``, IEMOCAP's
  ``sentences/wav/``) is the turn; any other file (the dialogue's recording, ``dialog/wav/`` or
  the ``.avi``) is cut to the row's Start_Time / End_Time.
- **RAVDESS**: the reader records each clip's own file (absolute); with a ``media_dir`` the same
  clip is looked up there instead as ``Actor_NN/<stem>`` with the reader's suffix, ``.wav``,
  ``.flac`` or ``.mp4`` (e.g. the original 48 kHz WAVs).
- Any other corpus: ``media.path`` (else ``video_path``) as it stands, relative to ``media_dir``;
  times are not applied.

A relative path with no ``media_dir`` resolves to nothing (the turn counts as having no media).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from erc_distill.data.types import MediaRef, Turn
from erc_distill.media.audio import TARGET_RATE, AudioClip, MediaError, MediaSource, load_audio

MAX_EXAMPLES = 5
"""How many paths of each kind a :class:`MediaReport` keeps."""

_AUDIO_SIBLINGS = (".wav", ".flac")
_RAVDESS_SUFFIXES = (".wav", ".flac", ".mp4")


def locate_clip(turn: Turn, media_dir: str | Path | None = None) -> MediaSource | None:
    """The file (and, where the corpus's times are positions in it, the segment) of ``turn``'s audio.

    None when the turn has no media reference, or only a relative one and no ``media_dir``. The
    file may not exist: :func:`load_turn_audio` counts it as missing (it is the first place
    looked, so the report names the path a user should provide).
    """
    ref = turn.media
    if ref is None or not (ref.path or ref.video_path):
        return None
    folder = None if media_dir is None else Path(media_dir).expanduser()
    rule = _CONVENTIONS.get(turn.corpus, _generic)
    return rule(turn, ref, folder)


def resolve_media(turn: Turn, media_dir: str | Path | None = None) -> Path | None:
    """The file that holds ``turn``'s audio (see :func:`locate_clip`), or None when it has none."""
    where = locate_clip(turn, media_dir)
    return None if where is None else where.path


def _under(path: str, media_dir: Path | None) -> Path | None:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return None if media_dir is None else media_dir / p


def split_folder_place(rel: str, media_dir: Path) -> Path | None:
    """``media_dir/<name of rel>`` when ``media_dir`` is itself the folder ``rel`` names (``train_splits``
    for ``train_splits/dia65_utt0.mp4``) or ``rel`` names no folder; else None. File names that repeat
    across splits (MELD's) are then never taken from another split's folder."""
    parent = Path(rel).parent.name
    if parent and Path(media_dir).name != parent:
        return None
    return Path(media_dir) / Path(rel).name


def _first_existing(candidates: Sequence[Path]) -> Path:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def _generic(turn: Turn, ref: MediaRef, media_dir: Path | None) -> MediaSource | None:
    path = _under(ref.path or ref.video_path, media_dir)
    return None if path is None else MediaSource(path)


def _meld(turn: Turn, ref: MediaRef, media_dir: Path | None) -> MediaSource | None:
    if ref.path is None:
        return None
    primary = _under(ref.path, media_dir)
    if primary is None:
        return None
    flat = None if Path(ref.path).is_absolute() else split_folder_place(ref.path, media_dir)
    places = [primary] + ([flat] if flat is not None else [])
    candidates = [p for place in places for p in (place, *(place.with_suffix(s) for s in _AUDIO_SIBLINGS))]
    return MediaSource(_first_existing(candidates))


def _iemocap(turn: Turn, ref: MediaRef, media_dir: Path | None) -> MediaSource | None:
    path = _under(ref.path or ref.video_path, media_dir)
    if path is None:
        return None
    own_file = path.stem.startswith(f"{turn.dialogue_id}_")
    if own_file or (ref.start is None and ref.end is None):
        return MediaSource(path)
    return MediaSource(path, ref.start, ref.end)


def _ravdess(turn: Turn, ref: MediaRef, media_dir: Path | None) -> MediaSource | None:
    if ref.path is None:
        return None
    own = Path(ref.path)
    if media_dir is None:
        return MediaSource(own) if own.is_absolute() else None
    actor = own.stem.rsplit("-", 1)[-1]
    suffixes = tuple(dict.fromkeys((own.suffix.lower(), *_RAVDESS_SUFFIXES)))
    places = (media_dir / f"Actor_{actor}", media_dir)
    return MediaSource(_first_existing([place / f"{own.stem}{s}" for place in places for s in suffixes]))


_CONVENTIONS: dict[str, Callable[[Turn, MediaRef, Path | None], MediaSource | None]] = {
    "meld": _meld,
    "meld-dyadic": _meld,
    "iemocap": _iemocap,
    "ravdess": _ravdess,
    "ravdess-meld": _ravdess,
}


# ----------------------------------------------------------------------------- many turns


@dataclass
class MediaReport:
    """What happened to the clips of a set of turns: for a run's summary and its manifest.

    Every turn is exactly one of loaded, missing (no file), unreadable (no decoder could read it,
    no audio track, an empty segment) or no media (no reference, or a relative one and no media
    dir); ``cut`` counts the loaded clips that ``max_seconds`` shortened. The ``first_*`` lists
    keep the first :data:`MAX_EXAMPLES` paths (unreadable ones with the reason; no-media ones by
    example id).
    """

    total: int = 0
    loaded: int = 0
    missing: int = 0
    unreadable: int = 0
    no_media: int = 0
    cut: int = 0
    cut_seconds: float = 0.0
    loaded_seconds: float = 0.0
    max_seconds: float | None = None
    media_dir: str | None = None
    first_missing: list[str] = field(default_factory=list)
    first_unreadable: list[str] = field(default_factory=list)
    first_cut: list[str] = field(default_factory=list)
    first_no_media: list[str] = field(default_factory=list)

    @property
    def masked(self) -> int:
        """Turns without audio (missing, unreadable or no media): the model masks the modality."""
        return self.total - self.loaded

    def add_clip(self, clip: AudioClip) -> None:
        self.total += 1
        self.loaded += 1
        self.loaded_seconds += clip.duration_s
        if clip.cut:
            self.cut += 1
            self.cut_seconds += clip.cut_seconds
            _keep(self.first_cut, f"{clip.source} ({clip.cut_seconds:.3f} s cut)")

    def add_failure(self, err: MediaError) -> None:
        self.total += 1
        if err.reason == "missing":
            self.missing += 1
            _keep(self.first_missing, err.file or "<unknown>")
        else:
            self.unreadable += 1
            _keep(self.first_unreadable, f"{err.file}: {err.message}")

    def add_no_media(self, turn: Turn) -> None:
        self.total += 1
        self.no_media += 1
        _keep(self.first_no_media, turn.example_id)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (for a run manifest)."""
        out = asdict(self)
        out["masked"] = self.masked
        out["cut_seconds"] = round(self.cut_seconds, 3)
        out["loaded_seconds"] = round(self.loaded_seconds, 3)
        return out

    def summary(self) -> str:
        """A few lines for a run summary: the counts, then the first paths of each problem."""
        hours = self.loaded_seconds / 3600
        span = f"{hours:.2f} h" if hours >= 0.1 else f"{self.loaded_seconds:.1f} s"
        cut = f" to {self.max_seconds:g} s ({self.cut_seconds:.1f} s dropped)" if self.cut else ""
        lines = [f"audio: {self.total} turns, {self.loaded} loaded ({span}), {self.masked} masked "
                 f"({self.missing} missing, {self.unreadable} unreadable, {self.no_media} without media), "
                 f"{self.cut} cut{cut}"]
        for name, count, first in (
            ("missing", self.missing, self.first_missing),
            ("unreadable", self.unreadable, self.first_unreadable),
            ("without media", self.no_media, self.first_no_media),
            ("cut", self.cut, self.first_cut),
        ):
            if count:
                more = f" (+{count - len(first)} more)" if count > len(first) else ""
                lines.append(f"  {name}: " + "; ".join(first) + more)
        if self.no_media and self.media_dir is None:
            lines.append("  (no media dir was given: clips named relative to one, like MELD's, cannot be found;"
                         " pass --media-dir)")
        return "\n".join(lines)


def _keep(first: list[str], item: str) -> None:
    if len(first) < MAX_EXAMPLES:
        first.append(item)


def iter_turn_audio(
    turns: Iterable[Turn],
    media_dir: str | Path | None = None,
    report: MediaReport | None = None,
    *,
    sample_rate: int = TARGET_RATE,
    max_seconds: float | None = None,
) -> Iterator[tuple[Turn, AudioClip | None]]:
    """Like :func:`load_turn_audio`, one turn at a time (``(turn, clip or None)``), so a corpus's
    audio never has to be in memory at once (MELD's ~13.7k clips are ~3 GB as float32 at 16 kHz).
    Counts go into ``report`` as the clips are read (pass one in to read it afterwards)."""
    if report is None:
        report = MediaReport(max_seconds=max_seconds, media_dir=None if media_dir is None else str(media_dir))
    for turn in turns:
        where = locate_clip(turn, media_dir)
        if where is None:
            report.add_no_media(turn)
            yield turn, None
            continue
        try:
            clip = load_audio(where, sample_rate=sample_rate, max_seconds=max_seconds)
        except MediaError as err:
            report.add_failure(err)
            yield turn, None
            continue
        report.add_clip(clip)
        yield turn, clip


def load_turn_audio(
    turns: Iterable[Turn],
    media_dir: str | Path | None = None,
    *,
    sample_rate: int = TARGET_RATE,
    max_seconds: float | None = None,
    progress: bool = False,
) -> tuple[list[AudioClip | None], MediaReport]:
    """Load the audio of every turn, in order: ``(clips, report)``, a clip or None per turn.

    A turn without media, a missing file or one that cannot be decoded gives None (the model masks
    the modality for that turn) and a count in the report, never an exception. What stays fatal:
    the ``audio`` extra not installed (ImportError naming it) and bad arguments (ValueError).
    """
    turns = list(turns)
    report = MediaReport(max_seconds=max_seconds, media_dir=None if media_dir is None else str(media_dir))
    loaded = iter_turn_audio(turns, media_dir, report, sample_rate=sample_rate, max_seconds=max_seconds)
    bar = tqdm(loaded, total=len(turns), desc="audio", unit="clip", disable=not progress, leave=False)
    clips = [clip for _, clip in bar]
    return clips, report
