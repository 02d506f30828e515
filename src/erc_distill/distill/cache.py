"""The teacher-output cache: teacher logits and mask-position features, computed once, memory-mapped.

Layout of a cache folder::

    key.json                       what the outputs depend on (teacher weights hash, corpus, split,
                                   context config, tokenizer, hidden layers); another key = recompute
                                   (an ensemble's: its files, weights, τ, and ``feature_dims`` /
                                   ``feature_weights`` when members' features sit side by side)
    <split>.ids.json               example ids, row order of the arrays
    <split>.logits.npy             [N, C] float32
    <split>.features.npy           [N, H] float16 (mask-position last hidden state)
    <split>.hidden.npy             [N, n, H] float16 (chosen layers at the mask), when asked for
    parts/<split>.<i>.npz          chunks of an unfinished split (an interrupted run resumes from them)

Every file is written to a temporary name and renamed, so a killed run never leaves a half file.
Rows are joined to student batches by example id, never by token position.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from erc_distill.atomic import atomic_path
from erc_distill.data.datamodule import ErcDataModule
from erc_distill.distill.module import predict
from erc_distill.modeling import PromptedClassifier


def weights_hash(folder: str | Path) -> str:
    """SHA-256 (first 16 hex) over every ``*.safetensors`` file of a saved model folder (memoised per
    file name, size and mtime: the cache stage's key and its run ask for the same teacher)."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    return _weights_hash(str(folder), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@lru_cache(maxsize=8)
def _weights_hash(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        f = Path(name)
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheKey:
    teacher_weights: str
    corpus: str
    splits: tuple[str, ...]
    context: str
    """Fingerprint of the teacher's ContextConfig."""
    tokenizer: str
    hidden_layers: tuple[int, ...] = ()
    limit: int | None = None
    data_fingerprint: str = ""
    """SHA-256 of the corpus files read (:func:`erc_distill.data.corpus_fingerprint`)."""


def _atomic_save(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    _atomic_save(path, write)


def build_cache(
    model: PromptedClassifier,
    datamodule: ErcDataModule,
    folder: str | Path,
    key: CacheKey,
    chunk_batches: int = 20,
    device: str = "cpu",
    progress: bool = True,
) -> "TeacherCache":
    """Compute (or resume, or re-use) the cache of ``key.splits`` in ``folder``."""
    folder = Path(folder)
    key_file = folder / "key.json"
    key_json = json.dumps(asdict(key), sort_keys=True, indent=2)
    if key_file.is_file() and key_file.read_text() != key_json:
        shutil.rmtree(folder)  # made for another teacher / data / context: recompute
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    _atomic_save(key_file, lambda tmp: tmp.write_text(key_json))
    for split in key.splits:
        if (folder / f"{split}.ids.json").is_file():
            continue
        loader = datamodule.eval_dataloader(split)
        batches = list(loader)
        chunks = [batches[i : i + chunk_batches] for i in range(0, len(batches), chunk_batches)]
        bar = tqdm(total=len(batches), desc=f"teacher cache {split}", disable=not progress)
        for i, chunk in enumerate(chunks):
            part = folder / "parts" / f"{split}.{i}.npz"
            if not part.is_file():
                ids, logits, feats, hidden = predict(model, chunk, device, list(key.hidden_layers) or None)
                if not (torch.isfinite(logits).all() and torch.isfinite(feats).all()):
                    from erc_distill.errors import TrainingError

                    raise TrainingError(f"the teacher gives non-finite outputs on {split} (chunk {i}): its weights "
                                        f"are broken; retrain it (delete its folder in the cache)")
                arrays = {"ids": np.array(ids), "logits": logits.numpy(), "features": feats.half().numpy()}
                if hidden is not None:
                    arrays["hidden"] = hidden.half().numpy()

                def write(tmp: Path, arrays=arrays) -> None:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, **arrays)

                _atomic_save(part, write)
            bar.update(len(chunk))
        bar.close()
        parts = [np.load(folder / "parts" / f"{split}.{i}.npz") for i in range(len(chunks))]
        for name in ("logits", "features", "hidden"):
            if name in parts[0]:
                _save_npy(folder / f"{split}.{name}.npy", np.concatenate([p[name] for p in parts]))
        ids = [str(x) for p in parts for x in p["ids"]]
        _atomic_save(folder / f"{split}.ids.json", lambda tmp: tmp.write_text(json.dumps(ids)))
        for i in range(len(chunks)):
            (folder / "parts" / f"{split}.{i}.npz").unlink()
    return TeacherCache(folder)


class TeacherCache:
    """Read side: memory-mapped arrays, rows looked up by example id."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.key = json.loads((self.folder / "key.json").read_text())
        self.row: dict[str, tuple[str, int]] = {}
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        for split in self.key["splits"]:
            ids = json.loads((self.folder / f"{split}.ids.json").read_text())
            self.row.update({eid: (split, i) for i, eid in enumerate(ids)})
            self.arrays[split] = {
                name: np.load(self.folder / f"{split}.{name}.npy", mmap_mode="r")
                for name in ("logits", "features", "hidden")
                if (self.folder / f"{split}.{name}.npy").is_file()
            }

    def check(self) -> None:
        """ValueError naming the file unless every array has one row per id and finite values."""
        for split, arrays in self.arrays.items():
            n = sum(1 for s, _ in self.row.values() if s == split)
            for name, array in arrays.items():
                file = self.folder / f"{split}.{name}.npy"
                if array.shape[0] != n:
                    raise ValueError(f"{file}: {array.shape[0]} rows for {n} example ids")
                if not np.isfinite(np.asarray(array, dtype=np.float32)).all():
                    raise ValueError(f"{file}: non-finite values")

    def __len__(self) -> int:
        return len(self.row)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.row

    def _where(self, example_ids: Sequence[str]) -> list[tuple[str, int]]:
        try:
            return [self.row[e] for e in example_ids]
        except KeyError as err:
            raise KeyError(f"example {err.args[0]!r} is not in the teacher cache {self.folder}") from None

    def _take(self, where: list[tuple[str, int]], name: str) -> np.ndarray:
        splits = np.array([s for s, _ in where])
        rows = np.array([i for _, i in where], dtype=np.int64)
        first = self.arrays[where[0][0]][name]
        out = np.empty((len(where), *first.shape[1:]), dtype=first.dtype)
        for split in np.unique(splits):
            mask = splits == split
            out[mask] = self.arrays[str(split)][name][rows[mask]]
        return out

    def gather(self, example_ids: Sequence[str], name: str) -> np.ndarray:
        """One array's rows for these examples, in this order (``features``: [N, H]), read straight from the
        memory-mapped files in their dtype (KeyError naming a missing id)."""
        return self._take(self._where(example_ids), name)

    def lookup(self, example_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """Teacher tensors for these examples, in this order, float32 (KeyError naming a missing id)."""
        where = self._where(example_ids)
        return {name: torch.from_numpy(self._take(where, name).astype(np.float32)) for name in self.arrays[where[0][0]]}
