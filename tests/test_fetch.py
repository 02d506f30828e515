"""fetch-data: copy or download the public CSVs, verified by SHA-256, atomically."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
import time

import pytest

from erc_distill.cli import main
from erc_distill.data import ensure_corpus, load_corpus
from erc_distill.data import fetch as fetch_module
from erc_distill.data.fetch import fetch_corpus, known_checksums, sha256
from erc_distill.errors import DataError


def test_checksums_cover_every_downloadable_file():
    from erc_distill.data.corpora import CORPORA

    sums = known_checksums()
    for spec in CORPORA.values():
        if spec.source_url:
            for file in spec.files.values():
                assert len(sums[f"{spec.folder}/{file}"]) == 64


@pytest.mark.realdata
def test_copy_from_a_local_folder_then_keep(real_data, tmp_path, capsys):
    dest = tmp_path / "data"
    assert main(["fetch-data", "emorynlp", "--from", str(real_data), "--data-dir", str(dest)]) == 0
    out = capsys.readouterr().out
    assert out.count("copied") == 3 and "3 files verified" in out
    assert len(load_corpus("emorynlp", "test", dest).turns) == 984
    # the corpus folder itself works as --from too; verified files are kept
    files = fetch_corpus("emorynlp", dest, source_dir=real_data / "emorynlp")
    assert [f.action for f in files] == ["kept"] * 3


def test_checksum_mismatch_leaves_nothing(tmp_path, fixture_data):
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_corpus("meld", dest, source_dir=fixture_data / "meld")
    assert list((dest / "meld").iterdir()) == []


def test_missing_source_file(tmp_path):
    with pytest.raises(DataError, match="train_sent_emo.csv not found"):
        fetch_corpus("meld", tmp_path / "out", source_dir=tmp_path)


def test_iemocap_cannot_be_downloaded(tmp_path):
    with pytest.raises(DataError, match="signed form"):
        fetch_corpus("iemocap", tmp_path)


@pytest.fixture
def local_mirror(real_data):
    """A real HTTP server on loopback serving the shared corpora (stands in for GitHub)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(real_data))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.realdata
def test_download_over_http(local_mirror, tmp_path, real_data):
    files = fetch_corpus("meld", tmp_path, base_url=local_mirror + "/meld/{file}")
    assert [f.action for f in files] == ["downloaded"] * 3
    assert files[0].sha256 == sha256(real_data / "meld" / "train_sent_emo.csv")
    with pytest.raises(DataError, match="download failed"):
        fetch_corpus("emorynlp", tmp_path, base_url=local_mirror + "/nowhere/{file}")


def test_copy_iemocap_from_telme_names(tmp_path, fixture_data):
    source = tmp_path / "telme"
    source.mkdir()
    for split in ("train", "dev", "test"):
        shutil.copyfile(fixture_data / "iemocap" / f"{split}.csv", source / f"IEMOCAP_{split}.csv")
    files = fetch_corpus("iemocap", tmp_path / "out", source_dir=source)
    assert [f.action for f in files] == ["copied"] * 3
    assert [f.path.name for f in files] == ["train.csv", "dev.csv", "test.csv"]
    assert len(load_corpus("iemocap", "dev", tmp_path / "out").turns) == 6
    with pytest.raises(DataError, match="train.csv or IEMOCAP_train.csv not found"):
        fetch_corpus("iemocap", tmp_path / "out2", source_dir=tmp_path / "empty")


# --------------------------------------------------------------------------- ensure_corpus


@pytest.fixture
def no_fetch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fetch_corpus must not be called")

    monkeypatch.setattr(fetch_module, "fetch_corpus", refuse)


def test_ensure_present_corpus_does_not_fetch(fixture_data, no_fetch, monkeypatch):
    logged = []
    assert ensure_corpus("meld", fixture_data, log=logged.append) == fixture_data
    assert ensure_corpus("iemocap", fixture_data, log=logged.append) == fixture_data
    monkeypatch.setenv("ERC_DISTILL_DATA", str(fixture_data))
    assert ensure_corpus("emorynlp", log=logged.append) == fixture_data
    assert logged == []


def test_ensure_only_the_asked_splits(fixture_data, no_fetch):
    (fixture_data / "meld" / "test_sent_emo.csv").unlink()
    assert ensure_corpus("meld", fixture_data, splits=("train", "dev"), log=None) == fixture_data
    with pytest.raises(DataError, match="meld test split not found"):
        ensure_corpus("meld", fixture_data, splits=("test",), fetch=False, log=None)


def test_ensure_iemocap_fails_at_once(tmp_path, no_fetch):
    logged = []
    with pytest.raises(DataError) as err:
        ensure_corpus("iemocap", tmp_path, log=logged.append)
    assert err.value.file == str(tmp_path / "iemocap" / "train.csv")
    assert "tried train.csv or IEMOCAP_train.csv" in str(err.value) and "signed form" in str(err.value)
    assert logged == []


