"""INT8 post-training quantization of an exported ONNX student, checked where it is made.

Methods (``erc-distill quantize --method M``):

- ``ort-dynamic``: ONNX Runtime dynamic quantization of MatMul/Gemm weights (INT8, per output
  channel), activations quantized on the fly; LayerNorm, residual adds, softmax and GELU stay float.
  (Per-channel: on the MELD student, 0.5 dev weighted-F1 points lost against 1.0 per-tensor.)
- ``ort-static``: ONNX Runtime static QDQ quantization (per-channel INT8 weights, asymmetric UINT8
  activations), activation ranges calibrated (min/max) on training turns. (Symmetric INT8 activations
  lost 7 dev weighted-F1 points on the MELD student: the GELU and attention outputs are one-sided.)
- ``nncf-ptq``: NNCF post-training quantization with its transformer preset
  (``nncf.ModelType.TRANSFORMER``: keeps the sensitive ops float, smooth-quant style scales).
- ``nncf-qat``: quantization-aware fine-tuning with the distillation objective
  (:mod:`erc_distill.export.qat`; the pipeline's quantize stage runs it).

Every INT8 graph is checked on dev: its weighted F1 at most ``budget`` points below the float
model's (the accuracy gate), and, where the INT8 graph was exported from a quantized PyTorch model
(``nncf-qat``), argmax agreement with that model of at least 99 % (the export gate: the graph computes
what was trained). Argmax agreement with the float graph is reported for every method; it is not a
gate, since on MELD's many near-tied turns any INT8 model flips a few percent of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erc_distill.data.datamodule import Batch
from erc_distill.export.onnx_export import ort_inputs, ort_session

METHODS = ("ort-dynamic", "ort-static", "nncf-ptq")
"""Post-training methods that :func:`quantize` runs on an ONNX graph."""
ALL_METHODS = (*METHODS, "nncf-qat")
RECIPE_VERSION = 2
"""Bumped when a method's recipe changes, so graphs made with the old one are not reused."""


class _Calibration:
    """ONNX Runtime CalibrationDataReader over batches."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self._feeds = iter([ort_inputs(b) for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def quantize(method: str, float_path: str | Path, out_path: str | Path,
             calibration: Sequence[Batch] = ()) -> Path:
    """Write the INT8 graph of ``float_path`` made with ``method`` to ``out_path`` (atomically)."""
    from erc_distill.atomic import atomic_path

    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of: {', '.join(METHODS)}")
    final = Path(out_path)
    with atomic_path(final) as out_path:
        _quantize(method, float_path, out_path, calibration)
    return final


def _quantize(method: str, float_path: str | Path, out_path: Path, calibration: Sequence[Batch]) -> None:
    if method == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from onnx import TensorProto

        # on a fused graph (com.microsoft Attention etc.) shape inference cannot type every tensor: say float
        quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    elif method == "ort-static":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not calibration:
            raise ValueError("ort-static needs calibration batches")
        quantize_static(str(float_path), str(out_path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False})
    elif method == "nncf-ptq":
        import nncf
        import onnx

        if not calibration:
            raise ValueError("nncf-ptq needs calibration batches")
        feeds = [ort_inputs(b) for b in calibration]
        quantized = nncf.quantize(onnx.load(str(float_path)), nncf.Dataset(feeds), subset_size=len(feeds),
                                  model_type=nncf.ModelType.TRANSFORMER)
        onnx.save(quantized, str(out_path))


def fold_weight_quantizers(path: str | Path) -> int:
    """Store the weights of a QDQ graph as INT8: ``DequantizeLinear(QuantizeLinear(W_float))`` -> ``DequantizeLinear(W_int8)``.

    Graphs exported from fake-quantized PyTorch models (``nncf.strip``) keep float weights behind a
    ``QuantizeLinear``; folding it computes ``q = saturate(round_half_even(W / scale) + zero_point)`` once,
    exactly as the runtime would at every call, so the graph computes the same function at a quarter of
    the weight bytes. Rewrites ``path`` in place; returns how many weights were folded.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    # the exporter shares repeated zero points through Identity nodes: read through them
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    folded, keep = 0, []
    for node in graph.node:
        ins = [alias.get(name, name) for name in node.input]
        if node.op_type != "QuantizeLinear" or not all(n in inits for n in ins[:2]) or (len(ins) > 2 and ins[2] not in inits):
            keep.append(node)
            continue
        w = numpy_helper.to_array(inits[ins[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[ins[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[ins[2]]) if len(ins) > 2 else np.zeros((), np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and w.ndim > 1:  # per-channel: broadcast along ``axis``
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zp_b = scale.reshape(shape), zp.reshape(shape)
        else:
            zp_b = zp
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale) + zp_b.astype(np.int32), info.min, info.max).astype(zp.dtype)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        if uses.get(ins[0], 0) == 1:
            graph.initializer.remove(inits[ins[0]])
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    from erc_distill.atomic import atomic_path

    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return folded


@dataclass(frozen=True)
class QuantCheck:
    method: str
    float_dev_weighted_f1: float
    int8_dev_weighted_f1: float
    argmax_agreement: float
    """With the float graph's predictions."""
    size_mb: float
    export_agreement: float | None = None
    """With the quantized PyTorch model the graph was exported from (``nncf-qat``), else None."""

    @property
    def drop_points(self) -> float:
        return 100 * (self.float_dev_weighted_f1 - self.int8_dev_weighted_f1)


def ort_predictions(path: str | Path, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class [N], gold [N]) of an ONNX graph over batches."""
    session = ort_session(path)
    preds, gold = [], []
    for b in batches:
        preds.append(session.run(None, ort_inputs(b))[0].argmax(1))
        gold.append(b.labels.numpy())
    return np.concatenate(preds), np.concatenate(gold)


def check_int8(method: str, float_pred: np.ndarray, int8_pred: np.ndarray, gold: np.ndarray, labels: Sequence[str],
               size_mb: float, reference_pred: np.ndarray | None = None) -> QuantCheck:
    """Score an INT8 graph's dev predictions against its float graph's (both [N], from
    :func:`ort_predictions`) and, if given, against the quantized PyTorch model it was exported from."""
    from erc_distill.report.metrics import compute_metrics

    keep = gold >= 0
    f_float = compute_metrics(float_pred[keep], gold[keep], labels).weighted_f1
    f_int8 = compute_metrics(int8_pred[keep], gold[keep], labels).weighted_f1
    export = None if reference_pred is None else float((reference_pred == int8_pred).mean())
    return QuantCheck(method, f_float, f_int8, float((float_pred == int8_pred).mean()), size_mb, export)


def check_failures(checks: Sequence[QuantCheck], budget_points: float = 1.0, min_agreement: float = 0.99) -> list[str]:
    """What fails the gates, one line per failure with both numbers (empty: all pass)."""
    out = []
    for c in checks:
        if c.drop_points > budget_points:
            out.append(f"{c.method}: INT8 dev weighted F1 {100 * c.int8_dev_weighted_f1:.2f} is {c.drop_points:.2f} "
                       f"points below the float model's {100 * c.float_dev_weighted_f1:.2f} (budget {budget_points:g} points)")
        if c.export_agreement is not None and c.export_agreement < min_agreement:
            out.append(f"{c.method}: the INT8 graph agrees with the quantized PyTorch model it was exported from on "
                       f"only {100 * c.export_agreement:.2f}% of dev turns (needs {100 * min_agreement:.1f}%)")
    return out
