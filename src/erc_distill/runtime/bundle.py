"""The inference bundle: everything the robot needs to classify turns, and nothing more.

Folder layout::

    model.onnx        the graph (input_ids, attention_mask, mask_index -> logits)
    tokenizer.json    the fast tokenizer (``tokenizers`` format)
    bundle.json       labels, context config, special token ids, input names, provenance, and
                      ``files``: ``{filename: {"sha256": ..., "bytes": ...}}`` of the files above
                      (and of extra graphs such as ``model-fused.onnx``, see :func:`record_bundle_file`)

Loading needs onnxruntime, tokenizers and numpy only. :func:`erc_distill.export.bundle.write_bundle`
makes one from a trained model (that side needs torch).

:meth:`Bundle.load` trusts nothing: every way a bundle can be broken (a missing, empty, truncated or
altered file, a ``bundle.json`` that is not JSON or lacks a key, a graph ONNX Runtime cannot load, a
tokenizer ``tokenizers`` cannot read, a graph whose label count or inputs do not match ``bundle.json``,
special token ids outside the vocabulary) is a :class:`~erc_distill.errors.BundleError` whose message
names the file. Bundles written before ``files`` existed load with every check but the checksums.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.atomic import sha256_file, write_json
from erc_distill.data.context import ContextBuilder, ContextConfig, ModelInput
from erc_distill.errors import BundleError

BUNDLE_FORMAT = 1
REQUIRED_KEYS = ("format", "model", "tokenizer", "labels", "context", "special_ids")
SPECIAL_IDS = ("cls", "sep", "mask", "pad")
INPUTS = ("input_ids", "attention_mask", "mask_index")
REEXPORT = "re-export with `erc-distill export`"


class BundleTokenizer:
    """The slice of the transformers tokenizer interface that :class:`ContextBuilder` uses,
    on a bare ``tokenizers.Tokenizer``."""

    def __init__(self, path: str | Path, special: dict[str, int]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        # the builder adds special tokens and cuts to max_len itself; a tokenizer.json saved with padding or
        # truncation on (MiniLM's ships padded to 128) would pad every segment of every turn
        self._tok.no_padding()
        self._tok.no_truncation()
        self.cls_token_id = special["cls"]
        self.sep_token_id = special["sep"]
        self.mask_token_id = special["mask"]
        self.pad_token_id = special["pad"]
        self.name_or_path = str(path)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of a file, as ``bundle.json``'s ``files`` holds it."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def record_bundle_file(folder: str | Path, filename: str) -> dict[str, Any]:
    """Add (or update) ``filename``'s ``{"sha256", "bytes"}`` entry in ``folder/bundle.json``'s ``files``.

    For a graph written into the bundle after :func:`~erc_distill.export.bundle.write_bundle`
    (``model-fused.onnx``, ``model-int8-<method>.onnx``), so that :meth:`Bundle.load` with
    ``model_file=filename`` verifies it too. ``bundle.json`` is rewritten atomically. Returns the entry.
    Raises :class:`BundleError` when the folder has no readable ``bundle.json`` or ``filename`` is not
    a non-empty file directly inside ``folder``.
    """
    folder = Path(folder)
    meta_file = folder / "bundle.json"
    meta = _read_meta(folder, meta_file)
    _check_name(meta_file, "files", filename)
    path = folder / filename
    if not path.is_file():
        raise BundleError(f"{path}: no such file to record in {meta_file}")
    entry = file_record(path)
    if entry["bytes"] == 0:
        raise BundleError(f"{path}: the file is empty; nothing to record in {meta_file}")
    files = meta.get("files")
    if not isinstance(files, dict):
        files = {}
    files[filename] = entry
    meta["files"] = files
    write_json(meta_file, meta)
    return entry


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _check_name(meta_file: Path, key: str, name: Any) -> str:
    """A file name that stays inside the bundle folder (no separators, no ``..``)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BundleError(f"{meta_file}: {key} must be a file name inside the bundle folder, got {name!r}")
    return name


