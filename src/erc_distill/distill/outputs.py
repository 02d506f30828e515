"""Teacher outputs as a small portable file, and teacher ensembles built from such files.

A trained teacher's logits on every example it can teach (train, dev, test and the transfer set)
are written once (``erc-distill teacher-outputs``, on a GPU) and shipped (``bench/results/teachers/``):
a machine without a GPU then distils students with the logit terms (``kd``, ``dist``) without
training or even loading a teacher (feature terms still need the teacher model).

File ``NAME.npz``::

    ids      [N]     example ids (``meld/train/12/3``, ``emorynlp-transfer/train/dev-s01e02c03/4``)
    split    [N]     train / dev / test / transfer
    logits   [N, C]  float16

and ``NAME.json`` beside it: the teacher (encoder, recipe, stage key), the corpus, its labels and
data fingerprint, the transfer set's sources and fingerprint, and the teacher's dev / test scores.

**Ensembles.** With teachers k = 1..K, weights w_k (Σ w_k = 1) and the student's temperature τ, the
KD target is the weighted mean of the tempered probabilities,

    p_e = Σ_k w_k softmax(z_k / τ).

The loss terms take teacher *logits* and temper them themselves, so the ensemble is stored as the
logits z_e = τ · log p_e, for which softmax(z_e / τ) = p_e exactly: every logit term (kd, dist, ...)
distils from the ensemble unchanged. Scored as a model (τ = 1), the ensemble predicts
argmax Σ_k w_k softmax(z_k).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.atomic import atomic_dir, atomic_path, sha256_file
from erc_distill.errors import ConfigError

FORMAT = "erc-distill-teacher-outputs/1"


@dataclass(frozen=True)
class TeacherOutputs:
    """One teacher's outputs: ``logits`` [N, C] float32 in the order of ``ids``; ``meta``: the JSON sidecar."""

    path: Path
    ids: tuple[str, ...]
    splits: tuple[str, ...]
    logits: np.ndarray
    meta: dict[str, Any]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta["labels"])

    def rows(self, split: str) -> np.ndarray:
        """Row indices of one split (train / dev / test / transfer)."""
        return np.flatnonzero(np.asarray(self.splits) == split)

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)[:16]


def sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def write_teacher_outputs(path: str | Path, ids: Sequence[str], splits: Sequence[str], logits: np.ndarray,
                          meta: dict[str, Any]) -> Path:
    """Write ``path`` (.npz) and its ``.json`` sidecar, each atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: teacher outputs are written as a .npz file", field="--to")
    logits = np.asarray(logits, dtype=np.float32).astype(np.float16)
    if logits.shape != (len(ids), len(meta["labels"])) or len(splits) != len(ids):
        raise ValueError(f"{len(ids)} ids, {len(splits)} splits and logits {logits.shape} for "
                         f"{len(meta['labels'])} labels")
    if not np.isfinite(logits).all():
        raise ValueError(f"{path}: the teacher gave non-finite logits (or beyond float16)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, ids=np.array(ids), split=np.array(splits), logits=logits)
    with atomic_path(sidecar(path)) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True))
    return path


def read_teacher_outputs(path: str | Path) -> TeacherOutputs:
    """Read and check one file: a ConfigError naming the file and what is wrong with it."""
    path = Path(path)

    def bad(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}", field="--teacher-outputs")

    if not path.is_file():
        raise bad("no such file (teacher outputs are written by `erc-distill teacher-outputs --to FILE.npz`; "
                  "shipped ones are in bench/results/teachers/)")
    if not sidecar(path).is_file():
        raise bad(f"its description {sidecar(path).name} is missing beside it")
    try:
        meta = json.loads(sidecar(path).read_text())
        with np.load(path, allow_pickle=False) as z:
            ids, splits, logits = z["ids"], z["split"], z["logits"].astype(np.float32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # a cut or foreign file
        raise bad(f"not a teacher-outputs file ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"{sidecar(path).name} is not a {FORMAT} description")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise bad(f"{sidecar(path).name}: 'labels' must be a non-empty list of label names")
    if logits.ndim != 2 or logits.shape[0] != len(ids) or len(splits) != len(ids):
        raise bad(f"{len(ids)} ids, {len(splits)} splits, logits {logits.shape}")
    if logits.shape[1] != len(labels):
        raise bad(f"logits have {logits.shape[1]} classes, the description {len(labels)} labels")
    if not np.isfinite(logits).all():
        raise bad("non-finite logits")
    if len(set(ids.tolist())) != len(ids):
        raise bad("an example id occurs twice")
    return TeacherOutputs(path, tuple(ids.tolist()), tuple(splits.tolist()), logits, meta)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def check_compatible(outputs: Sequence[TeacherOutputs], corpus: str, labels: Sequence[str], data_fingerprint: str,
                     transfer: Sequence[str] = (), transfer_data: dict[str, str] | None = None,
                     limit: int | None = None) -> None:
    """ConfigError naming the file whose corpus, labels or data differ from this run's, or that lacks one of the
    run's ``transfer`` sources or was labelled on other transfer corpus files (``transfer_data``: corpus ->
    fingerprint). Single missing example ids are found later, by :func:`ensemble`."""
    for o in outputs:
        m = o.meta
        if m.get("corpus") != corpus or tuple(m.get("labels", ())) != tuple(labels):
            raise ConfigError(f"{o.path}: made on {m.get('corpus')} with labels {m.get('labels')}, this run is {corpus} "
                              f"{list(labels)}", field="--teacher-outputs")
        if m.get("data_fingerprint") != data_fingerprint:
            raise ConfigError(f"{o.path}: made on other {corpus} files (data fingerprint "
                              f"{str(m.get('data_fingerprint'))[:12]}…, these are {data_fingerprint[:12]}…); its example "
                              "ids may not mean the same turns", field="--teacher-outputs")
        if m.get("limit") is not None and (limit is None or limit > m["limit"]):
            raise ConfigError(f"{o.path}: made on the first {m['limit']} dialogues of each split (a --quick or --limit "
                              f"run), this run reads {'all' if limit is None else f'the first {limit}'}",
                              field="--teacher-outputs")
        made = m.get("transfer") or {}
        lacking = [s for s in transfer if s not in made.get("sources", ())]
        if lacking:
            raise ConfigError(f"{o.path}: made without the transfer source(s) {', '.join(lacking)} (it has "
                              f"{', '.join(made.get('sources', ())) or 'none'}): make the outputs with this run's "
                              "--transfer", field="--teacher-outputs")
        for name, fingerprint in (transfer_data or {}).items():
            if transfer and made.get("data", {}).get(name) != fingerprint:
                raise ConfigError(f"{o.path}: its transfer turns were read from other {name} files", field="--teacher-outputs")


def ensemble(outputs: Sequence[TeacherOutputs], weights: Sequence[float] = (), tau: float = 1.0,
             ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``(ids, z_e)`` with z_e = τ · log Σ_k w_k softmax(z_k / τ) [N, C] over the ids every file has
    (``ids``: exactly these, in this order; a ConfigError names a file that lacks one)."""
    if not outputs:
        raise ValueError("no teacher outputs")
    w = np.asarray(weights if len(weights) else [1.0] * len(outputs), dtype=np.float64)
    if len(w) != len(outputs) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"{len(w)} weights for {len(outputs)} teacher output files (weights >= 0, not all 0)",
                          field="--teacher-weights")
    w = w / w.sum()
    if ids is None:
        common = set(outputs[0].ids)
        for o in outputs[1:]:
            common &= set(o.ids)
        ids = [i for i in outputs[0].ids if i in common]
    ids = list(ids)
    mix = np.zeros((len(ids), outputs[0].logits.shape[1]), dtype=np.float64)
    for o, wk in zip(outputs, w):
        where = {e: r for r, e in enumerate(o.ids)}
        try:
            rows = [where[e] for e in ids]
        except KeyError as err:
            raise ConfigError(f"{o.path}: no outputs for example {err.args[0]!r} (made without this run's "
                              "--transfer set, or on other data)", field="--teacher-outputs") from None
        mix += wk * np.exp(_log_softmax(o.logits[rows].astype(np.float64) / tau))
    return ids, (tau * np.log(np.clip(mix, 1e-30, None))).astype(np.float32)


def import_as_cache(outputs: Sequence[TeacherOutputs], weights: Sequence[float], tau: float,
                    split_ids: dict[str, Sequence[str]], folder: str | Path, key: dict[str, Any],
                    member_caches: Callable[[], Sequence[Any]] | None = None) -> Path:
    """Write the ensemble's logits for ``split_ids`` (split -> example ids) as a teacher cache folder
    (:class:`erc_distill.distill.cache.TeacherCache` reads it), or reuse the folder made for the same ``key``.

    ``member_caches``: called only when the folder is (re)made; gives each teacher's own cache (a ``TeacherCache``
    with features), whose ``features`` [N, H_k] and ``hidden`` [N, n, H_k] are written side by side, [N, Σ_k H_k]
    and [N, n, Σ_k H_k], with their widths in ``key.json``'s ``feature_dims`` and the normalised ensemble weights
    in ``feature_weights``; None: logits only."""
    import shutil

    folder = Path(folder)
    core = {**key, "splits": sorted(split_ids)}
    if folder.is_dir():
        try:
            stored = json.loads((folder / "key.json").read_text())
        except (OSError, ValueError):
            stored = None
        if isinstance(stored, dict):  # what the member caches add is not part of what the folder is made for
            for derived in ("feature_dims", "feature_weights"):
                stored.pop(derived, None)
        if stored == json.loads(json.dumps(core)) and all((folder / f"{s}.ids.json").is_file() for s in split_ids):
            return folder
        shutil.rmtree(folder)
    members = list(member_caches()) if member_caches is not None else []
    if members:
        w = np.asarray(weights if len(weights) else [1.0] * len(members), dtype=np.float64)
        core.update(feature_dims=[int(m.arrays["train"]["features"].shape[-1]) for m in members],
                    feature_weights=[float(x) for x in w / w.sum()])
    with atomic_dir(folder) as tmp:
        for split, ids in split_ids.items():
            ids, z = ensemble(outputs, weights, tau, ids)
            np.save(tmp / f"{split}.logits.npy", z)
            for name in ("features", "hidden"):
                if members and all(name in m.arrays["train"] for m in members):
                    np.save(tmp / f"{split}.{name}.npy",
                            np.concatenate([m.gather(ids, name).astype(np.float16) for m in members], axis=-1))
            (tmp / f"{split}.ids.json").write_text(json.dumps(ids))
        (tmp / "key.json").write_text(json.dumps(core, sort_keys=True, indent=2))
    return folder


