"""Multimodal fusion heads (text + audio + visual → logits), registered by name: ``asf``, ``mag``, ``mult``."""

from __future__ import annotations

from erc_distill.fusion.heads import (
    FUSION_HEADS,
    ONNX_INPUT_NAMES,
    ONNX_OUTPUT_NAMES,
    ASFHead,
    FusionHead,
    FusionOutput,
    MAGHead,
    MulTHead,
    build_fusion_head,
    export_onnx,
    register,
)

__all__ = [
    "FUSION_HEADS",
    "ONNX_INPUT_NAMES",
    "ONNX_OUTPUT_NAMES",
    "ASFHead",
    "FusionHead",
    "FusionOutput",
    "MAGHead",
    "MulTHead",
    "build_fusion_head",
    "export_onnx",
    "register",
]
