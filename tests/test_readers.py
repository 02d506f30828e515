"""Corpus readers on the fixture corpora and on the real shared data."""

from __future__ import annotations

import pytest

from erc_distill.data import get_corpus, load_corpus
from erc_distill.data.corpora import parse_seconds
from erc_distill.errors import DataError

# --------------------------------------------------------------------------- fixtures


def test_meld_orders_turns_by_utterance_id_not_file_order(fixture_data):
    data = load_corpus("meld", "train", fixture_data)
    d0 = data.dialogue(0)
    assert [t.turn_id for t in d0.turns] == [0, 1, 2, 4]  # file order is 0, 2, 1, 4; 3 is a gap
    assert [t.index for t in d0.turns] == [0, 1, 2, 3]
    assert [t.speaker for t in d0.turns] == ["Rachel", "Ross", "Chandler", "Rachel"]
    d1 = data.dialogue("1")
    assert [t.text for t in d1.turns][:2] == ["I lost my job today.", "Why are you so sad?"]


def test_meld_turn_fields(fixture_data):
    data = load_corpus("meld", "train", fixture_data)
    t = data.dialogue(0).turn(2)
    assert t.text == "It's a duck, Rach.\nA baby duck."  # a quoted field spanning two lines
    assert t.label == "neutral" and t.split == "train" and t.corpus == "meld"
    assert t.source.file.endswith("meld/train_sent_emo.csv") and t.source.line == 3
    assert data.dialogue(0).turn(1).source.line == 5  # the multi-line record shifts later lines
    assert t.example_id == "meld/train/0/2"
    assert t.media.path == "train_splits/dia0_utt2.mp4"
    assert t.media.start == pytest.approx(65.0) and t.media.end == pytest.approx(67.5)
    assert data.labels == ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


def test_emorynlp_scenes_and_list_speakers(fixture_data):
    data = load_corpus("emorynlp", "train", fixture_data)
    assert [d.dialogue_id for d in data.dialogues] == ["s01e02c01", "s01e02c02"]
    scene = data.dialogue("s01e02c01")
    assert [t.speaker for t in scene.turns] == ["Monica Geller", "Joey Tribbiani", "Chandler Bing & Ross Geller"]
    assert [t.label for t in scene.turns] == ["joyful", "neutral", "scared"]
    assert data.dialogue("s01e02c02").turns[0].label == "powerful"  # labels are case-insensitive
    assert scene.turns[0].media.start == pytest.approx(2.877)


def test_iemocap_speaker_letter_start_time_order_and_aliases(fixture_data):
    data = load_corpus("iemocap", "train", fixture_data)
    d = data.dialogue("Ses01F_impro01")
    assert [t.text for t in d.turns] == [
        "Excuse me.", "Do you have your forms?", "Well I'm glad you came.", "This is so frustrating!",
    ]
    assert [t.speaker for t in d.turns] == ["F", "M", "M", "F"]
    assert [t.turn_id for t in d.turns] == [0, 1, 2, 3]
    assert [t.label for t in d.turns] == ["neu", "fru", "neu", "fru"]  # 'frustrated' is an alias
    assert d.turns[0].media.path == "Session1/wav/Ses01F_impro01_F000.wav"
    assert d.turns[0].media.video_path == "Session1/avi/Ses01F_impro01.avi"
    assert data.dialogue("Ses02M_script01_1").turns[1].label == "hap"
    assert data.labels == ("hap", "sad", "neu", "ang", "exc", "fru")


IEMOCAP_HEADER = "Utterance,Speaker,Dialogue_ID,Start_Time,End_Time,Wav_Path,Video_Path,Emotion\n"


