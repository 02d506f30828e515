"""Corpus readers: one generic CSV reader, driven by a :class:`CorpusSpec` per corpus.

A corpus whose records are media files rather than CSV rows (RAVDESS: a folder of clips named by
their labels) has ``layout="clips"`` and its own ``reader``; everything around the reader
(:func:`load_corpus`, the missing-corpus message, :func:`~erc_distill.data.fetch.ensure_corpus`,
:func:`~erc_distill.data.fingerprint.corpus_fingerprint`) is shared.

Label orders (the class index of each label; fixed, documented, used by every model and report):

- ``meld`` / ``meld-dyadic``: neutral, joy, surprise, anger, sadness, disgust, fear
  (MELD's train frequency order);
- ``emorynlp``: neutral, joyful, scared, mad, peaceful, powerful, sad (the authors' order);
- ``iemocap``: hap, sad, neu, ang, exc, fru (the order of DialogueRNN / COSMIC / SPCL);
  full names (``happy``, ``frustrated``, ...) are accepted as aliases;
- ``ravdess``: neutral, calm, happy, sad, angry, fearful, disgust, surprised (the file-name codes
  01-08); ``ravdess-meld``: the same clips on MELD's labels and order, calm joining neutral (see
  :mod:`erc_distill.data.ravdess` for the splits by actor and the one-clip dialogues).

Each split is one CSV under ``<data dir>/<folder>/``; a spec lists the candidate names
(IEMOCAP: ``train.csv`` or, as TelME and most repositories name it, ``IEMOCAP_train.csv``) and the
first that exists is read.

Turns are ordered by the corpus's turn id (``Utterance_ID``; IEMOCAP, which has none, by
``Start_Time``), never by file order.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from erc_distill.data.csvio import CsvRecord, read_csv
from erc_distill.data.paths import DATA_ENV, resolve_data_dir
from erc_distill.data.ravdess import RAVDESS_LABELS, RAVDESS_TO_MELD, read_ravdess
from erc_distill.data.types import SPLITS, CorpusSplit, Dialogue, MediaRef, SourceRef, Split, Turn
from erc_distill.errors import DataError


@dataclass(frozen=True)
class CorpusSpec:
    """How one corpus lays out its CSV files. The reader is the same for every corpus."""

    name: str
    folder: str
    """Sub-folder of the data directory that holds the split files."""
    file_names: tuple[str, ...]
    """Candidate names of a split file, ``{split}`` filled in (``"{split}_sent_emo.csv"``). The
    reader reads the first that exists; the first is also the name ``fetch-data`` writes."""
    labels: tuple[str, ...]
    dialogue_columns: tuple[str, ...]
    dialogue_format: str
    """``str.format`` pattern over ``dialogue_columns`` giving the dialogue id."""
    turn_column: str
    """Column that identifies a turn inside its dialogue (checked for duplicates)."""
    order_column: str
    """Column whose value orders the turns (the turn id, or a start time)."""
    integer_ids: bool = True
    """Dialogue and turn columns must hold integers (MELD, EmoryNLP)."""
    text_column: str = "Utterance"
    speaker_column: str = "Speaker"
    label_column: str = "Emotion"
    start_column: str | None = None
    end_column: str | None = None
    audio_column: str | None = None
    video_column: str | None = None
    label_aliases: Mapping[str, str] = field(default_factory=dict)
    parse_speaker: Callable[[str], str] = str.strip
    media_name: Callable[[Split, Mapping[str, str]], str] | None = None
    """Relative media file of a row when the corpus names its clips by convention (MELD)."""
    source_url: str | None = None
    """Where the authors publish the CSVs (``{file}`` is filled in); None: not downloadable."""
    description: str = ""
    layout: Literal["csv", "clips"] = "csv"
    """``csv``: one CSV file a split. ``clips``: a folder of media files, one a record, shared by
    all splits (the reader picks a split's records); ``file_names`` are then candidate names of
    that folder inside ``folder``, and ``reader`` is required."""
    reader: Callable[[CorpusSpec, Path, Split], CorpusSplit] | None = None
    """Reads one split from the path :meth:`find` found; None: the generic CSV reader."""
    obtain: str | None = None
    """How to get a corpus that cannot be downloaded, for the missing-corpus message (``{folder}``
    is filled in with its folder); None: the generic text."""

    @property
    def required_columns(self) -> tuple[str, ...]:
        if self.layout == "clips":
            return ()  # no CSV: the records are files
        cols = [self.text_column, self.speaker_column, self.label_column, *self.dialogue_columns]
        cols += [self.turn_column, self.order_column]
        cols += [c for c in (self.start_column, self.end_column, self.audio_column, self.video_column) if c]
        return tuple(dict.fromkeys(cols))

    @property
    def files(self) -> dict[Split, str]:
        """The canonical (first-candidate) file name of each split."""
        return {split: self.file_names[0].format(split=split) for split in SPLITS}

    def candidates(self, split: Split) -> tuple[str, ...]:
        """The file names a split may have, in the order they are tried."""
        return tuple(dict.fromkeys(name.format(split=split) for name in self.file_names))

    def find(self, data_dir: Path, split: Split) -> Path | None:
        """The split's file in ``data_dir``: the first candidate name that exists, else None."""
        for name in self.candidates(split):
            path = Path(data_dir) / self.folder / name
            if path.is_dir() if self.layout == "clips" else path.is_file():
                return path
        return None

    def path(self, data_dir: Path, split: Split) -> Path:
        """The split's file: the first candidate that exists, else the canonical name (for messages)."""
        return self.find(data_dir, split) or Path(data_dir) / self.folder / self.files[split]

    def label_index(self, label: str) -> int:
        return self.labels.index(label)


# ----------------------------------------------------------------------------- field parsers

_TIME = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:[.,]\d+)?)$")


