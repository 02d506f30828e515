"""Every kind of bad input is one DataError that names the file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from erc_distill.cli import main
from erc_distill.data import get_corpus, load_corpus, read_split
from erc_distill.errors import DataError

HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
ROW = '{n},{text},{speaker},{label},neutral,{d},{u},1,1,"00:00:01,000","00:00:02,000"\n'


def meld_csv(tmp_path: Path, *rows: str, header: str = HEADER, raw: bytes | None = None) -> Path:
    path = tmp_path / "train_sent_emo.csv"
    path.write_bytes(raw if raw is not None else (header + "".join(rows)).encode("utf-8"))
    return path


def row(n=1, text="Hi.", speaker="Ross", label="neutral", d="0", u="0") -> str:
    return ROW.format(n=n, text=text, speaker=speaker, label=label, d=d, u=u)


def read(path: Path, corpus: str = "meld"):
    return read_split(get_corpus(corpus), path, "train")


def test_missing_file_names_the_fetch_command(tmp_path):
    with pytest.raises(DataError) as err:
        load_corpus("meld", "train", tmp_path)
    assert err.value.file == str(tmp_path / "meld" / "train_sent_emo.csv")
    assert "erc-distill fetch-data meld" in str(err.value)


def test_missing_iemocap_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"place the iemocap CSVs \(train.csv, dev.csv, test.csv\)"):
        load_corpus("iemocap", "dev", tmp_path)


def test_missing_column(tmp_path):
    path = meld_csv(tmp_path, row(), header=HEADER.replace("Emotion", "Emotions"))
    with pytest.raises(DataError) as err:
        read(path)
    e = err.value
    assert (e.file, e.line, e.field) == (str(path), 1, "Emotion")
    assert "Emotions" in e.message  # shows the header it found


def test_unknown_label_lists_the_allowed_ones(tmp_path):
    path = meld_csv(tmp_path, row(), row(n=2, u="1", label="happiness"))
    with pytest.raises(DataError) as err:
        read(path)
    e = err.value
    assert (e.line, e.field) == (3, "Emotion")
    assert "'happiness'" in e.message
    assert "neutral, joy, surprise, anger, sadness, disgust, fear" in e.message


def test_duplicate_dialogue_turn_ids(tmp_path):
    path = meld_csv(tmp_path, row(), row(n=2, u="1"), row(n=3, u="0", text="Again."))
    with pytest.raises(DataError) as err:
        read(path)
    e = err.value
    assert (e.line, e.field) == (4, "Utterance_ID")
    assert "dialogue 0 turn 0 already on line 2" in e.message


@pytest.mark.parametrize("field, values", [("Utterance_ID", {"u": "1.5"}), ("Dialogue_ID", {"d": "abc"})])
def test_non_integer_ids(tmp_path, field, values):
    path = meld_csv(tmp_path, row(), row(n=2, **{"u": "1", **values}))
    with pytest.raises(DataError) as err:
        read(path)
    assert (err.value.line, err.value.field) == (3, field)
    assert "expected an integer id" in err.value.message


def test_non_utf8_bytes_name_their_line(tmp_path):
    good = (HEADER + row() + row(n=2, u="1")).encode()
    bad = good + row(n=3, u="2", text="caf\xe9").encode("latin-1")
    path = meld_csv(tmp_path, raw=bad)
    with pytest.raises(DataError) as err:
        read(path)
    assert err.value.line == 4
    assert "not UTF-8" in err.value.message and "b'\\xe9'" in err.value.message


@pytest.mark.parametrize("content, message", [(b"", "file is empty"), (b"  \n", "file is empty"),
                                              (HEADER.encode(), "header but no rows")])
def test_empty_file(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read(meld_csv(tmp_path, raw=content))


def test_row_with_missing_fields(tmp_path):
    path = meld_csv(tmp_path, row(), "2,Hi.,Ross,neutral\n")
    with pytest.raises(DataError) as err:
        read(path)
    assert err.value.line == 3 and "4 fields but the header has 11" in err.value.message


def test_bad_time(tmp_path):
    path = meld_csv(tmp_path, row().replace('"00:00:01,000"', "soon"))
    with pytest.raises(DataError) as err:
        read(path)
    assert (err.value.line, err.value.field) == (2, "StartTime")


def test_bad_emorynlp_speaker(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(
        "Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode,Start_Time,End_Time\n"
        "Hi.,Monica Geller,Neutral,1,1,1,1,00:00:01.000,00:00:02.000\n"
    )
    with pytest.raises(DataError) as err:
        read(path, "emorynlp")
    assert (err.value.line, err.value.field) == (2, "Speaker")
    assert "Monica Geller" in err.value.message


def test_bad_iemocap_utterance_id(tmp_path):
    path = tmp_path / "i.csv"
    path.write_text(
        "Utterance,Speaker,Dialogue_ID,Start_Time,End_Time,Wav_Path,Video_Path,Emotion\n"
        "Hi.,Ses01F_impro01_M001,Ses01F_impro01,1.0,2.0,a.wav,a.avi,neu\n"
        "Hey.,Monica,Ses01F_impro01,3.0,4.0,b.wav,b.avi,neu\n"
    )
    with pytest.raises(DataError) as err:
        read(path, "iemocap")
    assert (err.value.line, err.value.field) == (3, "Speaker")


def test_empty_label_is_an_unlabelled_turn(tmp_path):
    data = read(meld_csv(tmp_path, row(), row(n=2, u="1", label="")))
    assert [t.label for t in data.turns] == ["neutral", None]


def test_cli_reports_data_errors_without_a_traceback(tmp_path, capsys):
    folder = tmp_path / "meld"
    folder.mkdir()
    meld_csv(folder, row(), row(n=2, u="1", label="happy"))
    code = main(["data-stats", "--data", "meld", "--data-dir", str(tmp_path), "--splits", "train"])
    err = capsys.readouterr().err
    assert code == 1
    assert "train_sent_emo.csv:3: field 'Emotion': unknown label 'happy'" in err
    assert "Traceback" not in err
