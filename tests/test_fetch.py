"""fetch-data: copy or download the public CSVs, verified by SHA-256, atomically."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from erc_distill.cli import main
from erc_distill.data import load_corpus
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