def parse_seconds(value: str) -> float:
    """``'00:16:16,059'``, ``'00:00:02.877'``, ``'1:02.5'`` or ``'12.34'`` -> seconds (float)."""
    value = value.strip()
    m = _TIME.match(value)
    if m:
        hours, minutes, seconds = m.groups()
        return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds.replace(",", "."))
    return float(value)  # ValueError for anything else


def parse_speaker_list(value: str) -> str:
    """EmoryNLP writes speakers as a Python list string: ``"['Monica Geller', 'Ross Geller']"``.

    Several speakers (said in unison) are joined with ``' & '``.
    """
    parsed = ast.literal_eval(value.strip())
    if not isinstance(parsed, (list, tuple)) or not parsed or not all(isinstance(s, str) for s in parsed):
        raise ValueError("expected a non-empty list of names, e.g. \"['Monica Geller']\"")
    return " & ".join(s.strip() for s in parsed)


_IEMOCAP_UTT = re.compile(r"^Ses\d+[FM]_.+_([FM])\d+$")


def parse_iemocap_speaker(value: str) -> str:
    """IEMOCAP's Speaker field is the utterance id (``Ses05M_script03_2_F001``): the speaker is F or M."""
    m = _IEMOCAP_UTT.match(value.strip())
    if not m:
        raise ValueError("expected an IEMOCAP utterance id like 'Ses05M_script03_2_F001'")
    return m.group(1)


_MELD_RAW_FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}


def _meld_clip(dialogue: str, utterance: str) -> Callable[[Split, Mapping[str, str]], str]:
    def name(split: Split, row: Mapping[str, str]) -> str:
        return f"{_MELD_RAW_FOLDERS[split]}/dia{int(row[dialogue])}_utt{int(row[utterance])}.mp4"

    return name


# ----------------------------------------------------------------------------- the corpora

