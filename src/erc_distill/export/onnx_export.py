"""ONNX export of a :class:`PromptedClassifier`, checked where it is made.

The graph takes ``input_ids`` [B, T] int64, ``attention_mask`` [B, T] int64 and ``mask_index`` [B] int64
(dynamic batch and sequence axes) and returns ``logits`` [B, C]. After export the graph passes
``onnx.checker`` and is compared with PyTorch through ONNX Runtime on real batches: a float export
must agree within ``atol`` (max |logit difference|, default 1e-4) or export fails with the numbers.

Attention is exported in its eager form (MatMul, Softmax, MatMul), which ONNX Runtime's transformer
optimizer recognises: :func:`fuse_transformer` then fuses each layer into ``Attention``,
``SkipLayerNormalization`` and ``BiasGelu`` kernels (and the embeddings into
``EmbedLayerNormalization``), which dynamic quantization turns into ``QAttention`` and INT8 MatMuls.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erc_distill.data.datamodule import Batch
from erc_distill.errors import ExportError
from erc_distill.modeling import PromptedClassifier

INPUT_NAMES = ("input_ids", "attention_mask", "mask_index")
AUDIO_INPUT_NAMES = ("features", "lengths")
OUTPUT_NAMES = ("logits",)
DEFAULT_OPSET = 17


FEATURE_OUTPUT_NAMES = ("logits", "features")


class _LogitsOnly(nn.Module):
    """A classifier (text, audio or visual) with the logits as its only output, or (``with_features``)
    the logits and the pooled features ``[B, H]`` that a fusion head reads."""

    def __init__(self, model: nn.Module, with_features: bool = False) -> None:
        super().__init__()
        self.model = model
        self.with_features = with_features

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.model(*inputs)
        return (out.logits, out.features) if self.with_features else out.logits


def export_onnx(model: PromptedClassifier, path: str | Path, opset: int = DEFAULT_OPSET, pad_id: int = 0,
                with_features: bool = False) -> Path:
    """Write ``model`` as ONNX to ``path`` and run ``onnx.checker`` on it (``with_features``: a second
    output ``features`` [B, H], the mask-position representation a fusion head reads)."""
    import onnx

    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsOnly(model, with_features).eval()
    outputs = FEATURE_OUTPUT_NAMES if with_features else OUTPUT_NAMES
    config = model.encoder.config
    attention = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"  # the pattern the ORT transformer fusions match (SDPA's is not)
    # trace with padding present, so the attention-mask path is in the graph
    ids = torch.arange(5, 17).repeat(2, 1)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = pad_id
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
               "mask_index": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        # tracing notes that data-dependent branches become constants: the padded example above takes
        # the masked-attention branch, which is the general one (parity is checked after export)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(wrapper, (ids, mask, torch.tensor([3, 7])), str(path), input_names=list(INPUT_NAMES),
                          output_names=list(outputs), dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    config._attn_implementation = attention
    model.eval()  # the exporter restores the wrapper's training flag; keep the model in eval mode
    onnx.checker.check_model(str(path))
    return path


def export_audio_onnx(model: Any, path: str | Path, opset: int = DEFAULT_OPSET, with_features: bool = False) -> Path:
    """Write an :class:`~erc_distill.audio.model.AudioClassifier` as ONNX and run ``onnx.checker`` on it.

    Inputs: ``features`` [B, n_mels, T] float32 (Whisper's log-mel; ``samples`` [B, N] for a waveform
    encoder) and ``lengths`` [B] int64, the valid frames (samples) of each row; output ``logits`` [B, C].
    Batch and time axes are dynamic: a clip runs on its own length, as in training. Traced with two
    clips of different lengths, so the padding masks are in the graph. ``with_features``: a second
    output ``features`` [B, H] (the pooled clip representation a fusion head reads).
    """
    import onnx

    if model.input_kind != "log-mel":
        raise ExportError(f"ONNX export of {model.input_kind} encoders is not supported yet (their per-length "
                          "batching does not trace into one graph); export a Whisper student")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsOnly(model, with_features).eval()
    outputs = FEATURE_OUTPUT_NAMES if with_features else OUTPUT_NAMES
    rng = np.random.default_rng(0)
    inputs, lengths = model.prepare([rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 9600)])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (inputs, lengths), str(path), input_names=list(AUDIO_INPUT_NAMES),
                          output_names=["logits", "embedding"] if with_features else list(OUTPUT_NAMES),
                          opset_version=opset, dynamo=False,
                          dynamic_axes={"features": {0: "batch", 2: "frames"}, "lengths": {0: "batch"},
                                        "logits": {0: "batch"}, **({"embedding": {0: "batch"}} if with_features else {})})
    model.eval()
    onnx.checker.check_model(str(path))
    return path


def export_visual_onnx(model: Any, path: str | Path, opset: int = DEFAULT_OPSET, with_features: bool = False) -> Path:
    """Write a :class:`~erc_distill.visual.model.VisualClassifier` as ONNX (``onnx.checker`` run on it).

    Inputs: ``pixels`` [B, N, C, S, S] float32 (:meth:`VisualClassifier.prepare`) and ``frame_mask`` [B, N]
    bool; outputs ``logits`` [B, C] (and ``features`` [B, H] with ``with_features``). Batch is dynamic;
    N, C and S are the model's (fixed by its preprocessing)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsOnly(model, with_features).eval()
    outputs = FEATURE_OUTPUT_NAMES if with_features else OUTPUT_NAMES
    p = model.preprocessing
    pixels = torch.zeros(2, model.frames, 1 if p["grayscale"] else 3, int(p["size"]), int(p["size"]))
    mask = torch.ones(2, model.frames, dtype=torch.bool)
    mask[1, model.frames // 2:] = False
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(wrapper, (pixels, mask), str(path), input_names=["pixels", "frame_mask"],
                          output_names=list(outputs), opset_version=opset, dynamo=False,
                          dynamic_axes={"pixels": {0: "batch"}, "frame_mask": {0: "batch"},
                                        **{name: {0: "batch"} for name in outputs}})
    model.eval()
    onnx.checker.check_model(str(path))
    return path


def fuse_transformer(path: str | Path, out_path: str | Path, model: PromptedClassifier) -> dict[str, int]:
    """ONNX Runtime's transformer fusions on the graph at ``path``, written to ``out_path``.

    Returns the fused-operator counts (e.g. ``{"Attention": 6, "SkipLayerNormalization": 12, ...}``);
    an empty dict when nothing fused (then ``out_path`` is not written).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    config = model.encoder.config
    if not hasattr(config, "num_attention_heads"):  # a speech encoder: no fusion recipe in ONNX Runtime here
        return {}
    kind = "bert" if config.model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "electra") else None
    if kind is None:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(str(path), model_type=kind, num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size)
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention"):
        return {}
    optimized.save_model_to_file(str(out_path))
    return stats


def ort_session(path: str | Path, threads: int | None = None, spin: bool = True):
    """A CPU ONNX Runtime session with full graph optimisation (``threads``: intra-op threads). ``spin``
    False: its threads sleep as soon as a run ends instead of spinning for more work — for several
    sessions taking turns on few cores (the fused student's branches), where one's spinning threads
    would take the cores the next one needs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_inputs(batch: Batch) -> dict[str, np.ndarray]:
    """The exported graph's inputs for a batch of any modality (its ``onnx_feed``)."""
    return batch.onnx_feed()


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime against a reference (PyTorch, or the float graph for INT8)."""

    n: int
    max_abs_diff: float
    argmax_agreement: float

    def __str__(self) -> str:
        return f"n={self.n}, max |Δlogit| {self.max_abs_diff:.2e}, argmax agreement {100 * self.argmax_agreement:.2f}%"


def compare(reference: Iterable[np.ndarray], candidate: Iterable[np.ndarray]) -> ParityReport:
    ref = np.concatenate(list(reference))
    cand = np.concatenate(list(candidate))
    return ParityReport(len(ref), float(np.abs(ref - cand).max()), float((ref.argmax(1) == cand.argmax(1)).mean()))


def check_float_parity(model: PromptedClassifier, onnx_path: str | Path, batches: Iterable[Batch],
                       atol: float = 1e-4) -> ParityReport:
    """Max |logit difference| of the ONNX graph vs PyTorch on ``batches``; ExportError above ``atol``."""
    session = ort_session(onnx_path)
    model.eval()
    batches = list(batches)
    with torch.no_grad():
        reference = [model(*b.model_inputs()).logits.numpy() for b in batches]
    report = compare(reference, (session.run(None, ort_inputs(b))[0] for b in batches))
    if not report.max_abs_diff <= atol:
        raise ExportError(f"ONNX export of {onnx_path} differs from PyTorch: {report} (allowed max |Δlogit| {atol:g})")
    return report
