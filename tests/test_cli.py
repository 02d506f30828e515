"""The command line, run as a user runs it (argv in, text or JSON out)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from erc_distill.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_data_stats_json_on_fixtures(capsys, fixture_data, bert_tokenizer, tmp_path):
    bert_tokenizer.save_pretrained(tmp_path / "tok")
    code, out, _ = run(capsys, "data-stats", "--data", "meld", "--data-dir", str(fixture_data),
                       "--tokenizer", str(tmp_path / "tok"), "--json")
    assert code == 0
    stats = json.loads(out)
    train = stats["splits"]["train"]
    assert (train["utterances"], train["dialogues"], train["speakers"]) == (9, 2, 6)
    assert train["labels"] == {"neutral": 2, "joy": 1, "surprise": 1, "anger": 1, "sadness": 2,
                               "disgust": 1, "fear": 1}
    lengths = train["input_lengths"]
    assert lengths["max"] <= 256 and lengths["p50"] <= lengths["p95"] <= lengths["max"]
    assert lengths["mean_context_turns"] == pytest.approx((1 + 2 + 3 + 4 + 1 + 2 + 3 + 4 + 5) / 9, abs=0.01)
    assert stats["context"]["max_len"] == 256 and stats["splits"]["test"]["utterances"] == 3


def test_data_stats_tables(capsys, fixture_data):
    code, out, _ = run(capsys, "data-stats", "--data", "emorynlp", "--data-dir", str(fixture_data))
    assert code == 0
    assert "EmoryNLP" in out and "powerful" in out and "--tokenizer" in out


def test_show_input(capsys, fixture_data, roberta_tokenizer, tmp_path):
    roberta_tokenizer.save_pretrained(tmp_path / "tok")
    code, out, _ = run(capsys, "show-input", "--data", "meld", "--data-dir", str(fixture_data), "--split",
                       "train", "--dialogue", "0", "--turn", "4", "--tokenizer", str(tmp_path / "tok"), "--ids")
    assert code == 0
    assert "Rachel: I hate that duck!" in out and "gold: anger" in out
    assert "context: turns 0..4 (4)" in out
    assert "For utterance: Rachel:I hate that duck!</s>Rachel feels<mask></s>" in out
    ids = [int(i) for i in out.split("ids: ")[1].split()]
    assert ids[0] == roberta_tokenizer.cls_token_id and ids[-1] == roberta_tokenizer.sep_token_id


def test_show_input_unknown_turn(capsys, fixture_data, tmp_path, bert_tokenizer):
    bert_tokenizer.save_pretrained(tmp_path / "tok")
    code, _, err = run(capsys, "show-input", "--data", "meld", "--data-dir", str(fixture_data), "--split",
                       "train", "--dialogue", "0", "--turn", "3", "--tokenizer", str(tmp_path / "tok"))
    assert code == 1 and "no turn 3 (turn ids: 0, 1, 2, 4)" in err


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "data-stats" in out and "show-input" in out and "fetch-data" in out


@pytest.mark.realdata
def test_console_script_data_stats_on_real_meld(real_data):
    """The acceptance check, through the installed console script."""
    done = subprocess.run(
        [sys.executable, "-m", "erc_distill.cli", "data-stats", "--data", "meld", "--json", "--data-dir", str(real_data)],
        capture_output=True, text=True, check=True,
    )
    splits = json.loads(done.stdout)["splits"]
    assert [splits[s]["utterances"] for s in ("train", "dev", "test")] == [9989, 1109, 2610]
    assert [splits[s]["dialogues"] for s in ("train", "dev", "test")] == [1038, 114, 280]
    assert splits["train"]["labels"] == {"neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109,
                                         "sadness": 683, "disgust": 271, "fear": 268}


@pytest.mark.realdata
@pytest.mark.pretrained
def test_real_meld_input_lengths_with_minilm(capsys, real_data, minilm_tokenizer):
    code, out, _ = run(capsys, "data-stats", "--data", "meld", "--data-dir", str(real_data), "--splits", "dev",
                       "--tokenizer", "minilm-l6", "--json")
    lengths = json.loads(out)["splits"]["dev"]["input_lengths"]
    assert code == 0 and lengths["max"] <= 256 and lengths["query_cut"] == 0
    assert 0 < lengths["p50"] < lengths["p95"] <= 256