def iemocap_csv(path, *rows: tuple[str, str, float, str]):
    """A tiny CSV in IEMOCAP's common text layout: (text, utterance id, start, label) rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{text},{utt},{utt.rsplit('_', 1)[0]},{start},{start + 1},{utt}.wav,{utt.rsplit('_', 1)[0]}.avi,{label}\n"
        for text, utt, start, label in rows
    ]
    path.write_text(IEMOCAP_HEADER + "".join(lines), encoding="utf-8")
    return path


def test_iemocap_reads_telme_file_names(tmp_path):
    folder = tmp_path / "iemocap"
    for split in ("train", "dev", "test"):
        iemocap_csv(
            folder / f"IEMOCAP_{split}.csv",
            (f"{split} two.", "Ses01F_impro01_M000", 2.0, "ang"),
            (f"{split} one.", "Ses01F_impro01_F000", 1.0, "excited"),
        )
    for split in ("train", "dev", "test"):
        data = load_corpus("iemocap", split, tmp_path)
        d = data.dialogue("Ses01F_impro01")
        assert [t.text for t in d.turns] == [f"{split} one.", f"{split} two."]
        assert [t.label for t in d.turns] == ["exc", "ang"]
        assert data.files == (str(folder / f"IEMOCAP_{split}.csv"),)


def test_iemocap_first_existing_name_wins(tmp_path):
    folder = tmp_path / "iemocap"
    iemocap_csv(folder / "train.csv", ("Ours.", "Ses01F_impro01_F000", 1.0, "neu"))
    iemocap_csv(folder / "IEMOCAP_train.csv", ("TelME's.", "Ses01F_impro01_F000", 1.0, "sad"))
    assert get_corpus("iemocap").candidates("train") == ("train.csv", "IEMOCAP_train.csv")
    data = load_corpus("iemocap", "train", tmp_path)
    assert [t.text for t in data.turns] == ["Ours."]
    (folder / "train.csv").unlink()
    assert [t.text for t in load_corpus("iemocap", "train", tmp_path).turns] == ["TelME's."]


def test_missing_iemocap_lists_both_names_tried(tmp_path):
    with pytest.raises(DataError) as err:
        load_corpus("iemocap", "test", tmp_path)
    message = str(err.value)
    assert err.value.file == str(tmp_path / "iemocap" / "test.csv")
    assert "tried test.csv or IEMOCAP_test.csv" in message
    assert "(IEMOCAP_train.csv, IEMOCAP_dev.csv, IEMOCAP_test.csv)" in message
    assert "$ERC_DISTILL_DATA" in message and "fetch-data" not in message  # it cannot be downloaded


def test_other_corpora_keep_their_single_file_names():
    assert get_corpus("meld").files == {
        "train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv",
    }
    assert get_corpus("emorynlp").candidates("dev") == ("emorynlp_dev_final.csv",)
    assert get_corpus("meld-dyadic").files["test"] == "test_sent_emo_dya.csv"


@pytest.mark.parametrize(
    "text, seconds",
    [("00:16:16,059", 976.059), ("00:00:02.877", 2.877), ("1:02.5", 62.5), ("6.2901", 6.2901)],
)
def test_parse_seconds(text, seconds):
    assert parse_seconds(text) == pytest.approx(seconds)


# --------------------------------------------------------------------------- the real corpora

REAL = [
    ("meld", (9989, 1109, 2610), (1038, 114, 280)),
    ("emorynlp", (7551, 954, 984), (659, 89, 79)),
    ("meld-dyadic", (12840, 1462, 3400), None),
]


@pytest.mark.realdata
@pytest.mark.parametrize("corpus, utterances, dialogues", REAL)
def test_real_corpus_counts(real_data, corpus, utterances, dialogues):
    for i, split in enumerate(("train", "dev", "test")):
        data = load_corpus(corpus, split, real_data)
        assert len(data.turns) == utterances[i]
        if dialogues:
            assert len(data.dialogues) == dialogues[i]
        ids = [t.example_id for t in data.turns]
        assert len(set(ids)) == len(ids)
        for d in data.dialogues:
            assert [t.turn_id for t in d.turns] == sorted(t.turn_id for t in d.turns)
            assert [t.index for t in d.turns] == list(range(len(d)))
        assert all(t.label in data.labels for t in data.turns)


@pytest.mark.realdata
def test_real_meld_train_label_counts(real_data):
    data = load_corpus("meld", "train", real_data)
    counts = {label: sum(t.label == label for t in data.turns) for label in data.labels}
    assert counts == {
        "neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109,
        "sadness": 683, "disgust": 271, "fear": 268,
    }


@pytest.mark.realdata
def test_real_meld_rows_keep_their_source_line(real_data):
    data = load_corpus("meld", "test", real_data)
    lines = (real_data / "meld" / "test_sent_emo.csv").read_text("utf-8").splitlines()
    turn = data.dialogue(5).turn(3)
    assert turn.text in lines[turn.source.line - 1]
    assert turn.media.path == "output_repeated_splits_test/dia5_utt3.mp4"


@pytest.mark.realdata
def test_real_emorynlp_multi_speaker_turns(real_data):
    data = load_corpus("emorynlp", "train", real_data)
    joint = [t.speaker for t in data.turns if " & " in t.speaker]
    assert joint and all(not s.startswith("[") for s in joint)