_GITHUB_MELD = "https://raw.githubusercontent.com/declare-lab/MELD/master/data/{file}"
_MELD_LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
_RAVDESS_OBTAIN = (
    "RAVDESS (CC BY-NC-SA 4.0) is not downloaded by erc-distill: get Audio_Speech_Actors_01-24.zip from "
    "the authors' Zenodo record 1188976 (doi:10.5281/zenodo.1188976) and unzip its Actor_01 ... Actor_24 "
    "folders into {folder}/Audio_Speech_Actors_01-24/ (or a 16 kHz copy into {folder}/speech16k/)"
)

CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            name="meld",
            description="MELD (Poria et al., ACL 2019), multi-party dialogues from Friends",
            folder="meld",
            file_names=("{split}_sent_emo.csv",),
            labels=_MELD_LABELS,
            dialogue_columns=("Dialogue_ID",),
            dialogue_format="{Dialogue_ID}",
            turn_column="Utterance_ID",
            order_column="Utterance_ID",
            start_column="StartTime",
            end_column="EndTime",
            media_name=_meld_clip("Dialogue_ID", "Utterance_ID"),
            source_url=_GITHUB_MELD.replace("{file}", "MELD/{file}"),
        ),
        CorpusSpec(
            name="meld-dyadic",
            description="MELD dyadic variant (two-speaker dialogues)",
            folder="meld_dyadic",
            file_names=("{split}_sent_emo_dya.csv",),
            labels=_MELD_LABELS,
            dialogue_columns=("Dialogue_ID",),
            dialogue_format="{Dialogue_ID}",
            turn_column="Utterance_ID",
            order_column="Utterance_ID",
            start_column="StartTime",
            end_column="EndTime",
            # the raw clips keep the original MELD numbering
            media_name=_meld_clip("Old_Dialogue_ID", "Old_Utterance_ID"),
            source_url=_GITHUB_MELD.replace("{file}", "MELD_Dyadic/{file}"),
        ),
        CorpusSpec(
            name="emorynlp",
            description="EmoryNLP (Zahiri & Choi, 2018), Friends scenes",
            folder="emorynlp",
            file_names=("emorynlp_{split}_final.csv",),
            labels=("neutral", "joyful", "scared", "mad", "peaceful", "powerful", "sad"),
            dialogue_columns=("Season", "Episode", "Scene_ID"),
            dialogue_format="s{Season:02d}e{Episode:02d}c{Scene_ID:02d}",
            turn_column="Utterance_ID",
            order_column="Utterance_ID",
            start_column="Start_Time",
            end_column="End_Time",
            parse_speaker=parse_speaker_list,
            source_url=_GITHUB_MELD.replace("{file}", "emorynlp/{file}"),
        ),
        CorpusSpec(
            name="iemocap",
            description="IEMOCAP, common text CSV layout (the corpus needs a signed release form)",
            folder="iemocap",
            # the project's own names, then TelME's and most repositories'
            file_names=("{split}.csv", "IEMOCAP_{split}.csv"),
            labels=("hap", "sad", "neu", "ang", "exc", "fru"),
            label_aliases={
                "happy": "hap", "happiness": "hap", "sadness": "sad", "neutral": "neu",
                "angry": "ang", "anger": "ang", "excited": "exc", "frustrated": "fru",
                "frustration": "fru",
            },
            dialogue_columns=("Dialogue_ID",),
            dialogue_format="{Dialogue_ID}",
            turn_column="Speaker",  # the utterance id, e.g. Ses05M_script03_2_F001
            order_column="Start_Time",
            integer_ids=False,
            start_column="Start_Time",
            end_column="End_Time",
            audio_column="Wav_Path",
            video_column="Video_Path",
            parse_speaker=parse_iemocap_speaker,
        ),
        *(
            CorpusSpec(
                name=name,
                description=description,
                folder="ravdess",
                # the project's 16 kHz FLAC copy, then the authors' Audio_Speech_Actors_01-24 (48 kHz WAV)
                file_names=("speech16k", "Audio_Speech_Actors_01-24"),
                labels=labels,
                label_aliases=aliases,
                dialogue_columns=(),
                dialogue_format="",
                turn_column="",
                order_column="",
                layout="clips",
                reader=read_ravdess,
                obtain=_RAVDESS_OBTAIN,
            )
            for name, description, labels, aliases in (
                ("ravdess", "RAVDESS emotional speech (Livingstone & Russo 2018), one clip a turn, split by actor",
                 RAVDESS_LABELS, {}),
                ("ravdess-meld", "RAVDESS emotional speech on MELD's 7 labels (calm -> neutral), split by actor",
                 _MELD_LABELS, RAVDESS_TO_MELD),
            )
        ),
    )
}