def _read_meta(folder: Path, meta_file: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    if not meta_file.is_file():
        raise BundleError(f"{meta_file}: missing: {folder} is not an erc-distill bundle (no bundle.json)")
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except OSError as err:
        raise BundleError(f"{meta_file}: cannot be read ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise BundleError(f"{meta_file}: not UTF-8 text ({err.reason} at byte {err.start}); {REEXPORT}") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise BundleError(f"{meta_file}: not valid JSON ({err}); {REEXPORT}") from err
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file}: not a JSON object (got {json_type(meta)}); {REEXPORT}")
    return meta


def _validate_meta(meta_file: Path, meta: dict[str, Any]) -> None:
    """Keys, types and values of ``bundle.json`` (before any other file is opened)."""
    if meta.get("modality") == "audio":
        raise BundleError(f"{meta_file}: an audio bundle (a speech model, no tokenizer); open it with "
                          "erc_distill.runtime.AudioBundle or open_bundle, or give it to `erc-distill stream` as "
                          "--audio-bundle")
    if "format" in meta and meta["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{meta_file}: bundle format {meta['format']!r}, this erc-distill reads "
                          f"{BUNDLE_FORMAT}; {REEXPORT} (or use the erc-distill version that wrote it)")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{meta_file}: missing key(s) {', '.join(map(repr, missing))}; {REEXPORT}")
    _check_name(meta_file, "model", meta["model"])
    _check_name(meta_file, "tokenizer", meta["tokenizer"])
    labels = meta["labels"]
    if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels)
            or len(set(labels)) != len(labels)):
        raise BundleError(f"{meta_file}: labels must be a non-empty list of distinct non-empty strings, got {labels!r}")
    special = meta["special_ids"]
    if not isinstance(special, dict):
        raise BundleError(f"{meta_file}: special_ids must be an object, got {json_type(special)}")
    for name in SPECIAL_IDS:
        value = special.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleError(f"{meta_file}: special_ids.{name} must be a token id (an integer), got {value!r}")
    if not isinstance(meta["context"], dict):
        raise BundleError(f"{meta_file}: context must be an object, got {json_type(meta['context'])}")
    files = meta.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise BundleError(f"{meta_file}: files must be an object, got {json_type(files)}")
        for name, entry in files.items():
            if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                    or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int)):
                raise BundleError(f"{meta_file}: files.{name} must be {{\"sha256\": hex, \"bytes\": int}}, "
                                  f"got {entry!r}")


def _check_file(path: Path, entry: dict[str, Any] | None, verify: bool) -> None:
    """Present, non-empty, and (when ``bundle.json`` records it) the recorded size and SHA-256."""
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle; {REEXPORT}")
    size = path.stat().st_size
    if size == 0:
        raise BundleError(f"{path}: the file is empty; {REEXPORT}")
    if entry is None:
        return
    if size != entry["bytes"]:
        how = "truncated" if size < entry["bytes"] else "longer than exported"
        raise BundleError(f"{path}: {size} bytes, bundle.json records {entry['bytes']}: the file is {how}; {REEXPORT}")
    if verify:
        digest = sha256_file(path)
        if digest != entry["sha256"].lower():
            raise BundleError(f"{path}: SHA-256 {digest[:16]}… does not match bundle.json ({entry['sha256'][:16]}… "
                              f"expected): the file changed after export; {REEXPORT}")


