"""The RAVDESS reader: labels from file names, splits by actor, the MELD mapping, bad names, and its
place in the shared corpus API (load_corpus, data-stats, fingerprint, ensure_corpus)."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from erc_distill.cli import main
from erc_distill.data import (
    CORPORA,
    RAVDESS_LABELS,
    corpus_fingerprint,
    ensure_corpus,
    get_corpus,
    load_corpus,
    parse_ravdess_name,
    ravdess_to_meld,
)
from erc_distill.data.fetch import fetch_corpus
from erc_distill.data.fingerprint import clips_digest
from erc_distill.data.ravdess import SPLIT_ACTORS
from erc_distill.errors import DataError
from erc_distill.media import load_turn_audio, resolve_media

MELD_LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


def make_ravdess(root: Path, actors=range(1, 25), suffix: str = ".flac", folder: str = "speech16k") -> Path:
    """A data dir with RAVDESS's full speech file-name set as empty files (the reader never decodes)."""
    base = root / "ravdess" / folder
    for actor in actors:
        (base / f"Actor_{actor:02d}").mkdir(parents=True)
        for emotion in range(1, 9):
            for intensity in (1,) if emotion == 1 else (1, 2):
                for statement in (1, 2):
                    for repetition in (1, 2):
                        name = f"03-01-{emotion:02d}-{intensity:02d}-{statement:02d}-{repetition:02d}-{actor:02d}"
                        (base / f"Actor_{actor:02d}" / f"{name}{suffix}").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def real_ravdess(real_data) -> Path:
    if not (real_data / "ravdess" / "speech16k").is_dir():
        reason = f"ravdess/speech16k not in {real_data}"
        if os.environ.get("ERC_DISTILL_REQUIRE_DATA"):
            pytest.fail(reason + " (ERC_DISTILL_REQUIRE_DATA is set)")
        pytest.skip(reason)
    return real_data


# --------------------------------------------------------------------------- file names


def test_parse_a_name():
    name = parse_ravdess_name("Actor_12/03-01-06-01-02-01-12.wav")
    assert (name.modality, name.vocal_channel, name.emotion, name.intensity) == (
        "audio-only", "speech", "fearful", "normal")
    assert (name.statement, name.repetition, name.actor, name.sex) == (2, 1, 12, "female")
    assert name.text == "Dogs are sitting by the door" and name.speaker == "Actor 12 (female)"
    assert name.split == "train" and parse_ravdess_name("01-01-08-02-01-02-21.mp4").split == "test"
    assert parse_ravdess_name("03-01-02-02-01-01-17.flac").sex == "male"


@pytest.mark.parametrize(
    "name, field",
    [
        ("04-01-01-01-01-01-01.wav", "modality"),
        ("03-03-01-01-01-01-01.wav", "vocal channel"),
        ("03-01-09-01-01-01-01.wav", "emotion"),
        ("03-01-00-01-01-01-01.wav", "emotion"),
        ("03-01-03-03-01-01-01.wav", "intensity"),
        ("03-01-01-02-01-01-01.wav", "intensity"),  # neutral has no strong intensity
        ("03-01-03-01-03-01-01.wav", "statement"),
        ("03-01-03-01-01-03-01.wav", "repetition"),
        ("03-01-03-01-01-01-25.wav", "actor"),
        ("03-01-03-01-01-01-00.wav", "actor"),
        ("03-01-03-01-01-01.wav", "file name"),
        ("03-01-3-01-01-01-01.wav", "file name"),
        ("happy_actor1.wav", "file name"),
    ],
)
def test_bad_names_name_the_field(name, field):
    with pytest.raises(DataError) as err:
        parse_ravdess_name(Path("/corpus/Actor_01") / name)
    assert err.value.field == field and err.value.file == f"/corpus/Actor_01/{name}"
    assert name in str(err.value)


def test_meld_mapping():
    assert [ravdess_to_meld(label) for label in RAVDESS_LABELS] == [
        "neutral", "neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise"]
    assert set(map(ravdess_to_meld, RAVDESS_LABELS)) == set(MELD_LABELS)
    with pytest.raises(ValueError, match="not a RAVDESS label"):
        ravdess_to_meld("joy")


# --------------------------------------------------------------------------- the reader on a synthetic layout


def test_reader_on_the_full_name_set(tmp_path):
    root = make_ravdess(tmp_path)
    sizes = {split: len(load_corpus("ravdess", split, root).turns) for split in ("train", "dev", "test")}
    assert sizes == {"train": 960, "dev": 240, "test": 240}
    dev = load_corpus("ravdess", "dev", root)
    d = dev.dialogues[0]
    assert len(d) == 1 and d.dialogue_id == "03-01-01-01-01-01-17"
    t = d.turns[0]
    assert (t.corpus, t.split, t.turn_id, t.index, t.label) == ("ravdess", "dev", 0, 0, "neutral")
    assert t.speaker == "Actor 17 (male)" and t.text == "Kids are talking by the door"
    assert t.example_id == "ravdess/dev/03-01-01-01-01-01-17/0"
    assert t.media.path == str((root / "ravdess/speech16k/Actor_17/03-01-01-01-01-01-17.flac").absolute())
    assert t.source.file == t.media.path and t.media.start is None
    assert dev.labels == RAVDESS_LABELS


