"""The teacher-labelled transfer set: leakage filters against MELD dev/test, augmentations, report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from erc_distill.data.corpora import load_corpus
from erc_distill.data.transfer import (
    MIN_MATCH_CHARS,
    TRANSFER_SOURCES,
    build_transfer_set,
    meld_episodes,
    normalise,
    scene_episode,
    span,
)
from erc_distill.errors import ConfigError

MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
               "Season", "Episode", "StartTime", "EndTime"]
EMORY_HEADER = ["Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode",
                "Start_Time", "End_Time"]

CHEESECAKE = "I cannot believe you ate the whole cheesecake."  # MELD dev
BREAK = "We were on a break, that is the whole point!"  # MELD test


def _meld(dialogue: int, season: int, episode: int, minute: int, lines: list[tuple[str, str]]):
    """MELD rows: one turn every 5 s from ``minute``, each 4 s long."""
    return [
        [0, text, speaker, "neutral", "neutral", dialogue, u, season, episode,
         f"00:{minute:02d}:{5 * u:02d},000", f"00:{minute:02d}:{5 * u + 4:02d},000"]
        for u, (speaker, text) in enumerate(lines)
    ]


def _scene(scene: int, season: int, episode: int, minute: int, lines: list[tuple[str, str]]):
    return [
        [text, f"['{speaker}']", "Neutral", scene, u + 1, season, episode,
         f"00:{minute:02d}:{5 * u:02d}.000", f"00:{minute:02d}:{5 * u + 4:02d}.000"]
        for u, (speaker, text) in enumerate(lines)
    ]


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """MELD dev (s03e04, 10:00-10:19) and test (s05e06, 02:00-02:09) dialogues, MELD train dialogues to
    augment, and EmoryNLP scenes that overlap / do not overlap / share a text / share a short text."""
    root = tmp_path / "data"
    meld = root / "meld"
    _write(meld / "train_sent_emo.csv", MELD_HEADER, [
        *_meld(0, 2, 5, 1, [("Ross", "Hi."), ("Rachel", "Hey."), ("Ross", "How are you?"),
                            ("Joey", "Food!"), ("Rachel", "Fine.")]),
        *_meld(1, 2, 5, 3, [("Monica", "Clean."), ("Chandler", "Sure.")]),
        *_meld(2, 2, 6, 1, [("Phoebe", "La."), ("Joey", "Hey."), ("Phoebe", "Smelly cat."), ("Joey", "What?")]),
        *_meld(3, 2, 7, 1, [("Ross", "Okay."), ("Rachel", BREAK.upper())]),  # repeats a test text
    ])
    _write(meld / "dev_sent_emo.csv", MELD_HEADER,
           _meld(0, 3, 4, 10, [("Monica", "Okay."), ("Joey", CHEESECAKE), ("Monica", "So?"), ("Joey", "Yes.")]))
    _write(meld / "test_sent_emo.csv", MELD_HEADER,
           _meld(0, 5, 6, 2, [("Ross", BREAK), ("Rachel", "No.")]))
    emory = root / "emorynlp"
    _write(emory / "emorynlp_train_final.csv", EMORY_HEADER, [
        *_scene(1, 3, 4, 10, [("Ross Geller", "Different words entirely here."), ("Joey Tribbiani", "Yep.")]),
        *_scene(2, 3, 4, 20, [("Ross Geller", "A scene later in the same episode."), ("Joey Tribbiani", "Yes.")]),
    ])
    _write(emory / "emorynlp_dev_final.csv", EMORY_HEADER,
           _scene(1, 5, 6, 15, [("Ross Geller", "Hm."), ("Rachel Green", "we were on a BREAK -- that is the whole point")]))
    _write(emory / "emorynlp_test_final.csv", EMORY_HEADER,
           _scene(1, 1, 1, 1, [("Monica Geller", "Okay."), ("Chandler Bing", "So?"), ("Joey Tribbiani", "Okay.")]))
    return root


def test_normalise():
    assert normalise("  We were on a BREAK -- that's... it!! ") == "we were on a break that s it"
    assert normalise("You must\u2019ve") == normalise("You must've") == "you must ve"
    assert normalise("Okay.") == "okay" and len(normalise(BREAK)) > MIN_MATCH_CHARS


def test_emorynlp_scenes_are_filtered_by_time_and_text(data):
    ts = build_transfer_set(["emorynlp"], data)
    kept = {d.dialogue_id.split("-", 1)[1] for d in ts.dialogues}  # ids are "<source split>-<scene>"
    # s03e04c01 overlaps the dev dialogue in time; s05e06c01 repeats the test text (its time does not overlap)
    assert kept == {"s03e04c02", "s01e01c01"}  # same episode later / only short shared texts ("Okay.", "So?")
    r = ts.report
    assert (r.scenes_read, r.scenes_removed_time, r.scenes_removed_text, r.scenes_kept) == (4, 1, 1, 2)
    assert r.scene_turns_kept == 5 == len(ts.turns)
    assert r.mask_dialogues == r.short_dialogues == r.meld_train_removed_text == 0
    assert all(d.corpus == "emorynlp-transfer" for d in ts.dialogues)
    scene = next(d for d in ts.dialogues if d.dialogue_id.endswith("-s01e01c01"))
    assert [t.speaker for t in scene.turns] == ["Monica Geller", "Chandler Bing", "Joey Tribbiani"]


def test_mask_renames_speakers_in_order_of_first_appearance(data):
    ts = build_transfer_set(["mask"], data)
    first = ts.dialogues[0]
    assert (first.corpus, first.dialogue_id) == ("meld-mask", "0")
    assert [t.speaker for t in first.turns] == ["Speaker 1", "Speaker 2", "Speaker 1", "Speaker 3", "Speaker 2"]
    original = load_corpus("meld", "train", data).dialogue(0)
    assert [t.text for t in first.turns] == [t.text for t in original.turns]


def test_short_drops_the_first_half(data):
    ts = build_transfer_set(["short"], data)
    by_id = {d.dialogue_id: d for d in ts.dialogues}
    assert set(by_id) == {"0", "2"}  # dialogue 1 has 2 turns; 3 repeats a test text
    five = by_id["0"]
    assert [t.turn_id for t in five.turns] == [2, 3, 4]  # starts at 5 // 2
    assert [t.index for t in five.turns] == [0, 1, 2]
    assert [t.speaker for t in five.turns] == ["Ross", "Joey", "Rachel"]  # real names kept
    assert [t.turn_id for t in by_id["2"].turns] == [2, 3]


def test_every_turn_is_unlabelled_train_with_a_unique_non_meld_id(data):
    ts = build_transfer_set(TRANSFER_SOURCES, data)
    ids = [t.example_id for t in ts.turns]
    assert len(ids) == len(set(ids)) and not any(i.startswith("meld/") for i in ids)
    assert {t.corpus for t in ts.turns} == {"emorynlp-transfer", "meld-mask", "meld-short"}
    assert all(t.label is None and t.split == "train" for t in ts.turns)
    for d in ts.dialogues:
        assert all(t.corpus == d.corpus and t.dialogue_id == d.dialogue_id for t in d.turns)
        assert [t.index for t in d.turns] == list(range(len(d)))
    # augmentations come from MELD train only, never a train dialogue that repeats a dev/test text
    augmented = [t for t in ts.turns if t.corpus.startswith("meld-")]
    assert all(t.source.file.endswith("train_sent_emo.csv") for t in augmented)
    assert "3" not in {t.dialogue_id for t in augmented}
    assert ts.report.meld_train_removed_text == 1


def test_report_counts_and_fingerprint(data):
    ts = build_transfer_set(TRANSFER_SOURCES, data)
    r = ts.report
    assert r.sources == TRANSFER_SOURCES
    assert r.scenes_read == r.scenes_removed_time + r.scenes_removed_text + r.scenes_kept
    assert len(ts.dialogues) == r.scenes_kept + r.mask_dialogues + r.short_dialogues == 2 + 3 + 2
    assert len(ts.turns) == r.scene_turns_kept + r.mask_turns + r.short_turns == 5 + 11 + 5
    d = r.to_dict()
    assert d["fingerprint"] == r.fingerprint and len(r.fingerprint) == 16 and "overlap" in d["rules"]
    assert build_transfer_set(TRANSFER_SOURCES, data).report.fingerprint == r.fingerprint
    assert build_transfer_set(["mask"], data).report.fingerprint != r.fingerprint


def test_limit(data):
    ts = build_transfer_set(TRANSFER_SOURCES, data, limit=1)
    r = ts.report
    assert r.scenes_read == 1 and {d.dialogue_id.split("-", 1)[1] for d in ts.dialogues
                                   if d.corpus == "emorynlp-transfer"} == {
        "s01e01c01"}  # the first scene id in sorted order
    assert (r.mask_dialogues, r.short_dialogues) == (1, 1)
    assert {d.dialogue_id for d in ts.dialogues if d.corpus.startswith("meld-")} == {"0"}
    assert build_transfer_set(TRANSFER_SOURCES, data, limit=0).dialogues == ()


def test_unknown_source_is_a_config_error(data):
    with pytest.raises(ConfigError, match="'movies'.*emorynlp, mask, short") as err:
        build_transfer_set(["emorynlp", "movies"], data)
    assert err.value.field == "--transfer"
    with pytest.raises(ConfigError):
        build_transfer_set([], data)
    with pytest.raises(ConfigError, match=">= 0"):
        build_transfer_set(["mask"], data, limit=-1)


# --------------------------------------------------------------------------- the real corpora


@pytest.mark.realdata
def test_real_transfer_set_keeps_dev_and_test_out_of_training(real_data):
    ts = build_transfer_set(TRANSFER_SOURCES, real_data)
    r = ts.report
    print({k: v for k, v in r.to_dict().items() if k != "rules"})

    held_texts, held_spans, held_ids = set(), {}, set()
    for split in ("dev", "test"):
        episodes = meld_episodes(real_data, split)
        for d in load_corpus("meld", split, real_data).dialogues:
            held_ids.add((split, d.dialogue_id))
            held_texts |= {n for n in (normalise(t.text) for t in d.turns) if len(n) > MIN_MATCH_CHARS}
            held_spans.setdefault(episodes[d.dialogue_id], []).append(span(d))

    # no dev/test text reaches training through any transfer turn
    assert not [t.example_id for t in ts.turns if normalise(t.text) in held_texts]
    # no kept EmoryNLP scene overlaps a MELD dev/test dialogue in time in the same episode
    for d in (d for d in ts.dialogues if d.corpus == "emorynlp-transfer"):
        start, end = span(d)
        for b, e in held_spans.get(scene_episode(d.dialogue_id.split("-", 1)[1]), ()):
            assert end < b or e < start, d.dialogue_id
    # augmentations come from MELD train dialogues only
    train_file = str(real_data / "meld" / "train_sent_emo.csv")
    train_ids = {d.dialogue_id for d in load_corpus("meld", "train", real_data).dialogues}
    for t in ts.turns:
        if t.corpus != "emorynlp-transfer":
            assert t.corpus in ("meld-mask", "meld-short") and t.source.file == train_file
            assert t.dialogue_id in train_ids
    ids = [t.example_id for t in ts.turns]
    assert len(ids) == len(set(ids)) and not any(i.startswith("meld/") for i in ids)
    assert all(t.label is None and t.split == "train" for t in ts.turns)

    # counts: all 827 EmoryNLP scenes read, both filters bite, most scenes survive
    assert r.scenes_read == 659 + 89 + 79
    assert r.scenes_removed_time > 0 and r.scenes_removed_text > 0
    assert r.scenes_read == r.scenes_removed_time + r.scenes_removed_text + r.scenes_kept
    assert r.scenes_kept > r.scenes_read // 2 and r.scene_turns_kept > 5000
    assert r.mask_dialogues == 1038 - r.meld_train_removed_text and 0 < r.meld_train_removed_text < 30
    assert 0 < r.short_dialogues < r.mask_dialogues
    assert len(ts.turns) == r.scene_turns_kept + r.mask_turns + r.short_turns
