"""``erc-distill multimodal``: TelME's recipe on a finished text run — the text teacher teaches an audio
and a visual student (cross-modal distillation, joined by example id), a fusion head shifts the text
student's representation by what they saw, and the fused student is exported, checked and timed.

Steps (each kept in ``--out`` and skipped when its inputs are unchanged, so a killed run resumes)::

    audio/model        audio student (e.g. whisper-tiny): CE + DIST from the text teacher's logits
    visual/model       visual student (e.g. fer-cnn): the same, on face crops (or its pretrained
                       features as they are, when too few train turns have video to learn from)
    features/SPLIT.npz each turn's text / audio / visual features and masks (absent = masked)
    fusion/HEAD.pt     one fusion head per name, trained on the frozen features (modality dropout)
    edge/              ONNX graphs (text, audio, visual: logits + features; the fusion head), checked
                       end to end against PyTorch; INT8 (ONNX Runtime dynamic) text and audio graphs
    metrics.json       dev / test weighted F1 of every branch alone and every head, on the turns with
                       media and on all turns (the rest text-only); per-turn latency of each path
    report.md          the same, readable

The text teacher is ``--teacher-outputs`` here, else the text run's own: its ``--teacher-outputs`` files
(logits only: the branches learn with CE + DIST), or the teacher it trained, whose cache holds logits
and features (train and dev turns): the branches then also learn TelME's similarity-KL feature term
(``feature``, through a learned projection to the teacher's width).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erc_distill.errors import ConfigError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class BranchTrainConfig:
    """How a non-verbal student learns from the text teacher: ``loss`` terms (``ce``, ``dist``, ``kd``),
    epochs / batch / learning rates, early stopping on dev weighted F1."""

    epochs: int = 4
    batch_size: int = 8
    lr: float = 5e-5
    head_lr: float = 1e-3
    patience: int = 2
    loss: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "dist": 1.0})
    feature: float = 0.5
    """Weight of TelME's feature term, added to ``loss`` when the teacher's features are known."""
    tau: float = 4.0
    min_train_turns: int = 16
    seed: int = 0


@dataclass(frozen=True)
class MultimodalConfig:
    text_run: Path
    out: Path
    media_dir: Path | None = None
    frames_dir: Path | None = None
    teacher_outputs: tuple[Path, ...] = ()
    audio_student: str | None = "whisper-tiny"
    visual_student: str | None = "fer-cnn"
    fusion: tuple[str, ...] = ("asf", "mag", "mult")
    audio_train: BranchTrainConfig = BranchTrainConfig()
    visual_train: BranchTrainConfig = BranchTrainConfig(batch_size=16, lr=1e-4)
    fusion_epochs: int = 30
    modality_dropout: float = 0.3
    seeds: tuple[int, ...] = (0,)
    data_dir: Path | None = None
    profile_turns: int = 100
    threads: int = 2
    face_detector: str = "auto"


# -- small helpers -------------------------------------------------------------------------------------

def _done(folder: Path, key: dict[str, Any]) -> bool:
    marker = folder / "done.json"
    return marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(key, default=str))


def _mark(folder: Path, key: dict[str, Any]) -> None:
    from erc_distill.atomic import write_text

    write_text(folder / "done.json", json.dumps(key, default=str, indent=2))


def _train_config(b: BranchTrainConfig) -> Any:
    from erc_distill.config import OptimConfig, TrainConfig

    return TrainConfig(epochs=b.epochs, batch_size=b.batch_size, eval_batch_size=16, patience=b.patience,
                       seed=b.seed, precision="32-true", checkpoint_every_n_steps=50,
                       optim=OptimConfig(lr=b.lr, head_lr=b.head_lr))


def _weighted_f1(logits: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> float:
    import torch

    from erc_distill.report.metrics import compute_metrics

    keep = labels >= 0
    if not keep.any():
        return float("nan")
    m = compute_metrics(torch.from_numpy(logits[keep].argmax(-1)), torch.from_numpy(labels[keep]), list(names))
    return 100 * float(m.to_dict()["weighted_f1"])


def describe_media(folder: Path | None) -> dict[str, Any] | None:
    """What a media folder is: its path and, when it was made by ``bench/synth_meld_media.py`` (a
    ``manifest.json`` with ``synthetic: true``), that it is synthetic and how it was made."""
    if folder is None:
        return None
    out: dict[str, Any] = {"path": str(folder), "synthetic": False}
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return out
    if isinstance(manifest, dict) and manifest.get("synthetic"):
        voice = manifest.get("voice") or {}
        out.update(synthetic=True, note=manifest.get("note", ""), voice=Path(str(voice.get("file", ""))).name,
                   slice=(manifest.get("slice") or {}).get("dialogues_per_split"))
    return out


def _run_teacher_cache(run: Path) -> Path | None:
    """The teacher cache a text run made with its own teacher (from its manifest), if it is still there."""
    try:
        manifest = json.loads((run / "manifest.json").read_text())
        folder = Path(manifest["stages"]["cache"]["artifacts"]["cache"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return folder if (folder / "key.json").is_file() else None


def _run_teacher_files(run: Path) -> tuple[Path, ...]:
    """The output files of a text run's several teachers (``teachers``: its ensemble's members), if any."""
    try:
        record = json.loads((run / "manifest.json").read_text())["stages"]["teacher"]
        return tuple(Path(record["artifacts"][f"outputs:{m['name']}"]) for m in record.get("members", []))
    except (OSError, KeyError, TypeError, ValueError):
        return ()


def _feature_width(teacher: Any) -> int | None:
    """The teacher's feature width when its cache holds features (a trained teacher's), else None."""
    if teacher is None or not getattr(teacher, "arrays", None):
        return None
    arrays = next(iter(teacher.arrays.values()))
    return int(arrays["features"].shape[1]) if "features" in arrays else None


# -- the run -------------------------------------------------------------------------------------------

class MultimodalRun:
    """One multimodal run: see the module doc. ``log`` receives progress lines."""

    def __init__(self, cfg: MultimodalConfig, log: Callable[[str], None] = print, progress: bool = True) -> None:
        from erc_distill.config import build_config, load_config_file

        self.cfg = cfg
        self.log = log
        self.progress = progress
        run = Path(cfg.text_run)
        for need in ("config.yaml", "student/model/erc_model.json"):
            if not (run / need).is_file():
                raise ConfigError(f"{run} is not a finished text run (no {need}); run `erc-distill --config ...` "
                                  "first, or point --text-run at its --out folder", field="--text-run")
        self.text_cfg = build_config(load_config_file(run / "config.yaml"))
        self.corpus = self.text_cfg.data
        self.data_dir = cfg.data_dir or self.text_cfg.data_dir
        members = _run_teacher_files(run) if self.text_cfg.teachers and self.text_cfg.uses_teacher else ()
        self.teacher_files = tuple(Path(p) for p in (cfg.teacher_outputs or self.text_cfg.teacher_outputs or members))
        self.run_cache = None if self.teacher_files else _run_teacher_cache(run)
        for f in self.teacher_files:
            if not Path(f).is_file():
                raise ConfigError(f"teacher outputs {f} not found", field="--teacher-outputs")
        if cfg.media_dir is None and cfg.frames_dir is None:
            raise ConfigError("no media: give --media-dir (speech / video clips) and / or --frames-dir",
                              field="--media-dir")
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._labels: tuple[str, ...] | None = None
        self._targets = None
        self._text: tuple[Any, Any] | None = None

    # ---- data ----
    @property
    def labels(self) -> tuple[str, ...]:
        if self._labels is None:
            from erc_distill.data.corpora import load_corpus

            self._labels = load_corpus(self.corpus, "train", self.data_dir).labels
        return self._labels

    def turns(self, split: str) -> list[Any]:
        from erc_distill.data.corpora import load_corpus

        return [t for d in load_corpus(self.corpus, split, self.data_dir).dialogues for t in d.turns]

    def teacher_targets(self) -> Any:
        """The text teacher's targets as a teacher cache: the output files' logits for every turn, or the text
        run's own cache (logits + features of train and dev turns); None when there is no teacher."""
        if not self.teacher_files:
            if self.run_cache is None:
                return None
            from erc_distill.distill.cache import TeacherCache

            return TeacherCache(self.run_cache)
        if self._targets is None:
            from erc_distill.fusion.data import output_targets

            ids = {s: [t.example_id for t in self.turns(s)] for s in SPLITS}
            self._targets = output_targets(self.teacher_files, ids, self.out / "teacher-cache")
        return self._targets

    # ---- step 1 / 2: the non-verbal students ----
    def branch_key(self, kind: str) -> dict[str, Any]:
        c = self.cfg
        name = c.audio_student if kind == "audio" else c.visual_student
        train = c.audio_train if kind == "audio" else c.visual_train
        media = c.media_dir if kind == "audio" else (c.frames_dir or c.media_dir)
        return {"student": name, "train": asdict(train), "media": str(media), "corpus": self.corpus,
                "teacher": self.teacher_id(), "face_detector": c.face_detector}

    def teacher_id(self) -> list[str]:
        return [str(p) for p in self.teacher_files] or ([str(self.run_cache)] if self.run_cache else [])

    def new_branch(self, kind: str) -> Any:
        if kind == "audio":
            from erc_distill.audio.model import load_audio_classifier

            return load_audio_classifier(self.cfg.audio_student, self.labels)
        from erc_distill.visual.model import load_visual_classifier

        return load_visual_classifier(self.cfg.visual_student, self.labels)

    def branch_data(self, kind: str, model: Any, teacher: Any, batch_size: int, seed: int) -> Any:
        if kind == "audio":
            from erc_distill.audio.data import ClipDataModule

            return ClipDataModule(self.corpus, model.prepare, model.input_kind, self.data_dir, self.cfg.media_dir,
                                  self.text_cfg.media.max_seconds, batch_size=batch_size, eval_batch_size=16,
                                  seed=seed, teacher=teacher, log=self.log, progress=self.progress)
        from erc_distill.fusion.data import FrameDataModule
        from erc_distill.media.frames import FaceCropper

        detector = self.cfg.face_detector if model.preprocessing.get("face") else "none"
        return FrameDataModule(self.corpus, model, self.data_dir, self.cfg.frames_dir or self.cfg.media_dir,
                               FaceCropper(detector=detector), batch_size=batch_size, eval_batch_size=16, seed=seed,
                               teacher=teacher, log=self.log, progress=self.progress)

    def branch(self, kind: str) -> tuple[Any, Any, dict[str, Any]]:
        """The trained (or loaded) student of ``kind``, its data module and what happened."""
        import torch

        from erc_distill.atomic import atomic_dir
        from erc_distill.config import LossConfig
        from erc_distill.distill.objective import build_objective
        from erc_distill.distill.train import train_model

        folder = self.out / kind
        key = self.branch_key(kind)
        train_cfg = self.cfg.audio_train if kind == "audio" else self.cfg.visual_train
        loader = self._load_branch if _done(folder, key) else None
        teacher = self.teacher_targets()
        if loader is not None:
            model = loader(kind)
            info = json.loads((folder / "info.json").read_text())
            return model, self.branch_data(kind, model, teacher, train_cfg.batch_size, train_cfg.seed), info
        torch.manual_seed(train_cfg.seed)
        model = self.new_branch(kind)
        dm = self.branch_data(kind, model, teacher, train_cfg.batch_size, train_cfg.seed)
        n_train, n_dev = len(dm.examples_of("train")), len(dm.examples_of("dev"))
        info: dict[str, Any] = {"student": key["student"], "train_turns": n_train, "dev_turns": n_dev,
                                "test_turns": len(dm.examples_of("test")),
                                "media": {s: vars(r) if not hasattr(r, "as_dict") else r.as_dict()
                                          for s, r in dm.reports.items()}}
        weights = dict(train_cfg.loss) if teacher is not None else {"ce": 1.0}
        teacher_dim = _feature_width(teacher)
        if teacher_dim is not None and train_cfg.feature > 0:
            weights["feature"] = train_cfg.feature
        if n_train < train_cfg.min_train_turns or n_dev == 0:
            info["trained"] = False
            info["why"] = (f"{n_train} train / {n_dev} dev turns with {kind}: too few to learn from "
                           f"(min {train_cfg.min_train_turns} train, 1 dev); its pretrained features are used as they are")
            self.log(f"{kind} student {key['student']}: {info['why']}")
        else:
            objective = build_objective(LossConfig(weights=weights, tau=train_cfg.tau), len(self.labels),
                                        model.hidden_size, teacher_dim)
            self.log(f"{kind} student {key['student']}: {n_train} train / {n_dev} dev turns; {objective}")
            result = train_model(model, objective, dm, _train_config(train_cfg), folder / "train", self.progress)
            info.update(trained=True, loss=weights, train=asdict(result))
        with atomic_dir(folder / "model") as tmp:
            model.save(tmp)
        (folder / "info.json").write_text(json.dumps(info, indent=2, default=str))
        _mark(folder, key)
        return model.eval(), dm, info

    def _load_branch(self, kind: str) -> Any:
        if kind == "audio":
            from erc_distill.audio.model import AudioClassifier

            return AudioClassifier.load(self.out / kind / "model").eval()
        from erc_distill.visual.model import VisualClassifier

        return VisualClassifier.load(self.out / kind / "model").eval()

    # ---- step 3: features ----
    def text_student(self) -> tuple[Any, Any]:
        """The text run's student and its tokenizer (loaded once)."""
        if self._text is None:
            from transformers import AutoTokenizer

            from erc_distill.modeling import PromptedClassifier

            folder = Path(self.cfg.text_run) / "student" / "model"
            self._text = PromptedClassifier.load(folder).eval(), AutoTokenizer.from_pretrained(folder / "tokenizer")
        return self._text

    def features(self, branches: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
        """Each split's :class:`~erc_distill.fusion.train.BranchFeatures` (computed once, then read back)."""
        from erc_distill.data.context import ContextBuilder
        from erc_distill.data.datamodule import ErcDataModule
        from erc_distill.distill.module import predict
        from erc_distill.fusion.train import BranchFeatures

        folder = self.out / "features"
        key = {"text_run": str(self.cfg.text_run), "branches": {k: self.branch_key(k) for k in branches},
               "teacher": self.teacher_id()}
        if _done(folder, key):
            return {s: BranchFeatures.load(folder / f"{s}.npz") for s in SPLITS}
        folder.mkdir(parents=True, exist_ok=True)
        text_model, tok = self.text_student()
        dm = ErcDataModule(self.corpus, ContextBuilder(tok, self.text_cfg.student_context), self.data_dir,
                           eval_batch_size=64)
        teacher = self.teacher_targets()
        out = {}
        for split in SPLITS:
            t0 = time.perf_counter()
            ids, z_text, f_text, _ = predict(text_model, dm.eval_dataloader(split))
            row = {e: i for i, e in enumerate(ids)}
            labels = np.full(len(ids), -1, dtype=np.int64)
            for e in dm.examples_of(split):
                labels[row[e.example_id]] = e.label
            C = len(self.labels)
            parts: dict[str, Any] = {}
            for kind in ("audio", "visual"):
                width = branches[kind][0].hidden_size if kind in branches else 1
                feats = np.zeros((len(ids), width), np.float32)
                logits = np.zeros((len(ids), C), np.float32)
                mask = np.zeros(len(ids), bool)
                if kind in branches and len(branches[kind][1].examples_of(split)):  # a split may have none
                    model, bdm = branches[kind]
                    b_ids, b_z, b_f, _ = predict(model, bdm.eval_dataloader(split))
                    rows = [row[i] for i in b_ids]
                    feats[rows], logits[rows], mask[rows] = b_f.numpy(), b_z.numpy(), True
                parts[kind] = (feats, logits, mask)
            known = teacher is not None and all(i in teacher for i in ids)  # a run's own cache has no test rows
            t_logits = teacher.lookup(list(ids))["logits"].numpy() if known else None
            data = BranchFeatures(tuple(ids), labels, f_text.numpy(), parts["audio"][0], parts["visual"][0],
                                  parts["audio"][2], parts["visual"][2], z_text.numpy(), parts["audio"][1],
                                  parts["visual"][1], t_logits)
            data.save(folder / f"{split}.npz")
            out[split] = data
            self.log(f"features {split}: {len(ids)} turns, audio {int(data.audio_mask.sum())}, visual "
                     f"{int(data.visual_mask.sum())} ({time.perf_counter() - t0:.0f} s)")
        _mark(folder, key)
        return out

    # ---- step 4: fusion heads ----
    def fusion(self, feats: dict[str, Any]) -> dict[str, Any]:
        """Train every head and seed; score each (and each branch alone) on dev / test."""
        import torch

        from erc_distill.fusion.train import FusionTrainConfig, fusion_logits, train_fusion

        c = self.cfg
        media = {s: feats[s].select(feats[s].with_media()) for s in SPLITS}
        if len(media["train"]) == 0 or len(media["dev"]) == 0:
            raise ConfigError(f"no train or dev turn has media (train {len(media['train'])}, dev {len(media['dev'])}): "
                              "a fusion head has nothing to learn from; check --media-dir / --frames-dir",
                              field="--media-dir")
        names = self.labels
        rows: dict[str, Any] = {}

        def score(name: str, logits: dict[str, dict[str, np.ndarray]]) -> None:
            rows[name] = {f"{where}_{s}": _weighted_f1(logits[where][s], (media if where == "media" else feats)[s].labels,
                                                        names)
                          for where in ("media", "all") for s in ("dev", "test")}

        score("text student", {w: {s: d[s].text_logits for s in ("dev", "test")} for w, d in
                               (("media", media), ("all", feats))})
        if feats["dev"].teacher_logits is not None and feats["test"].teacher_logits is not None:
            score("text teacher", {w: {s: d[s].teacher_logits for s in ("dev", "test")} for w, d in
                                   (("media", media), ("all", feats))})
        for kind in ("audio", "visual"):
            mask = f"{kind}_mask"
            if getattr(media["dev"], mask).any():
                rows[f"{kind} student alone"] = {
                    f"media_{s}": _weighted_f1(getattr(media[s], f"{kind}_logits")[getattr(media[s], mask)],
                                               media[s].labels[getattr(media[s], mask)], names)
                    for s in ("dev", "test")}
        folder = self.out / "fusion"
        folder.mkdir(parents=True, exist_ok=True)
        heads = {}
        for name in c.fusion:
            per_seed = []
            for seed in c.seeds:
                cfg = FusionTrainConfig(epochs=c.fusion_epochs, modality_dropout=c.modality_dropout, seed=seed,
                                        kd=1.0 if feats["train"].teacher_logits is not None else 0.0)
                path = folder / f"{name}-s{seed}.pt"
                key = {"cfg": asdict(cfg), "features": json.loads((self.out / "features" / "done.json").read_text())}
                if path.is_file() and _done(folder / f"{name}-s{seed}", key):
                    from erc_distill.fusion.heads import build_fusion_head

                    head = build_fusion_head(name, media["train"].text.shape[1], media["train"].audio.shape[1],
                                             media["train"].visual.shape[1], len(names))
                    head.load_state_dict(torch.load(path, weights_only=True))
                    head.eval()
                else:
                    head, _ = train_fusion(name, media["train"], media["dev"], len(names), cfg, progress=False)
                    torch.save(head.state_dict(), path)
                    _mark(folder / f"{name}-s{seed}", key)
                per_seed.append(head)
                logits = {w: {s: fusion_logits(head, d[s]) for s in ("dev", "test")} for w, d in
                          (("media", media), ("all", feats))}
                score(f"fused {name} s{seed}", logits)
                text_only = {w: {s: fusion_logits(head, d[s], audio=False, visual=False) for s in ("dev", "test")}
                             for w, d in (("media", media), ("all", feats))}
                score(f"fused {name} s{seed}, media hidden", text_only)
            heads[name] = per_seed[0]
        return {"scores": rows, "heads": heads, "media_counts": {s: {"turns": len(feats[s]), "with_media": len(media[s]),
                                                                      "audio": int(feats[s].audio_mask.sum()),
                                                                      "visual": int(feats[s].visual_mask.sum())}
                                                                  for s in SPLITS}}

    # ---- everything ----
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        branches: dict[str, tuple[Any, Any]] = {}
        infos = {}
        for kind, name, media in (("audio", self.cfg.audio_student, self.cfg.media_dir),
                                  ("visual", self.cfg.visual_student, self.cfg.frames_dir or self.cfg.media_dir)):
            if name and media is not None:
                model, dm, info = self.branch(kind)
                branches[kind] = (model, dm)
                infos[kind] = info
        feats = self.features(branches)
        fused = self.fusion(feats)
        from erc_distill.fusion.edge import export_fused, profile_fused

        head_name = self.cfg.fusion[0]
        text_model, tok = self.text_student()
        edge = export_fused(self.out / "edge", text_model, tok, self.text_cfg.student_context,
                            branches.get("audio", (None,))[0], branches.get("visual", (None,))[0],
                            fused["heads"][head_name], self.turns("test"), self.cfg.media_dir,
                            self.cfg.frames_dir or self.cfg.media_dir, self.labels, log=self.log)
        latency = profile_fused(self.out / "edge", self.turns("test"), self.cfg.media_dir,
                                self.cfg.frames_dir or self.cfg.media_dir, self.cfg.profile_turns, self.cfg.threads,
                                self.cfg.face_detector, log=self.log)
        metrics = {"corpus": self.corpus, "text_run": str(self.cfg.text_run), "teacher_outputs": self.teacher_id(),
                   "branches": infos, "counts": fused["media_counts"],
                   "scores": fused["scores"], "edge": edge, "latency": latency,
                   "wall_s": round(time.perf_counter() - t0, 1)}
        from erc_distill.atomic import write_text
        from erc_distill.machine import machine_info

        metrics["machine"] = machine_info()
        metrics["media"] = {"speech": describe_media(self.cfg.media_dir),
                            "frames": describe_media(self.cfg.frames_dir or self.cfg.media_dir)}
        write_text(self.out / "metrics.json", json.dumps(metrics, indent=2, default=str))
        write_text(self.out / "report.md", render_report(metrics))
        self.log(render_report(metrics))
        return metrics


def render_report(m: dict[str, Any]) -> str:
    """metrics.json as Markdown: counts, the accuracy table, the latency table."""
    lines = [f"# Multimodal run on {m['corpus']}", "",
             f"text run `{m['text_run']}`; text teacher: {', '.join(m['teacher_outputs']) or 'none'}", ""]
    speech = (m.get("media") or {}).get("speech") or {}
    if speech.get("synthetic"):
        lines += [f"**Speech is synthetic** ({speech.get('voice', 'TTS')}, dialogues {speech.get('slice')}): "
                  f"{speech.get('note', '')} Every row that uses audio is marked *(synthetic speech)*.", ""]
    lines += ["| split | turns | with media | audio | visual |", "|---|---:|---:|---:|---:|"]
    for s, c in m["counts"].items():
        lines.append(f"| {s} | {c['turns']} | {c['with_media']} | {c['audio']} | {c['visual']} |")
    for kind, info in m["branches"].items():
        lines += ["", f"{kind} student `{info['student']}`: {info['train_turns']} train / {info['dev_turns']} dev / "
                  f"{info['test_turns']} test turns; " + ("trained with " + ", ".join(
                      f"{k}={v:g}" for k, v in info["loss"].items()) if info.get("trained") else info.get("why", ""))]
    cols = ("media_dev", "media_test", "all_dev", "all_test")
    lines += ["", "Weighted F1 (%): *media* = turns with audio or video; *all* = every turn of the split "
              "(the rest answered from text alone, media masked). Fusion heads: mean ± std over seeds "
              f"({', '.join(str(s) for s in _seeds(m['scores'])) or '-'}); Δ = fused − text student on the same "
              "turns (per seed, then mean ± std).", "",
              "| model | media dev | media test | all dev | all test | Δ media test | Δ all test |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, cells in summarise_scores(m["scores"]).items():
        if speech.get("synthetic") and (name.startswith("fused") and "hidden" not in name or name.startswith("audio")):
            name += " *(synthetic speech)*"
        lines.append(f"| {name} | " + " | ".join(cells.get(c, "") for c in (*cols, "d_media_test", "d_all_test")) + " |")
    e = m.get("edge") or {}
    if e:
        lines += ["", f"Edge graphs: end-to-end parity (ONNX Runtime vs PyTorch, fused logits) max |Δ| "
                  f"{e.get('parity_max_abs', float('nan')):.2e} on {e.get('parity_turns', 0)} test turns."]
    lat = m.get("latency") or {}
    if lat.get("paths"):
        lines += ["", f"Per-turn latency on this machine ({lat.get('cpu', '')}, {lat.get('threads')} threads; "
                  f"{lat.get('turns')} test turns, batch 1):", "", "| path | p50 ms | p99 ms |", "|---|---:|---:|"]
        for name, p in lat["paths"].items():
            lines.append(f"| {name} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} |")
        if lat.get("parts_p50_ms"):
            lines += ["", "Where the time goes (p50 ms a turn, the fullest path): " + ", ".join(
                f"{k} {v:.1f}" for k, v in lat["parts_p50_ms"].items()) + "."]
    lines += ["", f"wall {m.get('wall_s', 0):.0f} s", ""]
    return "\n".join(lines)


def _seeds(scores: dict[str, Any]) -> list[int]:
    import re

    return sorted({int(m.group(1)) for k in scores for m in [re.search(r" s(\d+)(,|$)", k)] if m})


def summarise_scores(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, str]]:
    """Rows for the report: single models as they are; ``fused HEAD sN[, media hidden]`` rows grouped per
    head over seeds as ``mean ± std``, with the paired difference to the text student (per seed)."""
    import re

    groups: dict[str, list[dict[str, float]]] = {}
    for name, row in scores.items():
        m = re.fullmatch(r"(fused \S+) s\d+(, media hidden)?", name)
        groups.setdefault(m.group(1) + (m.group(2) or "") if m else name, []).append(row)
    text = scores.get("text student", {})
    out: dict[str, dict[str, str]] = {}
    for name, rows in groups.items():
        cells: dict[str, str] = {}
        for col in ("media_dev", "media_test", "all_dev", "all_test"):
            vals = np.array([r[col] for r in rows if r.get(col) is not None and not np.isnan(r[col])])
            if len(vals):
                cells[col] = f"{vals.mean():.2f}" + (f" ± {vals.std(ddof=1):.2f}" if len(vals) > 1 else "")
            if col.endswith("test") and name.startswith("fused") and text.get(col) is not None and len(vals):
                d = vals - text[col]
                cells[f"d_{col}"] = f"{d.mean():+.2f}" + (f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else "")
        out[name + (f" ({len(rows)} seeds)" if name.startswith("fused") and len(rows) > 1 else "")] = cells
    return out
