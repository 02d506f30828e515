"""``nncf-qat``: quantization-aware fine-tuning with the distillation objective, in one loop.

NNCF 3.x quantizes a PyTorch model (``nncf.quantize``: fake-quantizers placed and calibrated with the
transformer preset), then leaves fine-tuning to the user's loop. Ours is the distill stage's loop:
the same Lightning module, the same objective (e.g. ``ce + dist + feature``), the same teacher cache,
so the INT8 student keeps learning from the teacher while it learns to live with INT8. The result
is stripped to standard ``QuantizeLinear``/``DequantizeLinear`` ops (``nncf.strip``), exported to
ONNX with its weights folded to INT8 initializers (:func:`~erc_distill.export.quantize.fold_weight_quantizers`),
and ONNX Runtime runs the quantized MatMuls with INT8 kernels.

NNCF compiles a small C++ extension the first time it runs (about a minute; cached under
``~/.cache/torch_extensions``); a build lock left by a killed run is cleared first
(:mod:`erc_distill.export.extension_lock`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from erc_distill.atomic import atomic_path
from erc_distill.data.datamodule import Batch, ExampleDataModule
from erc_distill.distill.objective import Objective
from erc_distill.distill.train import TrainConfig, TrainResult, train_model
from erc_distill.export.onnx_export import export_audio_onnx, export_onnx
from erc_distill.export.quantize import fold_weight_quantizers
from erc_distill.modeling import PromptedClassifier


def quantize_aware_train(model: PromptedClassifier, objective: Objective, datamodule: ExampleDataModule,
                         calibration: Sequence[Batch], cfg: TrainConfig, out_dir: str | Path,
                         onnx_path: str | Path, pad_id: int = 0, progress: bool = True,
                         reference_batches: Sequence[Batch] = ()) -> tuple[TrainResult, np.ndarray | None]:
    """Quantize ``model`` with NNCF, fine-tune it on ``objective``, export the INT8 graph to ``onnx_path``.

    Returns the training result and the exported PyTorch model's predicted classes [N] on
    ``reference_batches`` (None without them): the reference the INT8 graph must agree with.
    """
    from erc_distill.export.extension_lock import guard_nncf_extension

    guard_nncf_extension()  # a stale build lock from a killed run would hang the next one silently
    import nncf

    model.eval()
    dataset = nncf.Dataset(list(calibration), lambda b: b.model_inputs())
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    result = train_model(quantized, objective, datamodule, cfg, out_dir, progress)
    quantized.eval()
    example = calibration[0]
    stripped = nncf.strip(quantized, strip_format=nncf.StripFormat.NATIVE, example_input=example.model_inputs())
    with atomic_path(onnx_path) as tmp:
        if getattr(stripped, "input_kind", None) is not None:  # an audio classifier
            export_audio_onnx(stripped, tmp)
        else:
            export_onnx(stripped, tmp, pad_id=pad_id)
        fold_weight_quantizers(tmp)  # INT8 weights on disk (the export keeps them float behind QuantizeLinear)
    reference = None
    if reference_batches:
        from erc_distill.distill.module import predict

        reference = predict(stripped, reference_batches)[1].argmax(-1).numpy()
    return result, reference