def test_authors_folder_name_and_wavs(tmp_path):
    root = make_ravdess(tmp_path, actors=[21, 22], suffix=".wav", folder="Audio_Speech_Actors_01-24")
    test = load_corpus("ravdess", "test", root)
    assert len(test.turns) == 120 and test.turns[0].media.path.endswith(".wav")
    assert {t.speaker for t in test.turns} == {"Actor 21 (male)", "Actor 22 (female)"}


def test_other_files_are_ignored_and_video_only_clips_skipped(tmp_path):
    root = make_ravdess(tmp_path, actors=[1])
    actor = root / "ravdess/speech16k/Actor_01"
    (actor / "README.txt").write_text("notes")
    (actor / ".03-01-01-01-01-01-01.flac").write_bytes(b"")  # hidden (macOS resource fork)
    (actor / "02-01-03-01-01-01-01.mp4").write_bytes(b"")  # video only: no audio track
    assert len(load_corpus("ravdess", "train", root).turns) == 60


@pytest.mark.parametrize(
    "extra, field, message",
    [
        ("Actor_01/03-01-09-01-01-01-01.flac", "emotion", "emotion code 09"),
        ("Actor_01/03-02-03-01-01-01-01.wav", "vocal channel", "song"),
        ("Actor_01/03-01-03-01-01-01-02.flac", "actor", "Actor_01/"),
        ("Actor_01/01-01-03-01-01-01-01.mp4", "file name", "same recording"),  # the AV copy of a take
        ("Actor_21/03-01-03-01-01-01-21.wav.flac", "file name", "seven 2-digit codes"),
    ],
)
def test_a_bad_file_anywhere_is_a_data_error(tmp_path, extra, field, message):
    root = make_ravdess(tmp_path, actors=[1, 21])
    bad = root / "ravdess/speech16k" / extra
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"")
    for split in ("train", "test"):  # every split checks the whole folder
        with pytest.raises(DataError, match=message) as err:
            load_corpus("ravdess", split, root)
        assert err.value.field == field
        assert err.value.file in (str(bad.absolute()), str(bad.parent.absolute() / "03-01-03-01-01-01-01.flac"))


def test_empty_folder_and_missing_split(tmp_path):
    (tmp_path / "ravdess" / "speech16k").mkdir(parents=True)
    with pytest.raises(DataError, match="no RAVDESS clips"):
        load_corpus("ravdess", "train", tmp_path)
    root = make_ravdess(tmp_path / "some", actors=[1, 2])
    with pytest.raises(DataError, match=r"no clips of the dev split's actors \(17-20\)"):
        load_corpus("ravdess", "dev", root)


def test_ravdess_meld_labels(tmp_path):
    root = make_ravdess(tmp_path, actors=[21])
    data = load_corpus("ravdess-meld", "test", root)
    assert data.labels == MELD_LABELS and data.corpus == "ravdess-meld"
    counts = Counter(t.label for t in data.turns)
    assert counts == {"neutral": 12, "joy": 8, "surprise": 8, "anger": 8, "sadness": 8, "disgust": 8, "fear": 8}
    assert data.turns[0].example_id.startswith("ravdess-meld/test/")


def test_registered_like_every_corpus():
    for name in ("ravdess", "ravdess-meld"):
        spec = get_corpus(name)
        assert CORPORA[name] is spec and spec.layout == "clips" and spec.source_url is None
        assert spec.candidates("dev") == ("speech16k", "Audio_Speech_Actors_01-24")
    assert get_corpus("RAVDESS").name == "ravdess"


# --------------------------------------------------------------------------- missing corpus, fingerprint


def test_missing_corpus_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_corpus("ravdess", tmp_path, log=None)
    message = str(err.value)
    assert "zenodo" in message.lower() and "1188976" in message and "CC BY-NC-SA" in message
    assert str(tmp_path / "ravdess" / "Audio_Speech_Actors_01-24") in message and "fetch-data" not in message
    with pytest.raises(DataError, match="cannot be fetched.*Zenodo"):
        fetch_corpus("ravdess", tmp_path)
    assert ensure_corpus("ravdess", make_ravdess(tmp_path / "here", actors=[1, 17, 21]), log=None)


