"""ONNX export: checker, dynamic axes, parity with PyTorch, and a broken export caught."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from erc_distill.data import ContextBuilder
from erc_distill.data.datamodule import ErcDataModule
from erc_distill.export.onnx_export import ExportError, check_float_parity, export_onnx, ort_inputs, ort_session
from erc_distill.modeling import load_encoder


@pytest.fixture(params=["tiny", "tiny-bert"])
def exported(request, tmp_path, fixture_data):
    model, tok = load_encoder(request.param, ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"))
    path = export_onnx(model, tmp_path / "model.onnx", pad_id=tok.pad_token_id)
    dm = ErcDataModule("meld", ContextBuilder(tok), fixture_data, eval_batch_size=4)
    return model, path, dm


def test_export_is_checked_and_has_dynamic_axes(exported):
    _, path, _ = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "mask_index"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert onnx.load(str(path)).opset_import[0].version >= 17


def test_float_parity_on_real_batches(exported):
    model, path, dm = exported
    batches = list(dm.eval_dataloader("train")) + list(dm.eval_dataloader("test"))
    assert len({b.input_ids.shape[1] for b in batches}) > 1  # several sequence lengths
    report = check_float_parity(model, path, batches)
    assert report.max_abs_diff <= 1e-4 and report.argmax_agreement == 1.0 and report.n == 12


def test_a_broken_export_is_caught(exported):
    model, path, dm = exported
    with torch.no_grad():
        model.head.bias.add_(0.5)  # the graph no longer matches the model
    with pytest.raises(ExportError, match=r"max \|Δlogit\| 5.00e-01"):
        check_float_parity(model, path, dm.eval_dataloader("train"))


def test_single_turn_batch(exported):
    model, path, dm = exported
    batch = next(iter(dm.eval_dataloader("dev")))
    one = ort_session(path).run(None, {k: v[:1] for k, v in ort_inputs(batch).items()})[0]
    with torch.no_grad():
        ref = model(batch.input_ids[:1], batch.attention_mask[:1], batch.mask_index[:1]).logits.numpy()
    assert np.abs(one - ref).max() <= 1e-4