@dataclass
class Bundle:
    folder: Path
    labels: tuple[str, ...]
    context: ContextConfig
    tokenizer: BundleTokenizer
    session: Any
    meta: dict[str, Any]
    model_file: str = "model.onnx"
    """The graph file the session runs (``bundle.json``'s ``model`` unless another was asked for)."""

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, model_file: str | None = None,
             verify: bool = True, spin: bool = True) -> "Bundle":
        """Open and check a bundle.

        ``threads``: ONNX Runtime intra-op threads; ``model_file``: another graph in the folder (e.g. an
        INT8 one); ``verify``: check the SHA-256 of the model and tokenizer files against
        ``bundle.json``'s ``files`` (sizes are checked either way; False skips the hashing, which reads
        every byte); ``spin``: False when this session takes turns with others on the same cores (text +
        speech per turn): its threads then sleep after a run instead of spinning (bench/session_spin.py, 2
        cores: speech graph p50 36 -> 23 ms, text 21 -> 10 ms; one session alone spins best, 6.9 vs 7.2 ms).
        Every failure is a :class:`BundleError` naming the file.
        """
        folder = Path(folder)
        meta_file = folder / "bundle.json"
        meta = _read_meta(folder, meta_file)
        _validate_meta(meta_file, meta)
        try:
            context = ContextConfig(**meta["context"])
        except (TypeError, ValueError) as err:
            raise BundleError(f"{meta_file}: context: {err}; {REEXPORT}") from err
        model_name = _check_name(meta_file, "model_file", model_file) if model_file is not None else meta["model"]
        files = meta.get("files") or {}
        model_path, tok_path = folder / model_name, folder / meta["tokenizer"]
        _check_file(tok_path, files.get(meta["tokenizer"]), verify)
        _check_file(model_path, files.get(model_name), verify)

        special = meta["special_ids"]
        try:
            tokenizer = BundleTokenizer(tok_path, special)
        except Exception as err:  # tokenizers raises a bare Exception on a file it cannot parse
            raise BundleError(f"{tok_path}: not a tokenizer the `tokenizers` library can read ({err}); "
                              f"{REEXPORT}") from err
        vocab = tokenizer.vocab_size
        for name in SPECIAL_IDS:
            if not 0 <= special[name] < vocab:
                raise BundleError(f"{meta_file}: special_ids.{name} = {special[name]} is outside the vocabulary "
                                  f"of {tok_path} ({vocab} tokens); {REEXPORT}")

        session = _open_session(model_path, threads, spin)
        names = sorted(i.name for i in session.get_inputs())
        if names != sorted(INPUTS):
            raise BundleError(f"{model_path}: the graph's inputs are {names}, the runtime feeds {sorted(INPUTS)}; "
                              f"{REEXPORT}")
        bundle = cls(folder, tuple(meta["labels"]), context, tokenizer, session, meta, model_name)
        bundle._check_label_count(model_path, meta_file)
        return bundle

    def _check_label_count(self, model_path: Path, meta_file: Path) -> None:
        """The graph's logits width must equal ``len(labels)``: read from the graph's output shape when
        static, else from one tiny dummy input ([CLS] [MASK] [SEP])."""
        shape = self.session.get_outputs()[0].shape
        width = shape[-1] if shape else None
        if not isinstance(width, int):
            special = self.meta["special_ids"]
            ids = np.array([[special["cls"], special["mask"], special["sep"]]], dtype=np.int64)
            try:
                out = self.session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                              "mask_index": np.array([1], dtype=np.int64)})[0]
            except Exception as err:  # ORT raises its own exception types
                raise BundleError(f"{model_path}: the graph fails on a dummy input ({type(err).__name__}: {err}); "
                                  f"{REEXPORT}") from err
            if out.ndim != 2 or out.shape[0] != 1:
                raise BundleError(f"{model_path}: the graph returns logits of shape {list(out.shape)} for one "
                                  f"input, expected [1, {len(self.labels)}]; {REEXPORT}")
            width = int(out.shape[-1])
        if width != len(self.labels):
            raise BundleError(f"{model_path}: the graph outputs {width} logits per turn but {meta_file} lists "
                              f"{len(self.labels)} labels; {REEXPORT}")

    def builder(self) -> ContextBuilder:
        return ContextBuilder(self.tokenizer, self.context, name=str(self.folder))

    def logits(self, inputs: Sequence[ModelInput]) -> np.ndarray:
        """Logits [N, C] of built inputs, padded into one batch."""
        width = max(len(x) for x in inputs)
        ids = np.full((len(inputs), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = x.input_ids
            mask[i, : len(x)] = 1
        index = np.array([x.mask_index for x in inputs], dtype=np.int64)
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask, "mask_index": index})[0]

    def probabilities(self, inputs: Sequence[ModelInput]) -> np.ndarray:
        z = self.logits(inputs)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


def _open_session(model_path: Path, threads: int | None, spin: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:  # several sessions taking turns on few cores: idle threads must not hold them
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT's pybind exceptions (InvalidProtobuf, Fail, ...) share no public base
        raise BundleError(f"{model_path}: ONNX Runtime cannot load the graph ({type(err).__name__}: {err}); "
                          f"{REEXPORT}") from err
