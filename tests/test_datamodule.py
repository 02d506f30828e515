"""Examples, length-bucketed batches, dynamic padding and the prompted classifier on tiny models."""

from __future__ import annotations

import pytest
import torch

from erc_distill.data import ContextBuilder, load_corpus
from erc_distill.data.datamodule import Collator, ErcDataModule, LengthBucketSampler, build_examples, sorted_batches
from erc_distill.modeling import PromptedClassifier, load_encoder


def test_examples_carry_ids_labels_and_inputs(fixture_data, bert_tokenizer):
    data = load_corpus("meld", "train", fixture_data)
    ex = build_examples(data, ContextBuilder(bert_tokenizer))
    assert len(ex) == 9
    assert ex[0].example_id == "meld/train/0/0" and ex[3].turn_id == 4
    assert [e.label for e in ex[:4]] == [data.labels.index(x) for x in ("surprise", "neutral", "neutral", "anger")]
    assert all(e.input_ids[e.mask_index] == bert_tokenizer.mask_token_id for e in ex)


def test_collator_pads_and_masks(fixture_data, bert_tokenizer):
    ex = build_examples(load_corpus("meld", "train", fixture_data), ContextBuilder(bert_tokenizer))[:3]
    b = Collator(pad_id=bert_tokenizer.pad_token_id)(ex)
    width = max(len(e.input_ids) for e in ex)
    assert b.input_ids.shape == (3, width) and b.attention_mask.sum(1).tolist() == [len(e.input_ids) for e in ex]
    assert (b.input_ids[b.attention_mask == 0] == bert_tokenizer.pad_token_id).all()
    assert b.example_ids == [e.example_id for e in ex] and b.teacher is None


def test_length_bucket_sampler_covers_everything_once_and_reshuffles():
    lengths = [(i * 37) % 101 for i in range(250)]
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=3, pool_batches=4)
    first = list(sampler)
    second = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(250))
    assert first != second  # a new order each epoch
    assert len(first) == len(sampler) == 32
    spread = lambda batches: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)  # noqa: E731
    unsorted = [list(range(i, min(i + 8, 250))) for i in range(0, 250, 8)]
    assert spread(first) < 0.4 * spread(unsorted)  # batches hold similar lengths
    again = LengthBucketSampler(lengths, batch_size=8, seed=3, pool_batches=4)
    assert list(again) == first  # deterministic for (seed, epoch)
    assert sorted(i for b in sorted_batches(lengths, 7) for i in b) == list(range(250))


def test_length_bucket_sampler_shards_batches_across_ddp_ranks():
    lengths = list(range(100))
    ranks = [list(LengthBucketSampler(lengths, 8, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # 13 batches: every rank gets the same count
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat))  # no example twice


@pytest.mark.parametrize("name", ["tiny", "tiny-bert"])
def test_prompted_classifier_shapes_save_and_load(tmp_path, fixture_data, name):
    labels = ("a", "b", "c")
    model, tok = load_encoder(name, labels)
    dm = ErcDataModule("meld", ContextBuilder(tok), fixture_data, batch_size=4)
    batch = next(iter(dm.eval_dataloader("train")))
    model.eval()
    out = model(batch.input_ids, batch.attention_mask, batch.mask_index, output_hidden_states=True)
    assert out.logits.shape == (len(batch), 3) and out.features.shape == (len(batch), 32)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    rows = torch.arange(len(batch))
    assert torch.equal(out.features, out.hidden_states[-1][rows, batch.mask_index])
    model.save(tmp_path / "m", tok)
    assert (tmp_path / "m" / "head.safetensors").is_file()
    assert list((tmp_path / "m" / "encoder").glob("*.safetensors"))
    again = PromptedClassifier.load(tmp_path / "m").eval()
    assert torch.allclose(again(batch.input_ids, batch.attention_mask, batch.mask_index).logits, out.logits, atol=1e-6)
    assert again.labels == labels


def test_freezing_lower_layers(fixture_data):
    model, _ = load_encoder("tiny", ("a", "b"))
    groups = model.layer_groups()
    assert len(groups) == 4  # embeddings, 2 layers, head
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    model.freeze_lower(1)
    assert not any(p.requires_grad for g in groups[:2] for p in g)
    assert all(p.requires_grad for g in groups[2:] for p in g)


@pytest.mark.pretrained
def test_packaged_minilm_as_a_prompted_classifier(minilm_tokenizer, fixture_data):
    model, tok = load_encoder("minilm-l6", ("a", "b", "c"))
    assert model.hidden_size == 384 and model.num_layers == 6
    dm = ErcDataModule("meld", ContextBuilder(tok), fixture_data, batch_size=4)
    batch = next(iter(dm.eval_dataloader("dev")))
    assert model.eval()(batch.input_ids, batch.attention_mask, batch.mask_index).logits.shape == (2, 3)