def test_fingerprint_with_a_manifest(tmp_path):
    root = make_ravdess(tmp_path / "a", actors=[1, 17, 21])
    base = root / "ravdess"
    lines = [f"{i:064x}  ./speech16k/{p.relative_to(base / 'speech16k').as_posix()}"
             for i, p in enumerate(sorted((base / "speech16k").rglob("*.flac")))]
    lines.append(f"{0:064x}  ./original48k/Actor_01/03-01-01-01-01-01-01.wav")  # not in the clip folder
    (base / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    first = corpus_fingerprint("ravdess", root)
    assert first != corpus_fingerprint("ravdess-meld", root)
    assert corpus_fingerprint("ravdess", root, ["test"]) != first

    clip = base / "speech16k/Actor_01/03-01-05-01-01-01-01.flac"
    os.utime(clip, ns=(1, 1))
    assert corpus_fingerprint("ravdess", root) == first  # listed: the manifest's sum, not the mtime
    copy = tmp_path / "b"
    shutil.copytree(root, copy)  # new mtimes, same names, sizes and manifest
    assert corpus_fingerprint("ravdess", copy) == first

    clip.write_bytes(b"x")  # resized
    assert corpus_fingerprint("ravdess", root) != first
    clip.write_bytes(b"")
    assert corpus_fingerprint("ravdess", root) == first
    clip.rename(clip.with_name("03-01-05-01-01-02-01.flac.bak"))  # a clip gone (and a stray file)
    assert corpus_fingerprint("ravdess", root) != first


def test_fingerprint_without_a_manifest_uses_mtimes(tmp_path):
    root = make_ravdess(tmp_path, actors=[1])
    folder = root / "ravdess/speech16k"
    first = clips_digest(folder)
    assert clips_digest(folder) == first
    clip = folder / "Actor_01/03-01-05-01-01-01-01.flac"
    os.utime(clip, ns=(10**18, 10**18))
    assert clips_digest(folder) != first


# --------------------------------------------------------------------------- the real corpus


@pytest.mark.realdata
def test_real_ravdess_counts_and_splits(real_ravdess):
    splits = {split: load_corpus("ravdess", split, real_ravdess) for split in ("train", "dev", "test")}
    assert {s: len(d.turns) for s, d in splits.items()} == {"train": 960, "dev": 240, "test": 240}
    turns = [t for d in splits.values() for t in d.turns]
    assert len({t.media.path for t in turns}) == 1440
    counts = Counter(t.label for t in turns)
    assert counts == {label: 96 if label == "neutral" else 192 for label in RAVDESS_LABELS}
    actors = {s: {parse_ravdess_name(t.media.path).actor for t in d.turns} for s, d in splits.items()}
    assert actors == {s: set(a) for s, a in SPLIT_ACTORS.items()}  # so no actor is in two splits
    for split, data in splits.items():
        assert all(len(d) == 1 for d in data.dialogues)
        sexes = Counter(t.speaker.split("(")[1] for t in data.turns)
        assert sexes["male)"] == sexes["female)"], split
        per_label = Counter(t.label for t in data.turns)
        assert per_label["neutral"] * 2 == per_label["calm"], split  # every actor has every emotion
    assert {t.text for t in turns} == {"Kids are talking by the door", "Dogs are sitting by the door"}
    assert all(Path(t.media.path).is_file() for t in turns)


@pytest.mark.realdata
def test_real_ravdess_meld_and_fingerprint(real_ravdess):
    meld = [t for s in ("train", "dev", "test") for t in load_corpus("ravdess-meld", s, real_ravdess).turns]
    assert Counter(t.label for t in meld) == {"neutral": 288, **{label: 192 for label in MELD_LABELS[1:]}}
    assert corpus_fingerprint("ravdess", real_ravdess) == corpus_fingerprint("ravdess", real_ravdess)


@pytest.mark.realdata
def test_real_data_stats_command(real_ravdess, capsys):
    assert main(["data-stats", "--data", "ravdess", "--data-dir", str(real_ravdess)]) == 0
    out = capsys.readouterr().out
    assert "[ravdess]" in out and "960" in out and "surprised  128 (13.3%)" in out
    assert "test   240         240        4" in out


@pytest.mark.realdata
def test_real_clips_load_and_the_48k_originals_stand_in(real_ravdess):
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    test = load_corpus("ravdess", "test", real_ravdess).turns[:20]
    clips, report = load_turn_audio(test)
    assert report.loaded == 20 and all(2.5 < c.duration_s < 6.0 and c.sample_rate == 16000 for c in clips)
    actor01 = [t for t in load_corpus("ravdess", "train", real_ravdess).turns if t.speaker.startswith("Actor 01")]
    originals = real_ravdess / "ravdess" / "original48k"
    assert resolve_media(actor01[0], originals) == originals / "Actor_01" / f"{actor01[0].dialogue_id}.wav"
    clips, report = load_turn_audio(actor01[:5], originals)
    assert report.loaded == 5 and {c.original_rate for c in clips} == {48000}
