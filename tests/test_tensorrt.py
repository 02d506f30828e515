"""TensorRT engines: built where TensorRT and a GPU exist, a clean skip everywhere else."""

from __future__ import annotations

import pytest

from erc_distill.export.tensorrt_engine import EngineSpec, build_engine, engine_specs, tensorrt_available


def test_engine_specs_follow_the_profile():
    assert engine_specs("fp16", [256, 128]) == [EngineSpec("fp16", (128, 256))]
    assert [s.precision for s in engine_specs("int8", [256])] == ["fp16", "int8"]


def test_without_tensorrt_the_error_names_the_extra(tmp_path):
    if tensorrt_available():
        pytest.skip("TensorRT is available here: the build test below runs instead")
    with pytest.raises(ImportError, match=r'pip install "erc-distill\[tensorrt\]"'):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", EngineSpec("fp16"))


@pytest.mark.skipif(not tensorrt_available(), reason="TensorRT with a CUDA GPU is not available on this machine")
def test_fp16_engine_builds_from_an_exported_student(tmp_path):
    from erc_distill.export.onnx_export import export_onnx
    from erc_distill.modeling import load_encoder

    model, tok = load_encoder("tiny-bert", ("a", "b", "c"))
    onnx_path = export_onnx(model.eval(), tmp_path / "m.onnx", pad_id=tok.pad_token_id)
    engine = build_engine(onnx_path, tmp_path / "m.engine", EngineSpec("fp16", (32, 64)))
    assert engine.stat().st_size > 0
