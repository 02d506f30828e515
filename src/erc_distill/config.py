"""Run configuration: typed dataclasses, the one source of command-line flags and experiment-file keys.

Every leaf field of :class:`RunConfig` has a dotted path (``student_train.optim.lr``), which is

- its command-line flag, with dashes: ``--student-train.optim.lr 3e-5``;
- its experiment-file key, dotted or nested (``student_train: {optim: {lr: 3.0e-5}}``).

A section also takes a *shorthand* value: a context section takes a preset name (``--context telme``,
``teacher_context: spcl``), a loss section its terms (``--loss ce=1,dist=1``), ``profile`` a device
profile. :data:`ALIASES` keeps the short flags of the common settings (``--epochs``, ``--lr``,
``--tau``, ``--batch-size`` …); an alias may set several fields (``--batch-size``: teacher and
student). Precedence: defaults < experiment file < command line; within one source a preset comes
first, then aliases, then dotted fields (the most specific wins).

Values are coerced from their annotation and validated where they are set — ranges and finite
numbers from each field's metadata, known names, whole-config checks — so a bad value is one
:class:`~erc_distill.errors.ConfigError` naming the flag or file key, before anything trains.
This module imports no torch: the robot-side commands read it too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from erc_distill.data.context import CONTEXT_PRESETS, ContextConfig
from erc_distill.errors import ConfigError, DataError

#: The pipeline's stages, in order.
STAGES = ("teacher", "cache", "distill", "evaluate", "export", "quantize", "profile", "report")

QUANTIZE_METHODS = ("ort-dynamic", "ort-static", "nncf-ptq", "nncf-qat")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("auto", "32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
TRANSFER_SOURCES = ("emorynlp", "mask", "short")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        choices: tuple[Any, ...] | None = None, check: Callable[[Any], str | None] | None = None) -> Any:
    """A config field with its help text and constraints (read by :func:`validate_value`)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _check_devices(value: Any) -> str | None:
    if isinstance(value, int):
        return None if value >= 1 or value == -1 else "must be >= 1, -1 (all) or 'auto'"
    indices = [p.strip() for p in str(value).split(",")]
    if value == "auto" or (indices and all(p.isdigit() for p in indices)):
        return None
    return f"must be a count (1), -1, 'auto' or a list of device indices ('0,1'), got {value!r}"


def _check_max_steps(value: int) -> str | None:
    return None if value == -1 or value >= 1 else "must be -1 (no limit) or >= 1"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then linear decay, per-layer learning rates.

    Layer-wise LR decay (LLRD): layer l of L (embeddings = 0) gets ``lr · layer_decay^(L − l)``;
    the head and the loss projections get ``head_lr``.
    """

    lr: float = opt(3e-5, "peak learning rate of the top encoder layer", gt=0, le=1)
    head_lr: float = opt(1e-4, "learning rate of the classifier head and loss projections", gt=0, le=1)
    weight_decay: float = opt(0.01, "AdamW weight decay", ge=0, le=1)
    warmup_ratio: float = opt(0.1, "fraction of steps of linear warm-up", ge=0, le=1)
    layer_decay: float = opt(1.0, "layer-wise LR decay: layer l gets lr * decay^(L - l)", gt=0, le=1)


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. ``devices``/``strategy``/``precision``/``accelerator`` go to ``lightning.Trainer``
    (e.g. ``--devices 4 --strategy ddp`` on a GPU node); ``precision: auto`` is resolved at start-up
    (bf16-mixed only where the hardware has native bf16)."""

    epochs: int = opt(3, "training epochs (early stopping on dev weighted F1 may end sooner)", ge=1, le=10_000)
    batch_size: int = opt(16, "training batch size", ge=1, le=65_536)
    eval_batch_size: int = opt(64, "batch size of dev/test/cache passes", ge=1, le=65_536)
    accumulate: int = opt(1, "gradient accumulation steps", ge=1, le=4096)
    optim: OptimConfig = opt(factory=OptimConfig)
    freeze_layers: int = opt(0, "freeze the embeddings and this many lowest encoder layers", ge=0)
    keep_layers: int | None = opt(None, "keep only the encoder's lowest N layers, dropping the rest before training "
                                        "(a shallower, faster model, as DistilHuBERT; default: all)", ge=1)
    patience: int = opt(2, "early stopping: dev evaluations without improvement", ge=1)
    seed: int = opt(0, "random seed (head init, shuffling, dropout)", ge=0, lt=2**32)
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: no limit)", check=_check_max_steps)
    val_check_interval: float = opt(1.0, "dev evaluations per epoch: every this fraction of an epoch", gt=0, le=1)
    checkpoint_every_n_steps: int = opt(100, "save last.ckpt every N optimizer steps (resume point)", ge=1)
    accelerator: str = opt("cpu", "lightning accelerator", choices=ACCELERATORS)
    devices: int | str = opt(1, "lightning devices: a count, -1, 'auto' or indices '0,1'", check=_check_devices)
    strategy: str = opt("auto", "lightning strategy (ddp, fsdp, ...)")
    precision: str = opt("auto", "auto: bf16-mixed on native-bf16 hardware, else 32-true", choices=PRECISIONS)


