"""The inference bundle: everything the robot needs to classify turns, and nothing more.

Folder layout::

    model.onnx        the graph (input_ids, attention_mask, mask_index -> logits)
    tokenizer.json    the fast tokenizer (``tokenizers`` format)
    bundle.json       labels, context config, special token ids, input names, provenance

Loading needs onnxruntime, tokenizers and numpy only. :func:`erc_distill.export.bundle.write_bundle`
makes one from a trained model (that side needs torch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.data.context import ContextBuilder, ContextConfig, ModelInput

BUNDLE_FORMAT = 1


class BundleTokenizer:
    """The slice of the transformers tokenizer interface that :class:`ContextBuilder` uses,
    on a bare ``tokenizers.Tokenizer``."""

    def __init__(self, path: str | Path, special: dict[str, int]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.cls_token_id = special["cls"]
        self.sep_token_id = special["sep"]
        self.mask_token_id = special["mask"]
        self.pad_token_id = special["pad"]
        self.name_or_path = str(path)

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@dataclass
class Bundle:
    folder: Path
    labels: tuple[str, ...]
    context: ContextConfig
    tokenizer: BundleTokenizer
    session: Any
    meta: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, model_file: str | None = None) -> "Bundle":
        """Open a bundle; ``threads``: ONNX Runtime intra-op threads; ``model_file``: another graph in
        the folder (e.g. an INT8 one)."""
        import onnxruntime as ort

        folder = Path(folder)
        meta_file = folder / "bundle.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} is not an erc-distill bundle (no bundle.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{meta_file}: bundle format {meta.get('format')}, this erc-distill reads {BUNDLE_FORMAT}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(folder / (model_file or meta["model"])), options,
                                       providers=["CPUExecutionProvider"])
        return cls(folder, tuple(meta["labels"]), ContextConfig(**meta["context"]),
                   BundleTokenizer(folder / meta["tokenizer"], meta["special_ids"]), session, meta)

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
