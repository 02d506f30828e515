"""TensorRT engines from the exported ONNX graph (needs an NVIDIA GPU and ``pip install "erc-distill[tensorrt]"``).

One optimisation profile covers batch 1..``max_batch`` and sequence lengths 8..max(``sequence_lengths``),
tuned for the profile's lengths (the last one is the "opt" shape). FP16 engines build from the float
graph; INT8 engines build from a QDQ graph (``ort-static``, ``nncf-ptq`` or ``nncf-qat``), whose scales
TensorRT reads (explicit quantization), so no TensorRT calibrator is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from erc_distill.optional import optional_import


def tensorrt_available() -> bool:
    """True when TensorRT imports and sees a CUDA device."""
    try:
        trt = optional_import("tensorrt")
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        return builder is not None and builder.platform_has_fast_fp16 is not None
    except Exception:  # no package, no driver, no GPU
        return False


@dataclass(frozen=True)
class EngineSpec:
    precision: str  # "fp16" or "int8"
    sequence_lengths: tuple[int, ...] = (128, 256)
    max_batch: int = 1
    workspace_mb: int = 1024


def build_engine(onnx_path: str | Path, engine_path: str | Path, spec: EngineSpec) -> Path:
    """Parse ``onnx_path``, build a serialized engine with ``spec`` and write it to ``engine_path``."""
    trt = optional_import("tensorrt")
    if spec.precision not in ("fp16", "int8"):
        raise ValueError(f"TensorRT precision must be fp16 or int8, got {spec.precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if spec.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    longest = max(spec.sequence_lengths)
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, (1, 8), (1, spec.sequence_lengths[-1]), (spec.max_batch, longest))
    profile.set_shape("mask_index", (1,), (1,), (spec.max_batch,))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an {spec.precision} engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def engine_specs(precision: str, sequence_lengths: Sequence[int]) -> list[EngineSpec]:
    """The engines a device profile asks for (INT8 profiles also get an FP16 engine to compare)."""
    lengths = tuple(sorted(sequence_lengths))
    specs = [EngineSpec("fp16", lengths)]
    if precision == "int8":
        specs.append(EngineSpec("int8", lengths))
    return specs