def evaluate_outputs(outputs: Sequence[TeacherOutputs], weights: Sequence[float], data: Any,
                     csv_path: str | Path) -> dict[str, Any]:
    """Score the ensemble (τ = 1) on one labelled split (a :class:`~erc_distill.data.types.CorpusSplit`) like a
    model: the predictions CSV of :func:`erc_distill.stages.evaluate.evaluate_split` and metrics.json's entry."""
    import csv

    import torch

    from erc_distill.report.metrics import compute_metrics

    turns = [t for d in data.dialogues for t in d.turns]
    ids, z = ensemble(outputs, weights, 1.0, [t.example_id for t in turns])
    probs = np.exp(_log_softmax(z.astype(np.float64)))
    labels = list(data.labels)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["example_id", "dialogue_id", "turn", "speaker", "gold", "pred", *(f"p_{label}" for label in labels)])
        for t, p in zip(turns, probs):
            w.writerow([t.example_id, t.dialogue_id, t.turn_id, t.speaker, t.label or "", labels[int(p.argmax())],
                        *(f"{x:.6f}" for x in p)])
    gold = torch.tensor([labels.index(t.label) if t.label is not None else -1 for t in turns])
    keep = gold >= 0
    return compute_metrics(torch.from_numpy(probs.argmax(-1))[keep], gold[keep], labels).to_dict()


def score_outputs(outputs: Sequence[TeacherOutputs], data_dir: Any = None, weights: Sequence[float] = (),
                  combinations: bool = False) -> list[dict[str, Any]]:
    """Each file, and their ensemble (``weights``, default equal), scored like models on dev and test of the corpus
    the files were made on (τ = 1): rows ``{"teachers": [file stems], "weights": [...], "dev": metrics, "test":
    metrics}``. ``combinations``: every subset of two or more files with equal weights (to choose an ensemble
    on dev). Files made on a slice (``--limit``) are scored on the turns every file has (``turns`` in each row).
    A ConfigError names a file made on other data than ``data_dir`` holds."""
    from itertools import combinations as subsets

    import torch

    from erc_distill.data import corpus_fingerprint
    from erc_distill.data.corpora import load_corpus
    from erc_distill.report.metrics import compute_metrics

    if not outputs:
        raise ValueError("no teacher outputs")
    corpus, labels = outputs[0].meta.get("corpus"), outputs[0].labels
    limits = [o.meta["limit"] for o in outputs if o.meta.get("limit") is not None]
    check_compatible(outputs, corpus, labels, corpus_fingerprint(corpus, data_dir), limit=min(limits, default=None))
    gold: dict[str, tuple[list[str], torch.Tensor]] = {}
    have = set(outputs[0].ids).intersection(*(o.ids for o in outputs[1:]))
    for split in ("dev", "test"):
        turns = [t for d in load_corpus(corpus, split, data_dir).dialogues for t in d.turns if t.label is not None]
        turns = [t for t in turns if t.example_id in have]  # a --limit file: the dialogues it labelled
        gold[split] = ([t.example_id for t in turns], torch.tensor([labels.index(t.label) for t in turns]))
    groups = [((i,), (1.0,)) for i in range(len(outputs))]
    if len(outputs) > 1:
        groups.append((tuple(range(len(outputs))), tuple(weights) or (1.0,) * len(outputs)))
    if combinations:
        groups += [(c, (1.0,) * len(c)) for n in range(2, len(outputs)) for c in subsets(range(len(outputs)), n)]
        if weights:  # the equal-weight ensemble of all of them too
            groups.append((tuple(range(len(outputs))), (1.0,) * len(outputs)))
    rows = []
    for members, w in groups:
        row: dict[str, Any] = {"teachers": [outputs[i].path.stem for i in members], "weights": list(w),
                               "turns": {split: len(ids) for split, (ids, _) in gold.items()}}
        for split, (ids, y) in gold.items():
            _, z = ensemble([outputs[i] for i in members], w, 1.0, ids)
            row[split] = compute_metrics(torch.from_numpy(z.argmax(-1)), y, labels).to_dict()
        rows.append(row)
    return rows