def get_corpus(name: str) -> CorpusSpec:
    """The spec of a corpus by name (``meld``, ``meld-dyadic``, ``emorynlp``, ``iemocap``, ``ravdess``,
    ``ravdess-meld``)."""
    key = name.lower().replace("_", "-")
    if key not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of: {', '.join(CORPORA)}")
    return CORPORA[key]


# ----------------------------------------------------------------------------- the reader


@dataclass
class _Row:
    record: CsvRecord
    dialogue_id: str
    turn_key: str
    order: float
    speaker: str
    label: str | None
    media: MediaRef | None


def read_split(spec: CorpusSpec, path: str | Path, split: Split) -> CorpusSplit:
    """Read one split file of ``spec``'s layout into dialogues of ordered, typed turns (a spec with
    its own ``reader`` reads ``path``, its clip folder, its own way).

    Raises :class:`DataError` naming the file, line and field for a missing file or column, an
    unknown label, a non-integer or duplicate (dialogue, turn) id, non-UTF-8 bytes or an empty file.
    """
    path = Path(path)
    if spec.reader is not None:
        return spec.reader(spec, path, split)
    _, records = read_csv(path, spec.required_columns)
    rows = [_parse_row(spec, split, path, rec) for rec in records]

    seen: dict[tuple[str, str], int] = {}
    by_dialogue: dict[str, list[_Row]] = {}
    for row in rows:
        key = (row.dialogue_id, row.turn_key)
        if key in seen:
            raise DataError(
                f"duplicate turn: dialogue {row.dialogue_id} turn {row.turn_key} already on line {seen[key]}",
                file=path,
                line=row.record.line,
                field=spec.turn_column,
            )
        seen[key] = row.record.line
        by_dialogue.setdefault(row.dialogue_id, []).append(row)

    dialogues = []
    for dialogue_id, members in by_dialogue.items():
        members.sort(key=lambda r: (r.order, r.record.line))
        turns = tuple(
            Turn(
                corpus=spec.name,
                split=split,
                dialogue_id=dialogue_id,
                turn_id=int(r.turn_key) if spec.integer_ids else index,
                index=index,
                speaker=r.speaker,
                text=r.record.fields[spec.text_column].strip(),
                label=r.label,
                source=SourceRef(str(path), r.record.line),
                media=r.media,
            )
            for index, r in enumerate(members)
        )
        dialogues.append(Dialogue(spec.name, split, dialogue_id, turns))
    return CorpusSplit(spec.name, split, spec.labels, tuple(dialogues), files=(str(path),))