def _check_loss_weights(weights: dict[str, float]) -> str | None:
    from erc_distill.distill.losses import LOSSES  # the registry (plug-ins included); training needs torch anyway

    unknown = [n for n in weights if n not in LOSSES]
    if unknown:
        return f"unknown loss {unknown[0]!r}; known: {', '.join(LOSSES)}"
    bad = [f"{n}={w}" for n, w in weights.items() if not (math.isfinite(w) and w >= 0)]
    if bad:
        return f"weights must be finite and >= 0, got {', '.join(bad)}"
    if not any(w > 0 for w in weights.values()):
        return "at least one term needs a weight > 0"
    return None


def parse_loss_spec(spec: str) -> dict[str, float]:
    """``'ce=1,dist=1,feature=0.5'`` -> ``{'ce': 1.0, 'dist': 1.0, 'feature': 0.5}`` (a bare name weighs 1)."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value) if value.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight of {name.strip()!r} must be a number, got {value!r}") from None
    if not weights:
        raise ValueError("empty loss spec; e.g. ce=1,dist=1")
    return weights


#: Hyper-parameters each built-in term reads (the stage keys hash only those of the terms in use).
TERM_FIELDS = {
    "ce": ("focal_gamma", "class_weight_power", "label_smoothing"),
    "kd": ("tau",),
    "dist": ("tau",),
    "feature": ("feature_tau",),
    "hidden": ("hidden_layers",),
    "supcon": ("contrastive_tau",),
    "spcl": ("contrastive_tau", "spcl_queue", "spcl_k", "spcl_curriculum"),
}


@dataclass(frozen=True)
class LossConfig:
    """Which terms, their weights and their hyper-parameters (formulas in ``distill/losses.py``)."""

    weights: dict[str, float] = opt(factory=lambda: {"ce": 1.0}, help="terms and weights: ce=1,dist=1,feature=0.5",
                                    check=_check_loss_weights)
    tau: float = opt(4.0, "temperature of kd / dist (TelME: 4 on MELD)", gt=0, le=100)
    feature_tau: float = opt(1.0, "temperature of the feature term", gt=0, le=100)
    focal_gamma: float = opt(0.0, "focal-loss gamma of ce (0: plain ce)", ge=0, le=10)
    class_weight_power: float = opt(0.0, "ce class weights (N / C n_c)^p; 0 unweighted, 1 balanced", ge=0, le=2)
    label_smoothing: float = opt(0.0, "ce label smoothing", ge=0, lt=1)
    contrastive_tau: float = opt(0.1, "temperature of supcon / spcl", gt=0, le=100)
    spcl_queue: int = opt(64, "spcl: per-class queue length", ge=1)
    spcl_k: int = opt(8, "spcl: samples per prototype", ge=1)
    spcl_curriculum: bool = opt(False, "spcl: SPCL's easy-to-hard curriculum")
    hidden_layers: int = opt(2, "hidden: the last n student layers matched to the cached teacher layers", ge=1)

    @property
    def needs_teacher(self) -> bool:
        from erc_distill.distill.losses import LOSSES

        return any(LOSSES[name].needs_teacher for name in self.weights)

    @property
    def feature_terms(self) -> list[str]:
        """The feature-level terms (``feature``, ``hidden``): they need a teacher model's features, not only its
        logits."""
        return [n for n in self.weights if n in ("feature", "hidden")]

    def key(self) -> dict[str, object]:
        """The weights and only the hyper-parameters of the terms in use (for stage keys: tuning a
        term that is not used, or adding a new one, leaves a cached teacher valid)."""
        used: dict[str, object] = {"weights": dict(sorted(self.weights.items()))}
        for name in self.weights:
            for f in TERM_FIELDS.get(name, ()):
                used[f] = getattr(self, f)
        return used


@dataclass(frozen=True)
class QuantizeConfig:
    """INT8 methods and the checks every INT8 graph must pass on dev."""

    methods: tuple[str, ...] = opt(QUANTIZE_METHODS, "INT8 methods", choices=QUANTIZE_METHODS)
    budget: float | None = opt(None, "allowed dev weighted-F1 drop in points (default 1.0; quick runs: report only; "
                               "negative: INT8 must beat float by that much)", ge=-100, le=100)
    min_agreement: float | None = opt(None, "a QAT graph's agreement with its PyTorch model (default 0.99)", ge=0, le=1)
    calibration_turns: int = opt(256, "training turns used to calibrate static INT8", ge=1)
    qat_epochs: int = opt(1, "nncf-qat fine-tuning epochs", ge=1, le=100)


def _check_profile(value: str) -> str | None:
    from erc_distill.profiles.spec import load_profile

    try:
        load_profile(value)
    except (DataError, ValueError) as err:
        return str(err)
    return None


@dataclass(frozen=True)
class ProfileConfig:
    """Where the profile stage times the variants."""

    device: str = opt("cpu-2core", "device profile: shipped name or YAML path", check=_check_profile)
    turns: int | None = opt(None, "timed turns per variant (default: the whole test split; quick runs 300)", ge=1)
    warmup: int = opt(20, "untimed turns first", ge=0)


def parse_teacher_spec(spec: str) -> dict[str, str]:
    """One ``--teachers`` entry as settings: ``mpnet-base`` (an encoder) or ``name=a;teacher=mpnet-base;
    teacher_context=telme;teacher_train.seed=1`` (``;``-separated; a leading bare word is the encoder; a later
    key repeats override earlier ones). ValueError says what is malformed."""
    out: dict[str, str] = {}
    for i, part in enumerate(p.strip() for p in spec.split(";")):
        if not part:
            continue
        if "=" not in part:
            if i == 0:
                out["teacher"] = part
                continue
            raise ValueError(f"{part!r} in teacher {spec!r}: expected key=value after the first item")
        key, value = (x.strip() for x in part.split("=", 1))
        if not key or not value:
            raise ValueError(f"{part!r} in teacher {spec!r}: expected key=value")
        out[key.replace("-", "_")] = value
    if not out:
        raise ValueError("an empty teacher entry")
    return out


def teacher_spec_string(value: Any) -> str:
    """An experiment file's ``teachers:`` item (an encoder name, or a mapping of teacher-side settings, nested
    sections allowed) as the one-line form of :func:`parse_teacher_spec`."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"a teacher entry is an encoder name or a mapping of teacher settings, not {value!r}")
    value = {k: v for k, v in value.items() if not (k == "name" and v is None)}

    def items(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
        for k, v in mapping.items():
            name = f"{prefix}{k}".replace("-", "_")
            if isinstance(v, Mapping) and name in SECTIONS:
                yield from items(v, name + ".")
            elif isinstance(v, Mapping):  # loss weights
                yield name, ",".join(f"{a}={b}" for a, b in v.items())
            else:
                yield name, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    pairs = list(items(value))
    bad = [f"{k}={v}" for k, v in pairs if ";" in k + v]
    if bad:
        raise ValueError(f"';' inside a teacher setting: {bad[0]}")
    return ";".join(f"{k}={v}" for k, v in pairs)


def _check_specs(value: tuple[str, ...]) -> str | None:
    try:
        for spec in value:
            parse_teacher_spec(spec)
    except ValueError as err:
        return str(err)
    return None


_NOT_PER_TEACHER = ("teacher_outputs", "teacher_weights", "teachers")


def teacher_configs(cfg: "RunConfig") -> list[tuple[str, "RunConfig"]]:
    """(name, config) of each of ``cfg.teachers``: the run's config with that entry's teacher-side settings on
    top (its encoder, context, recipe, seed), one teacher each. ConfigError names the entry and the key."""
    base = replace(cfg, teachers=(), teacher_outputs=(), teacher_weights=())
    out: list[tuple[str, RunConfig]] = []
    for i, spec in enumerate(cfg.teachers, 1):
        where = f"--teachers entry {i} ({spec})"
        try:
            items = parse_teacher_spec(spec)
        except ValueError as err:
            raise ConfigError(str(err), field="--teachers") from None
        name = items.pop("name", None)
        settings = [Setting(k, v, where, k) for k, v in items.items()]
        for s in settings:
            targets = [t for _, t, _ in expand(s)]
            if not all(t.startswith("teacher") and t.split(".")[0] not in _NOT_PER_TEACHER for t in targets):
                raise ConfigError("not a teacher-side setting (an entry sets teacher, teacher_context, teacher_train, "
                                  "teacher_loss and their aliases: teacher_epochs, teacher_lr, teacher_max_len, ...)",
                                  field=s.label, source=where)
        if str(items.get("teacher", cfg.teacher)).lower() in ("none", "null"):
            raise ConfigError("names no teacher encoder (teacher=NAME)", field="--teachers", source=where)
        try:
            sub = build_config(settings, base)
        except ConfigError as err:  # a whole-config check: say which entry it came from
            if err.source == where:
                raise
            raise ConfigError(err.message, field=err.field, source=where) from None
        name = name or f"{Path(str(sub.teacher)).name}-{i}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ConfigError(f"teacher name {name!r}: letters, digits, '.', '_' and '-' only (set one with "
                              "name=...)", field="--teachers", source=where)
        if name in (n for n, _ in out):
            raise ConfigError(f"two teachers are named {name!r} (give each a name=...)", field="--teachers",
                              source=where)
        out.append((name, sub))
    return out


def _check_corpus(value: str) -> str | None:
    from erc_distill.data.corpora import CORPORA

    if value not in CORPORA:
        return f"unknown corpus {value!r}; known: {', '.join(sorted(CORPORA))}"
    return None


def corpus_modality(corpus: str) -> str:
    """``audio`` for a corpus of clips (RAVDESS: the models are speech encoders), else ``text``."""
    from erc_distill.data.corpora import CORPORA

    return "audio" if getattr(CORPORA.get(corpus), "layout", "csv") == "clips" else "text"


@dataclass(frozen=True)
class MediaConfig:
    """Where turns' clips are and how they are read (audio runs)."""

    dir: str | None = opt(None, "folder of the corpus's media files (MELD's dia{D}_utt{U}.mp4 split folders, "
                          "IEMOCAP wavs; RAVDESS: another copy of its Actor_NN folders)")
    max_seconds: float = opt(12.0, "longest clip read, in seconds: longer ones are cut and counted", gt=0, le=30)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Stage keys hash the parts each stage reads."""

    teacher: str | None = opt("mpnet-base", "teacher encoder: preset, hub id, folder, or none")
    student: str = opt("minilm-l6", "student encoder: preset, hub id or folder")
    data: str = opt("meld", "corpus", check=_check_corpus)
    data_dir: str | None = opt(None, "folder holding the corpus folders (default: $ERC_DISTILL_DATA, else the cache)")
    teacher_context: ContextConfig = opt(factory=ContextConfig)
    student_context: ContextConfig = opt(factory=ContextConfig)
    teacher_train: TrainConfig = opt(factory=lambda: TrainConfig(epochs=3, optim=OptimConfig(lr=2e-5, layer_decay=0.9)))
    teacher_loss: LossConfig = opt(factory=LossConfig)
    student_train: TrainConfig = opt(factory=lambda: TrainConfig(epochs=3, optim=OptimConfig(lr=5e-5)))
    loss: LossConfig = opt(factory=lambda: LossConfig(weights={"ce": 1.0, "dist": 1.0, "feature": 0.5}))
    quantize: QuantizeConfig = opt(factory=QuantizeConfig)
    profile: ProfileConfig = opt(factory=ProfileConfig)
    limit: int | None = opt(None, "use only the first N dialogues of each split (--quick: 30)", ge=1)
    media: MediaConfig = opt(factory=MediaConfig)
    hidden_layers: tuple[int, ...] = opt((), "teacher layers cached at the mask (hidden loss; default: the top n)", ge=0)
    teacher_outputs: tuple[str, ...] = opt((), "teacher output files (.npz from `erc-distill teacher-outputs`, or "
                                           "bench/results/teachers/): their mean tempered probabilities are the KD "
                                           "target and no teacher is trained (logit terms only)")
    teacher_weights: tuple[float, ...] = opt((), "weights of the ensemble's members: the --teacher-outputs files or "
                                             "the --teachers (default: equal)", ge=0)
    teachers: tuple[str, ...] = opt((), "several teachers trained (or reused from the cache) in this run, their "
                                    "ensemble the KD target (feature terms: one projection per teacher): each an encoder, or "
                                    "'name=N;teacher=ENC;teacher_context=telme;teacher_train.seed=1' (teacher-side "
                                    "settings; an experiment file may give a list of mappings)", check=_check_specs)
    transfer: tuple[str, ...] = opt((), "unlabelled turns added to the student's training set, taught by the teacher "
                                    "only (no cross-entropy); MELD: emorynlp (scenes not overlapping MELD dev/test), "
                                    "mask (speaker names masked), short (shorter histories)", choices=TRANSFER_SOURCES)

    @property
    def uses_teacher(self) -> bool:
        return (self.teacher is not None or bool(self.teacher_outputs) or bool(self.teachers)) \
            and self.loss.needs_teacher

    @property
    def trains_teacher(self) -> bool:
        """One teacher model is trained (or reused) by this run: not when the KD target is an ensemble."""
        return self.uses_teacher and not self.ensemble and self.teacher is not None

    @property
    def ensemble(self) -> bool:
        """The KD target is an ensemble of teacher outputs: files given (``teacher_outputs``) or written by the
        teachers this run trains (``teachers``; these also give each teacher's features to the feature terms)."""
        return self.uses_teacher and bool(self.teacher_outputs or self.teachers)

    @property
    def modality(self) -> str:
        """``text`` or ``audio``: what the corpus holds, so what the teacher and student read."""
        return corpus_modality(self.data)


# --------------------------------------------------------------------------- shorthands and aliases

#: Section -> how a plain (non-mapping) value sets it.
def _context_shorthand(value: Any) -> ContextConfig:
    if not isinstance(value, str) or value not in CONTEXT_PRESETS:
        raise ValueError(f"unknown context preset {value!r}; presets: {', '.join(CONTEXT_PRESETS)}")
    return CONTEXT_PRESETS[value]


SHORTHANDS: dict[str, tuple[str, str]] = {
    # section: (how, what) -- "preset": the value names a whole section; otherwise the leaf it sets
    "teacher_context": ("preset", "context preset (spcl, telme, utterance, plain) of the teacher"),
    "student_context": ("preset", "context preset of the student"),
    "loss": ("weights", "student objective: name=weight,..."),
    "teacher_loss": ("weights", "teacher objective: name=weight,..."),
    "profile": ("device", "device profile for the profile stage: shipped name or YAML path"),
}

#: Short names kept from the first command line: alias -> the dotted fields it sets.
ALIASES: dict[str, tuple[str, ...]] = {
    "context": ("student_context",),
    "max_len": ("student_context.max_len",),
    "teacher_max_len": ("teacher_context.max_len",),
    "max_previous_turns": ("student_context.max_previous_turns",),
    "epochs": ("student_train.epochs",),
    "teacher_epochs": ("teacher_train.epochs",),
    "lr": ("student_train.optim.lr",),
    "teacher_lr": ("teacher_train.optim.lr",),
    "head_lr": ("student_train.optim.head_lr", "teacher_train.optim.head_lr"),
    "weight_decay": ("student_train.optim.weight_decay", "teacher_train.optim.weight_decay"),
    "layer_decay": ("student_train.optim.layer_decay",),
    "teacher_layer_decay": ("teacher_train.optim.layer_decay",),
    "freeze_teacher_layers": ("teacher_train.freeze_layers",),
    "student_layers": ("student_train.keep_layers",),
    "batch_size": ("student_train.batch_size", "teacher_train.batch_size"),
    "eval_batch_size": ("student_train.eval_batch_size", "teacher_train.eval_batch_size"),
    "accumulate": ("student_train.accumulate", "teacher_train.accumulate"),
    "patience": ("student_train.patience", "teacher_train.patience"),
    "val_check_interval": ("student_train.val_check_interval", "teacher_train.val_check_interval"),
    "checkpoint_every": ("student_train.checkpoint_every_n_steps", "teacher_train.checkpoint_every_n_steps"),
    "accelerator": ("student_train.accelerator", "teacher_train.accelerator"),
    "devices": ("student_train.devices", "teacher_train.devices"),
    "strategy": ("student_train.strategy", "teacher_train.strategy"),
    "precision": ("student_train.precision", "teacher_train.precision"),
    "seed": ("student_train.seed",),
    "tau": ("loss.tau",),
    "label_smoothing": ("loss.label_smoothing",),
    "focal_gamma": ("loss.focal_gamma",),
    "class_weight_power": ("loss.class_weight_power", "teacher_loss.class_weight_power"),
    "spcl_curriculum": ("loss.spcl_curriculum",),
    "quantize_methods": ("quantize.methods",),
    "method": ("quantize.methods",),
    "budget": ("quantize.budget",),
    "calibration_turns": ("quantize.calibration_turns",),
    "qat_epochs": ("quantize.qat_epochs",),
    "media_dir": ("media.dir",),
    "max_seconds": ("media.max_seconds",),
}


# --------------------------------------------------------------------------- the schema walk

@dataclass(frozen=True)
class Leaf:
    """One settable field: its dotted path, type and constraints."""

    path: str
    type: Any
    field: dataclasses.Field

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def flag(self) -> str:
        return "--" + self.path.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaves(cls: type = RunConfig, prefix: str = "") -> Iterator[Leaf]:
    """Every settable leaf field of ``cls``, depth first (nested dataclasses are walked)."""
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, path + ".")
        else:
            yield Leaf(path, tp, f)


def sections(cls: type = RunConfig, prefix: str = "") -> dict[str, type]:
    """Dotted path -> dataclass type of every nested section."""
    out: dict[str, type] = {}
    hints = _hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[prefix + f.name] = hints[f.name]
            out.update(sections(hints[f.name], prefix + f.name + "."))
    return out


LEAVES: dict[str, Leaf] = {leaf.path: leaf for leaf in leaves()}
SECTIONS: dict[str, type] = sections()


# --------------------------------------------------------------------------- coercion and validation

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def coerce(value: Any, tp: Any) -> Any:
    """``value`` (from YAML or a command-line string) as type ``tp``; ValueError says what was expected."""
    if _is_union(tp):
        options = _args(tp)
        if type(None) in options and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(value, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(" or ".join(errors))
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in _args(tp):
            raise ValueError(f"expected one of {', '.join(map(str, _args(tp)))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str) and value.strip():
            return value
        raise ValueError(f"expected a non-empty string, got {value!r}")
    if origin is tuple:
        item = _args(tp)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(coerce(v, item) for v in value)
    if origin is dict:  # loss weights: a mapping or a name=weight,... spec
        if isinstance(value, str):
            value = parse_loss_spec(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"expected name=weight,... (e.g. ce=1,dist=1), got {value!r}")
        return {str(k): coerce(v, float) for k, v in value.items()}
    raise TypeError(f"no coercion for {tp}")  # a schema bug, not user input


def validate_value(leaf: Leaf, value: Any) -> Any:
    """Coerce ``value`` to ``leaf``'s type and check its constraints; ValueError on failure."""
    value = coerce(value, leaf.type)
    m = leaf.field.metadata
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if v is None or isinstance(v, (bool, dict)):
            continue
        if m.get("choices") and v not in m["choices"]:
            raise ValueError(f"{v!r} is not one of {', '.join(map(str, m['choices']))}")
        if isinstance(v, (int, float)):
            for bound, ok, text in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                                    ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
                if m.get(bound) is not None and not ok(v, m[bound]):
                    raise ValueError(f"must be {text} {m[bound]:g}, got {v!r}")
    if m.get("check") and value is not None:
        problem = m["check"](value)
        if problem:
            raise ValueError(problem)
    return value


# --------------------------------------------------------------------------- building a RunConfig

@dataclass(frozen=True)
class Setting:
    """One value from one source: ``name`` is a dotted path, a section (shorthand) or an alias."""

    name: str
    value: Any
    source: str
    """The experiment file's path, or ``command line``."""
    label: str
    """How the user wrote it (``--max-len``, ``max_len``), for error messages."""


def expand(setting: Setting) -> list[tuple[int, str, Any]]:
    """(specificity, target, value): 0 a whole-section preset, 1 an alias, 2 a dotted field."""
    name = setting.name.replace("-", "_")
    if name in ALIASES:
        return [(1 if t in LEAVES else 0, t, setting.value) for t in ALIASES[name]]
    if name in LEAVES:
        return [(2, name, setting.value)]
    if name in SHORTHANDS:
        how = SHORTHANDS[name][0]
        return [(0 if how == "preset" else 1, name if how == "preset" else f"{name}.{how}", setting.value)]
    raise ConfigError(f"unknown option; options are the dotted fields of the run config (erc-distill --help)",
                      field=setting.label, source=setting.source)


def flatten_file(values: Mapping[str, Any], source: str, prefix: str = "") -> list[Setting]:
    """An experiment file's mapping as settings: nested sections become dotted names."""
    out = []
    for key, value in values.items():
        name = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, Mapping) and name in SECTIONS:
            out += flatten_file(value, source, name + ".")
        elif name == "teachers" and isinstance(value, (list, str)):  # encoders or mappings; one string is one entry
            try:
                items = [value] if isinstance(value, str) else value
                out.append(Setting(name, [teacher_spec_string(v) for v in items], source, name))
            except ValueError as err:
                raise ConfigError(str(err), field=name, source=source) from None
        else:
            out.append(Setting(name, value, source, name))
    return out


def _set_path(obj: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return replace(obj, **{path[0]: value})
    return replace(obj, **{path[0]: _set_path(getattr(obj, path[0]), path[1:], value)})


def build_config(settings: list[Setting], base: RunConfig | None = None) -> RunConfig:
    """Apply ``settings`` (ordered by source: file first, command line last) to ``base`` and validate.

    Within a source, section presets apply first, then aliases, then dotted fields.
    """
    cfg = base or RunConfig()
    sources: list[str] = []
    for s in settings:
        if s.source not in sources:
            sources.append(s.source)
    for source in sources:
        planned = [(spec, target, value, s) for s in settings if s.source == source
                   for spec, target, value in expand(s)]
        for spec, target, value, s in sorted(planned, key=lambda p: p[0]):
            try:
                if target in LEAVES:
                    value = validate_value(LEAVES[target], value)
                else:  # a section preset
                    value = _context_shorthand(value)
                cfg = _set_path(cfg, target.split("."), value)
            except (ValueError, TypeError) as err:
                raise ConfigError(str(err), field=s.label, source=s.source) from None
    return check_config(cfg)


def check_config(cfg: RunConfig) -> RunConfig:
    """Whole-config checks (fields that constrain each other), and every field's own constraints."""
    for leaf in LEAVES.values():  # defaults and programmatic replace() go through the same checks
        value = _get_path(cfg, leaf.path)
        try:
            validate_value(leaf, value)
        except ValueError as err:
            raise ConfigError(str(err), field=leaf.flag) from None
    for name in ("teacher_context", "student_context"):
        try:  # ContextConfig checks itself on construction; re-run it on the final values
            ContextConfig(**dataclasses.asdict(getattr(cfg, name)))
        except ValueError as err:
            raise ConfigError(str(err), field="--" + name.replace("_", "-")) from None
        context = getattr(cfg, name)
        for template, allowed in (("turn_template", {"speaker", "text"}), ("prompt_template", {"speaker", "mask"}),
                                  ("query_prefix", set())):
            problem = _template_problem(getattr(context, template), allowed)
            if problem:
                raise ConfigError(problem, field=f"--{name.replace('_', '-')}.{template.replace('_', '-')}")
    for name in ("loss", "teacher_loss"):
        loss = getattr(cfg, name)
        if "spcl" in loss.weights and loss.spcl_k > loss.spcl_queue:
            raise ConfigError(f"spcl_k ({loss.spcl_k}) must be <= spcl_queue ({loss.spcl_queue})",
                              field=f"--{name.replace('_', '-')}.spcl-k")
    if cfg.teacher is None and cfg.loss.needs_teacher and not (cfg.teacher_outputs or cfg.teachers):
        needs = [n for n in cfg.loss.weights if _needs_teacher(n)]
        raise ConfigError(f"the terms {', '.join(needs)} need a teacher; with --teacher none use e.g. --loss ce=1",
                          field="--loss")
    _check_modality(cfg)
    _check_teacher_outputs(cfg)
    if cfg.teacher is not None and cfg.teacher_loss.needs_teacher:
        raise ConfigError("the teacher trains on terms that need no teacher (e.g. ce=1)", field="--teacher-loss")
    return cfg


def _check_teacher_outputs(cfg: RunConfig) -> None:
    """Teacher output files carry logits only; transfer turns have no labels, so they need a teacher."""
    if cfg.teacher_outputs and cfg.teachers:
        raise ConfigError("give the ensemble as --teacher-outputs files or as --teachers to train, not both",
                          field="--teachers")
    members, flag = (cfg.teachers, "--teachers") if cfg.teachers else (cfg.teacher_outputs, "--teacher-outputs")
    if cfg.teacher_weights and len(cfg.teacher_weights) != len(members):
        raise ConfigError(f"{len(cfg.teacher_weights)} weights for {len(members)} {flag} "
                          f"{'entries' if cfg.teachers else 'files'}", field="--teacher-weights")
    if cfg.teacher_weights and sum(cfg.teacher_weights) <= 0:
        raise ConfigError("the teacher weights are all 0", field="--teacher-weights")
    if members:
        what = "teachers" if cfg.teachers else "output files"
        if cfg.modality != "text":
            raise ConfigError(f"teacher ensembles ({flag}) are for text corpora", field=flag)
        if not cfg.loss.needs_teacher:
            raise ConfigError(f"the loss ({', '.join(cfg.loss.weights)}) has no term that reads a teacher, so the "
                              f"{what} would be ignored: add one (e.g. --loss ce=1,kd=1) or drop {flag}", field=flag)
        model_terms = cfg.loss.feature_terms
        if model_terms and not cfg.teachers:
            raise ConfigError(f"the terms {', '.join(model_terms)} need the teacher models' features; output files "
                              "carry logits only: train the teachers in the run (--teachers) or use e.g. "
                              "--loss ce=1,dist=1", field="--loss")
    if cfg.transfer:
        if cfg.data != "meld":
            raise ConfigError(f"the transfer set is made for MELD (EmoryNLP scenes and MELD train augmentations), "
                              f"not {cfg.data}", field="--transfer")
        if not cfg.uses_teacher:
            raise ConfigError("transfer turns have no labels: they are taught by a teacher's soft targets only; "
                              "add a teacher and a logit term (e.g. --loss ce=1,dist=1)", field="--transfer")
    if cfg.teachers:
        teacher_configs(cfg)  # each entry is a valid teacher config (after the run's own checks)


def _check_modality(cfg: RunConfig) -> None:
    """Models that read what the corpus holds: speech encoders for a clip corpus, text ones otherwise."""
    from importlib import resources

    import yaml

    def names(package: str, file: str) -> set[str]:  # preset files read directly: no torch at start-up
        return set(yaml.safe_load(resources.files(package).joinpath(file).read_text("utf-8")))

    audio_names = names("erc_distill.audio", "presets.yaml") | {"tiny-whisper"}
    text_names = names("erc_distill.presets", "encoders.yaml") | {"tiny", "tiny-bert"}
    audio = cfg.modality == "audio"
    for flag, name in (("--teacher", cfg.teacher if cfg.trains_teacher else None), ("--student", cfg.student)):
        if name is None:
            continue
        if audio and name in text_names:
            raise ConfigError(f"{cfg.data} is a speech corpus (clips; its text is two fixed sentences): {name} is a "
                              f"text encoder; use a speech encoder ({', '.join(sorted(audio_names))}, a hub id or a "
                              f"folder), e.g. --config ravdess-whisper", field=flag)
        if not audio and name in audio_names:
            raise ConfigError(f"{name} is a speech encoder, but {cfg.data} is a text corpus; speech encoders take "
                              "a clip corpus (--data ravdess)", field=flag)


def _template_problem(template: str | None, allowed: set[str]) -> str | None:
    """Why a context template cannot be filled (unknown or malformed ``{fields}``), or None."""
    import string

    if template is None:
        return None
    try:
        fields_used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        return f"{template!r}: {err} (write a literal brace as {{{{ or }}}})"
    unknown = sorted(fields_used - allowed)
    if unknown:
        names = ", ".join("{" + f + "}" for f in sorted(allowed)) or "none"
        return f"{template!r}: unknown field {{{unknown[0]}}}; this template may use {names}"
    return None


def _needs_teacher(name: str) -> bool:
    from erc_distill.distill.losses import LOSSES

    return LOSSES[name].needs_teacher


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def to_plain(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data (tuples as lists): what manifests and ``config.yaml`` hold."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


# --------------------------------------------------------------------------- experiment files

def packaged_names(package: str) -> list[str]:
    """Names of the YAML files shipped in ``package`` (e.g. ``erc_distill.configs``)."""
    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def read_yaml_mapping(name_or_path: str | Path, package: str, kind: str) -> tuple[dict[str, Any], str]:
    """A YAML mapping from a path, or by name from the files shipped in ``package``; returns it with its
    source. Missing files, bad YAML and non-mappings are DataErrors naming the file (and line)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise DataError(f"{kind} file not found", file=path)
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
        source = str(path)
    elif str(name_or_path) in packaged_names(package):
        ref = resources.files(package).joinpath(f"{name_or_path}.yaml")
        text, source = ref.read_text("utf-8"), str(ref)
    else:
        raise ConfigError(f"unknown {kind} {str(name_or_path)!r}; shipped: {', '.join(packaged_names(package))}, "
                          "or a YAML path")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(f"not valid YAML: {err}", file=source, line=None if mark is None else mark.line + 1) from None
    if not isinstance(values, dict):
        raise DataError(f"a {kind} file is a mapping of field: value", file=source)
    return values, source


def config_names() -> list[str]:
    return packaged_names("erc_distill.configs")


def load_config_file(name_or_path: str | Path) -> list[Setting]:
    """An experiment file's settings (unknown keys are a ConfigError naming the file and the key)."""
    values, source = read_yaml_mapping(name_or_path, "erc_distill.configs", "config")
    settings = flatten_file(values, source)
    for s in settings:
        expand(s)  # raises on an unknown key
    return settings


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write a resolved config as an experiment file (every field, nested): ``--config`` repeats it."""
    from erc_distill.atomic import write_text

    write_text(path, "# erc-distill run config; repeat with: erc-distill --config THIS_FILE\n"
               + yaml.safe_dump(to_plain(cfg), sort_keys=False))


def quick(cfg: RunConfig) -> RunConfig:
    """Minutes end to end: one short epoch each, max_len <= 128, 300 profiled turns a variant. When a teacher
    is trained, only 30 dialogues per split (INT8 checks then reported rather than enforced); with
    ``teacher_outputs`` no teacher is trained, so the student gets the whole corpus (a real model in ~15 min
    on 2 CPU cores)."""
    short = lambda t: replace(t, epochs=1, checkpoint_every_n_steps=20)  # noqa: E731
    teachers = tuple(  # each entry shrunk the same way (dotted keys win over an entry's aliases)
        f"{spec};teacher_train.epochs=1;teacher_train.checkpoint_every_n_steps=20;"
        f"teacher_context.max_len={min(sub.teacher_context.max_len, 128)}"
        for spec, (_, sub) in zip(cfg.teachers, teacher_configs(cfg)))
    return replace(
        cfg, limit=cfg.limit if cfg.teacher_outputs and cfg.uses_teacher else 30, teachers=teachers,
        teacher_context=replace(cfg.teacher_context, max_len=min(cfg.teacher_context.max_len, 128)),
        student_context=replace(cfg.student_context, max_len=min(cfg.student_context.max_len, 128)),
        teacher_train=short(cfg.teacher_train), student_train=short(cfg.student_train),
        profile=replace(cfg.profile, turns=cfg.profile.turns or 300),
    )