def test_ensure_with_fetch_off_names_the_command(tmp_path, no_fetch):
    with pytest.raises(DataError) as err:
        ensure_corpus("emorynlp", tmp_path, fetch=False, log=None)
    message = str(err.value)
    assert err.value.file == str(tmp_path / "emorynlp" / "emorynlp_train_final.csv")
    assert f"erc-distill fetch-data emorynlp --data-dir {tmp_path}" in message
    assert "$ERC_DISTILL_DATA" in message and "automatic fetching is off" in message


def test_ensure_rejects_a_mirror_with_wrong_files(tmp_path, fixture_data):
    """A file:// mirror of the fixtures: downloaded, but their checksums are not MELD's."""
    dest = tmp_path / "dest"
    url = (fixture_data / "meld").as_uri() + "/{file}"
    with pytest.raises(DataError) as err:
        ensure_corpus("meld", dest, base_url=url, log=None)
    message = str(err.value)
    assert "the automatic fetch from" in message and "checksum mismatch" in message
    assert "erc-distill fetch-data meld" in message
    assert list((dest / "meld").iterdir()) == []  # nothing half-written is left


@pytest.fixture
def direct(monkeypatch):
    """No proxy from the environment: the loopback servers and the probe are reached directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ensure_unreachable_url_fails_fast(tmp_path, direct):
    logged = []
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        ensure_corpus("meld", tmp_path, base_url=f"http://127.0.0.1:{_closed_port()}/{{file}}", log=logged.append)
    assert time.monotonic() - start < 3
    message = str(err.value)
    assert err.value.file == str(tmp_path / "meld" / "train_sent_emo.csv")
    assert "meld train split not found" in message and "automatic fetch" in message
    assert "cannot reach 127.0.0.1" in message
    assert f"erc-distill fetch-data meld --data-dir {tmp_path}" in message and "$ERC_DISTILL_DATA" in message
    assert len(logged) == 1 and "fetching from" in logged[0]


def test_ensure_gives_up_on_a_silent_network(tmp_path, monkeypatch, direct):
    """A name lookup or connect that never answers (a black-holed network) is cut at the timeout."""
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(fetch_module.socket, "create_connection", hang)
    start = time.monotonic()
    try:
        with pytest.raises(DataError, match=r"no answer from example\.invalid:443 within 0\.3 s"):
            ensure_corpus("meld", tmp_path, base_url="https://example.invalid/{file}", log=None, timeout=0.3)
        assert time.monotonic() - start < 2
    finally:
        release.set()


def test_ensure_read_timeout_on_a_server_that_never_answers(tmp_path, direct):
    """Connect works (the listen backlog accepts it) but no byte ever comes: the read times out."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/{{file}}"
        start = time.monotonic()
        with pytest.raises(DataError, match="download failed") as err:
            ensure_corpus("meld", tmp_path, base_url=url, log=None, timeout=0.5)
        assert time.monotonic() - start < 3
    assert "timed out" in str(err.value)


@pytest.mark.realdata
def test_ensure_fetches_missing_splits_from_a_file_mirror(tmp_path, real_data):
    dest = tmp_path / "data"
    (dest / "meld").mkdir(parents=True)
    kept = dest / "meld" / "train_sent_emo.csv"
    kept.write_bytes(b"a local train file that must not be replaced")  # only missing files are fetched
    logged = []
    url = (real_data / "meld").as_uri() + "/{file}"
    assert ensure_corpus("meld", dest, base_url=url, log=logged.append) == dest
    assert kept.read_bytes() == b"a local train file that must not be replaced"
    for split in ("dev", "test"):
        file = dest / "meld" / f"{split}_sent_emo.csv"
        assert sha256(file) == known_checksums()[f"meld/{file.name}"]
    assert "dev, test split file(s) missing" in logged[0]
    assert [line.split()[1] for line in logged[1:]] == ["downloaded"] * 2
    assert all("verified" in line for line in logged[1:])
    assert len(load_corpus("meld", "test", dest).turns) == 2610
    # now present: a second call does nothing
    logged.clear()
    assert ensure_corpus("meld", dest, base_url="http://127.0.0.1:9/{file}", log=logged.append) == dest
    assert logged == []


@pytest.mark.realdata
def test_ensure_downloads_over_http(local_mirror, tmp_path, monkeypatch, direct):
    monkeypatch.setenv("ERC_DISTILL_DATA", str(tmp_path))
    logged = []
    assert ensure_corpus("emorynlp", base_url=local_mirror + "/emorynlp/{file}", log=logged.append) == tmp_path
    assert sum("downloaded" in line and "verified" in line for line in logged) == 3
    assert len(load_corpus("emorynlp", "dev").turns) == 954