def _parse_row(spec: CorpusSpec, split: Split, path: Path, rec: CsvRecord) -> _Row:
    f = rec.fields

    def fail(column: str, message: str) -> DataError:
        return DataError(message, file=path, line=rec.line, field=column)

    def integer(column: str) -> int:
        value = f[column].strip()
        try:
            return int(value)
        except ValueError:
            raise fail(column, f"expected an integer id, got {value!r}") from None

    def seconds(column: str | None) -> float | None:
        if column is None or not f[column].strip():
            return None
        try:
            return parse_seconds(f[column])
        except ValueError:
            raise fail(column, f"expected a time like 00:01:02,345 or seconds, got {f[column]!r}") from None

    if spec.integer_ids:
        parts = {c: integer(c) for c in spec.dialogue_columns}
        turn_key = str(integer(spec.turn_column))
    else:
        parts = {c: f[c].strip() for c in spec.dialogue_columns}
        turn_key = f[spec.turn_column].strip()
        for column in (*spec.dialogue_columns, spec.turn_column):
            if not f[column].strip():
                raise fail(column, "empty id")
    dialogue_id = spec.dialogue_format.format(**parts)

    if spec.order_column == spec.turn_column and spec.integer_ids:
        order = float(turn_key)
    else:
        order_value = seconds(spec.order_column)
        if order_value is None:
            raise fail(spec.order_column, "empty; turns are ordered by this column")
        order = order_value

    try:
        speaker = spec.parse_speaker(f[spec.speaker_column])
    except (ValueError, SyntaxError) as err:
        raise fail(spec.speaker_column, f"cannot read speaker {f[spec.speaker_column]!r}: {err}") from None

    label = _parse_label(spec, f[spec.label_column], fail)

    start, end = seconds(spec.start_column), seconds(spec.end_column)
    media_path = (f[spec.audio_column].strip() or None) if spec.audio_column else None
    if spec.media_name is not None:
        try:
            media_path = spec.media_name(split, f)
        except (KeyError, ValueError):
            media_path = None  # the clip name columns are optional extras
    video = (f[spec.video_column].strip() or None) if spec.video_column else None
    has_media = any(v is not None for v in (media_path, video, start, end))
    media = MediaRef(media_path, video, start, end) if has_media else None
    return _Row(rec, dialogue_id, turn_key, order, speaker, label, media)


def _parse_label(spec: CorpusSpec, raw: str, fail: Callable[[str, str], DataError]) -> str | None:
    value = raw.strip().lower()
    if not value:
        return None  # unlabelled turn
    value = spec.label_aliases.get(value, value)
    if value not in spec.labels:
        raise fail(spec.label_column, f"unknown label {raw!r}; {spec.name} labels are: {', '.join(spec.labels)}")
    return value


def check_splits(splits: Iterable[str]) -> tuple[Split, ...]:
    """``splits`` as a tuple, each one of :data:`SPLITS` (ValueError otherwise)."""
    splits = tuple(splits)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return splits


def missing_split_error(spec: CorpusSpec, root: Path, split: Split, reason: str | None = None) -> DataError:
    """The DataError for a split file that is not in data dir ``root``: it names the file, the names
    tried and how to get the corpus (``reason``: why an automatic fetch did not help, if one ran)."""
    folder = Path(root) / spec.folder
    tried = " or ".join(spec.candidates(split))
    if spec.obtain:
        how = (
            f"{spec.obtain.format(folder=folder)}; or point --data-dir or ${DATA_ENV} at a folder that holds "
            f"{spec.folder}/"
        )
    elif spec.source_url:
        how = (
            f"get it with `erc-distill fetch-data {spec.name} --data-dir {root}`, or point --data-dir "
            f"or ${DATA_ENV} at a folder that holds {spec.folder}/"
        )
    else:
        names = " or ".join(
            "(" + ", ".join(pattern.format(split=s) for s in SPLITS) + ")" for pattern in spec.file_names
        )
        how = (
            f"place the {spec.name} CSVs {names} in {folder} (it cannot be downloaded: its license "
            f"needs a signed form), or point --data-dir or ${DATA_ENV} at a folder that holds {spec.folder}/"
        )
    message = f"{spec.name} {split} split not found in data dir {root} (tried {tried} in {folder}); {how}"
    if reason:
        message += f"; {reason}"
    return DataError(message, file=folder / spec.files[split])


def load_corpus(name: str, split: Split, data_dir: str | Path | None = None) -> CorpusSplit:
    """Read ``split`` of corpus ``name`` from the data directory (see :func:`resolve_data_dir`)."""
    spec = get_corpus(name)
    check_splits([split])
    root = resolve_data_dir(data_dir)
    path = spec.find(root, split)
    if path is None:
        raise missing_split_error(spec, root, split)
    return read_split(spec, path, split)
