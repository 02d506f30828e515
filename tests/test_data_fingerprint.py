"""The data fingerprint in cache keys: content and names, never where the files are."""

from __future__ import annotations

import os
import shutil

import pytest

from erc_distill.data import corpus_files, corpus_fingerprint
from erc_distill.data import fingerprint as fp
from erc_distill.errors import DataError

OLD = 1_600_000_000_000_000_000  # an mtime (ns) far from now: hashes may be memoised


def _flip_one_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    i = raw.index(b"Rachel")
    raw[i] = ord("r")
    path.write_bytes(bytes(raw))


def test_corpus_files_are_the_files_the_reader_reads(fixture_data):
    files = corpus_files("meld", fixture_data)
    assert [f.name for f in files] == ["train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv"]
    assert all(f.is_absolute() and f.is_file() for f in files)
    assert corpus_files("emorynlp", fixture_data, splits=("test",)) == [
        (fixture_data / "emorynlp" / "emorynlp_test_final.csv").absolute()
    ]
    (fixture_data / "iemocap" / "dev.csv").rename(fixture_data / "iemocap" / "IEMOCAP_dev.csv")
    assert [f.name for f in corpus_files("iemocap", fixture_data)] == ["train.csv", "IEMOCAP_dev.csv", "test.csv"]


def test_one_changed_byte_changes_the_fingerprint(fixture_data):
    before = corpus_fingerprint("meld", fixture_data)
    train_before = corpus_fingerprint("meld", fixture_data, splits=("train",))
    assert len(before) == 64 and before == corpus_fingerprint("meld", fixture_data)
    path = fixture_data / "meld" / "dev_sent_emo.csv"
    size = path.stat().st_size
    _flip_one_byte(path)
    assert path.stat().st_size == size
    assert corpus_fingerprint("meld", fixture_data) != before
    # a split that was not touched keeps its fingerprint
    assert corpus_fingerprint("meld", fixture_data, splits=("train",)) == train_before


def test_a_copy_elsewhere_has_the_same_fingerprint(fixture_data, tmp_path, monkeypatch):
    copy = tmp_path / "somewhere" / "else"
    shutil.copytree(fixture_data, copy)
    for corpus in ("meld", "emorynlp", "iemocap"):
        assert corpus_fingerprint(corpus, copy) == corpus_fingerprint(corpus, fixture_data)
    monkeypatch.setenv("ERC_DISTILL_DATA", str(copy))
    assert corpus_fingerprint("meld") == corpus_fingerprint("meld", fixture_data)


def test_fingerprint_depends_on_corpus_and_splits_not_their_order(fixture_data):
    full = corpus_fingerprint("meld", fixture_data)
    assert corpus_fingerprint("meld", fixture_data, splits=("train", "dev")) != full
    assert corpus_fingerprint("meld", fixture_data, splits=("dev", "train")) == corpus_fingerprint(
        "meld", fixture_data, splits=("train", "dev")
    )
    assert corpus_fingerprint("emorynlp", fixture_data) != full
    with pytest.raises(ValueError, match="unknown split"):
        corpus_fingerprint("meld", fixture_data, splits=("validation",))


def test_missing_file_is_the_usual_data_error(fixture_data):
    (fixture_data / "meld" / "test_sent_emo.csv").unlink()
    with pytest.raises(DataError) as err:
        corpus_fingerprint("meld", fixture_data)
    assert err.value.file == str(fixture_data / "meld" / "test_sent_emo.csv")
    assert f"erc-distill fetch-data meld --data-dir {fixture_data}" in str(err.value)
    assert corpus_fingerprint("meld", fixture_data, splits=("train", "dev"))  # the others still hash


def test_file_hashes_are_memoised_per_size_and_mtime(fixture_data, monkeypatch):
    fp._hash_once.cache_clear()
    calls = []
    real = fp.sha256_file
    monkeypatch.setattr(fp, "sha256_file", lambda path: calls.append(str(path)) or real(path))
    for f in corpus_files("meld", fixture_data):
        os.utime(f, ns=(OLD, OLD))
    first = corpus_fingerprint("meld", fixture_data)
    assert len(calls) == 3
    assert corpus_fingerprint("meld", fixture_data) == first
    assert len(calls) == 3  # memoised
    path = fixture_data / "meld" / "train_sent_emo.csv"
    _flip_one_byte(path)
    os.utime(path, ns=(OLD + 1, OLD + 1))
    assert corpus_fingerprint("meld", fixture_data) != first
    assert calls[3:] == [str(path.resolve())]  # only the changed file is read again


def test_a_just_written_file_is_never_memoised(tmp_path, monkeypatch):
    fp._hash_once.cache_clear()
    calls = []
    real = fp.sha256_file
    monkeypatch.setattr(fp, "sha256_file", lambda path: calls.append(path) or real(path))
    path = tmp_path / "f.csv"
    path.write_bytes(b"abc")
    a = fp.file_sha256(path)
    path.write_bytes(b"abd")  # same size, possibly the same mtime tick
    b = fp.file_sha256(path)
    assert a != b and len(calls) == 2


@pytest.mark.realdata
def test_real_meld_differs_from_the_fixtures(real_data, fixture_data, tmp_path):
    real = corpus_fingerprint("meld", real_data)
    assert real != corpus_fingerprint("meld", fixture_data)
    assert real == corpus_fingerprint("meld", real_data)
    copy = tmp_path / "copy"
    shutil.copytree(real_data / "meld", copy / "meld")
    assert corpus_fingerprint("meld", copy) == real
    assert corpus_fingerprint("meld-dyadic", real_data) != real
