"""The teacher-output cache: computed once, joined by example id, invalidated by its key, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erc_distill.data import ContextBuilder, ContextConfig
from erc_distill.data.datamodule import ErcDataModule
from erc_distill.distill import cache as cache_mod
from erc_distill.distill.cache import CacheKey, build_cache, weights_hash
from erc_distill.distill.module import predict
from erc_distill.modeling import load_encoder

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


@pytest.fixture
def teacher(fixture_data):
    model, tok = load_encoder("tiny", LABELS)
    dm = ErcDataModule("meld", ContextBuilder(tok, ContextConfig(max_len=64)), fixture_data, eval_batch_size=2)
    return model.eval(), tok, dm


def key(context="a", hidden=()):
    return CacheKey("w", "meld", ("train", "dev"), context, "tiny", hidden)


def counting_predict(monkeypatch):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return predict(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "predict", wrapped)
    return calls


def test_cache_rows_equal_the_teacher_outputs(teacher, tmp_path):
    model, _, dm = teacher
    cache = build_cache(model, dm, tmp_path / "c", key(hidden=(1, 2)), chunk_batches=2, progress=False)
    assert len(cache) == 11  # 9 train + 2 dev turns
    ids, logits, feats, hidden = predict(model, dm.eval_dataloader("train"), hidden_layers=[1, 2])
    rows = cache.lookup(ids[::-1])  # any order: rows follow the requested ids
    assert torch.allclose(rows["logits"], logits.flip(0), atol=1e-6)
    assert torch.allclose(rows["features"], feats.flip(0), atol=2e-3)  # stored as float16
    assert rows["hidden"].shape == (9, 2, 32)
    assert isinstance(cache.arrays["train"]["logits"], np.memmap)
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.lookup(["meld/test/0/0"])
    assert not list((tmp_path / "c" / "parts").iterdir())


def test_cache_is_reused_and_invalidated_by_its_key(teacher, tmp_path, monkeypatch):
    model, _, dm = teacher
    calls = counting_predict(monkeypatch)
    build_cache(model, dm, tmp_path / "c", key(), chunk_batches=100, progress=False)
    assert len(calls) == 2  # one chunk per split
    build_cache(model, dm, tmp_path / "c", key(), chunk_batches=100, progress=False)
    assert len(calls) == 2  # same key: nothing recomputed
    build_cache(model, dm, tmp_path / "c", key(context="b"), chunk_batches=100, progress=False)
    assert len(calls) == 4  # another context config: recomputed
    assert json.loads((tmp_path / "c" / "key.json").read_text())["context"] == "b"


def test_an_interrupted_cache_run_resumes(teacher, tmp_path, monkeypatch):
    model, _, dm = teacher
    calls = []

    def dies_on_third_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return predict(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "predict", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_cache(model, dm, tmp_path / "c", key(), chunk_batches=1, progress=False)
    assert len(list((tmp_path / "c" / "parts").glob("train.*.npz"))) == 2
    calls_before = len(calls)
    monkeypatch.setattr(cache_mod, "predict", lambda *a, **k: (calls.append(1), predict(*a, **k))[1])
    cache = build_cache(model, dm, tmp_path / "c", key(), chunk_batches=1, progress=False)
    n_batches = len(dm.eval_dataloader("train")) + len(dm.eval_dataloader("dev"))
    assert len(calls) - calls_before == n_batches - 2  # the two finished chunks were kept
    assert len(cache) == 11


def test_weights_hash_follows_the_weights(tmp_path):
    model, tok = load_encoder("tiny", LABELS)
    model.save(tmp_path / "a", tok)
    h = weights_hash(tmp_path / "a")
    with torch.no_grad():
        model.head.bias.add_(1.0)
    model.save(tmp_path / "b", tok)
    assert weights_hash(tmp_path / "b") != h and len(h) == 16


def test_student_with_another_tokenizer_joins_by_example_id(teacher, tmp_path):
    model, _, dm = teacher
    cache = build_cache(model, dm, tmp_path / "c", key(), progress=False)
    _, bert_tok = load_encoder("tiny-bert", LABELS)
    student_dm = ErcDataModule("meld", ContextBuilder(bert_tok), dm.data_dir, batch_size=3, teacher=cache)
    ids, logits, _, _ = predict(model, dm.eval_dataloader("train"))
    by_id = dict(zip(ids, logits))
    seen = 0
    for batch in student_dm.train_dataloader():
        assert batch.input_ids.max() < len(bert_tok)  # student tokens
        for eid, row in zip(batch.example_ids, batch.teacher["logits"]):
            assert torch.allclose(row, by_id[eid], atol=1e-6)
            seen += 1
    assert seen == 9
