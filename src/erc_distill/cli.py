"""``erc-distill``: the command line.

``erc-distill --teacher T --student S --data D --out runs/NAME`` runs the whole pipeline
(teacher -> cache -> distill -> evaluate -> export -> quantize -> profile -> report); ``erc-distill STAGE ...`` runs
up to that stage (the stages before it are skipped when up to date).

Subcommands (each prints a readable summary; ``--json`` where a machine reads it):

- ``data-stats``  per split: utterances, dialogues, speakers, label counts, input token lengths;
- ``show-input``  the exact model input of one turn (decoded, and ids with ``--ids``);
- ``profile``     time the per-turn path of a bundle on a device profile;
- ``stream``      classify JSON-line turns from stdin with a bundle (the robot's own loop);
- ``serve``       the HTTP + WebSocket inference server (the ``serve`` extra);
- ``export-triton`` a Triton Inference Server model repository from a bundle;
- ``fetch-data``  download or copy a corpus's public CSVs, verified by SHA-256;
- ``score-outputs`` teacher output files and their ensembles (``--combinations``: every subset) on dev and test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from erc_distill import __version__
from erc_distill.config import STAGES
from erc_distill.data.context import CONTEXT_PRESETS, ContextBuilder, ContextConfig, context_preset
from erc_distill.data.corpora import CORPORA, get_corpus, load_corpus
from erc_distill.data.paths import DATA_ENV, resolve_data_dir
from erc_distill.data.types import SPLITS
from erc_distill.errors import ConfigError, UserError

if TYPE_CHECKING:
    from erc_distill.config import RunConfig


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="meld", choices=sorted(CORPORA), help="corpus (default: meld)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"folder holding the corpus folders (default: ${DATA_ENV}, else the per-user cache)",
    )


def _add_context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", default="spcl", choices=sorted(CONTEXT_PRESETS), help="context/prompt preset")
    p.add_argument("--max-len", type=int, default=None, help="token budget of an input (preset: 256)")
    p.add_argument(
        "--max-previous-turns", type=int, default=None, help="k: previous turns in the context (preset: 8)"
    )


def _context_config(args: argparse.Namespace) -> ContextConfig:
    overrides = {}
    if args.max_len is not None:
        overrides["max_len"] = args.max_len
    if args.max_previous_turns is not None:
        overrides["max_previous_turns"] = args.max_previous_turns
    return context_preset(args.context, **overrides)


def _builder(tokenizer_name: str, config: ContextConfig) -> ContextBuilder:
    from erc_distill.data.context import add_speaker_tokens
    from erc_distill.pretrained import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    if config.speaker_style == "index":
        add_speaker_tokens(tokenizer)
    return ContextBuilder(tokenizer, config, name=tokenizer_name)


def _config_type(path: str):
    """An argparse ``type`` that checks a value against config field ``path`` (its type and bounds)."""
    from erc_distill.config import LEAVES, validate_value

    def convert(text: str):
        try:
            return validate_value(LEAVES[path], text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _add_config_flag(group: argparse._ArgumentGroup, name: str, help: str) -> None:
    """One generated flag (``name`` is a dotted field, a section shorthand or an alias); its raw value
    lands in ``cfg:<name>`` and is coerced and checked by :func:`erc_distill.config.build_config`."""
    from erc_distill.config import ALIASES, LEAVES

    target = ALIASES.get(name, (name,))[0]
    tp = LEAVES[target].type if target in LEAVES else str
    metavar = {int: "N", float: "X"}.get(tp, "N" if tp == (int | None) else "X" if tp == (float | None) else "V")
    kwargs: dict = {"metavar": metavar}
    if tp is bool:
        kwargs = {"nargs": "?", "const": "true", "metavar": "BOOL"}
    elif typing.get_origin(tp) is tuple:
        kwargs = {"nargs": "+", "metavar": metavar}
    group.add_argument("--" + name.replace("_", "-"), dest=f"cfg:{name}", default=argparse.SUPPRESS, help=help,
                       **kwargs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is from 0 to 2**32 - 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _run_options() -> argparse.ArgumentParser:
    """The run options, generated from the config dataclasses (:mod:`erc_distill.config`)."""
    from erc_distill.config import ALIASES, LEAVES, SHORTHANDS, RunConfig, _get_path

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None,
                   help="experiment file (shipped name or YAML path) setting these options; flags override it")
    g.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<data>-<teacher>-<student>)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="teachers and teacher-output caches (default: $ERC_DISTILL_CACHE or ~/.cache/erc-distill)")
    g.add_argument("--quick", action="store_true", help="minutes end to end on a slice of the data")
    g.add_argument("--start-at", default=None, choices=STAGES,
                   help="begin at this stage and take the earlier ones from the run's manifest as they are "
                   "(a run trained on a GPU machine, copied here without the teacher's weights)")
    g.add_argument("--force", nargs="+", default=(), choices=STAGES, metavar="STAGE",
                   help="rerun these stages even if they are up to date")
    g.add_argument("--no-fetch", action="store_true", help="never download a missing corpus")
    mm = p.add_argument_group("multimodal (after the text run: `erc-distill multimodal --help` has every option)")
    mm.add_argument("--audio-student", default=None, help="speech student taught by the text teacher (whisper-tiny)")
    mm.add_argument("--visual-student", default=None, help="face / frame student taught by the text teacher (fer-cnn)")
    mm.add_argument("--fusion", nargs="+", default=None, metavar="HEAD", help="fusion heads: asf, mag, mult")
    mm.add_argument("--frames-dir", type=Path, default=None, help="video clips or frame folders (default: --media-dir)")
    defaults = RunConfig()
    common = p.add_argument_group("common settings (short names of the fields below)")
    for name, help in {k: v[1] for k, v in SHORTHANDS.items()}.items():
        _add_config_flag(common, name, help)
    for name, targets in ALIASES.items():
        if name not in SHORTHANDS:
            _add_config_flag(common, name, "sets " + ", ".join(targets))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, leaf in LEAVES.items():
        section = path.rpartition(".")[0] or "run config"
        if section not in groups:
            groups[section] = p.add_argument_group(section)
        default = _get_path(defaults, path)
        _add_config_flag(groups[section], path, f"{leaf.help} (default: {default})".lstrip())
    return p


def _cli_settings(args: argparse.Namespace) -> list:
    from erc_distill.config import Setting

    return [Setting(k[4:], v, "command line", "--" + k[4:].replace("_", "-"))
            for k, v in vars(args).items() if k.startswith("cfg:")]


def run_config(args: argparse.Namespace) -> "RunConfig":
    """The run's config: defaults < the ``--config`` file < typed flags; ``--quick`` shrinks it."""
    from erc_distill.config import build_config, load_config_file, quick

    settings = load_config_file(args.config) if args.config else []
    cfg = build_config(settings + _cli_settings(args))
    return quick(cfg) if args.quick else cfg


def _out_dir(args: argparse.Namespace, cfg: "RunConfig") -> Path:
    teacher = "ensemble" if cfg.ensemble else Path(str(cfg.teacher)).name
    names = [cfg.data, *([teacher] if cfg.uses_teacher else []), Path(cfg.student).name]
    return args.out or Path("runs") / "-".join(names)


def _multimodal_from_run(args: argparse.Namespace, cfg: "RunConfig", out: Path):
    """The multimodal stage asked for on the main command (``--audio-student`` / ``--visual-student`` /
    ``--fusion``), checked before any training; None when none of them is given."""
    from erc_distill.fusion.multimodal import MultimodalConfig

    if args.audio_student is None and args.visual_student is None and args.fusion is None:
        return None
    if cfg.modality != "text":
        raise ConfigError(f"--audio-student / --visual-student / --fusion extend a text run; {cfg.data} is a speech "
                          "corpus", field="--fusion")
    media = Path(cfg.media.dir) if cfg.media.dir else None
    if media is None and args.frames_dir is None:
        raise ConfigError("a multimodal run needs --media-dir (speech / video clips) and / or --frames-dir",
                          field="--media-dir")
    none = lambda x: None if x in (None, "none") else x  # noqa: E731
    mm = MultimodalConfig(text_run=out, out=out / "multimodal", media_dir=media, frames_dir=args.frames_dir,
                          audio_student=none(args.audio_student) if args.audio_student else "whisper-tiny",
                          visual_student=none(args.visual_student) if args.visual_student else "fer-cnn",
                          fusion=tuple(args.fusion or ("asf",)), data_dir=Path(cfg.data_dir) if cfg.data_dir else None,
                          teacher_outputs=tuple(Path(p) for p in cfg.teacher_outputs or ()))
    check_multimodal(mm)
    return mm


def check_multimodal(cfg) -> None:
    """Start-up checks of a :class:`~erc_distill.fusion.multimodal.MultimodalConfig` (before any training)."""
    from erc_distill.fusion.heads import FUSION_HEADS

    unknown = [h for h in cfg.fusion if h not in FUSION_HEADS]
    if unknown:
        raise ConfigError(f"unknown fusion head {unknown[0]!r}; known: {', '.join(sorted(FUSION_HEADS))}",
                          field="--fusion")
    if not 0 <= cfg.modality_dropout < 1:
        raise ConfigError(f"--modality-dropout must be in [0, 1), got {cfg.modality_dropout}", field="--modality-dropout")
    for flag, path in (("--media-dir", cfg.media_dir), ("--frames-dir", cfg.frames_dir)):
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"{path} is not a folder", field=flag)


def cmd_run(args: argparse.Namespace) -> int:
    from erc_distill.config import dump_config
    from erc_distill.stages import open_run, run_pipeline

    cfg = run_config(args)
    out = _out_dir(args, cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a run folder", field="--out")
    command = args.command if args.command not in (None, "run") else "report"
    stages = STAGES[: STAGES.index(command) + 1]
    if args.start_at:  # earlier stages are taken from the manifest as they are (e.g. trained on another machine)
        if args.start_at not in stages:
            raise ConfigError(f"not among this command's stages {', '.join(stages)}", field="--start-at")
        stages = stages[stages.index(args.start_at):]
    multimodal = _multimodal_from_run(args, cfg, out) if command == "report" else None
    ctx = open_run(cfg, out, args.cache_dir, fetch=not args.no_fetch)
    dump_config(cfg, out / "config.yaml")
    run_pipeline(ctx, stages, force=args.force)
    if multimodal is not None:
        from erc_distill.fusion.multimodal import MultimodalRun

        MultimodalRun(multimodal).run()  # the run's teacher (its outputs, or its cache) teaches the branches
    print(f"\nrun folder: {out}")
    metrics_file = out / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        rows = [["model", "params", "dev wF1", "test wF1", "test macro F1", "test acc"]]
        for name, m in metrics.items():
            rows.append([name, f"{m['params'] / 1e6:.1f}M", f"{100 * m['dev']['weighted_f1']:.2f}",
                         f"{100 * m['test']['weighted_f1']:.2f}", f"{100 * m['test']['macro_f1']:.2f}",
                         f"{100 * m['test']['accuracy']:.2f}"])
        print(_table(rows))
    checks = ctx.manifest.stages.get("quantize", {}).get("checks") if "quantize" in stages else None
    if checks:
        rows = [["method", "dev wF1 int8", "dev wF1 float", "drop (points)", "agreement", "MB"]]
        for method, c in checks.items():
            rows.append([method, f"{100 * c['int8_dev_weighted_f1']:.2f}", f"{100 * c['float_dev_weighted_f1']:.2f}",
                         f"{c['drop_points']:.2f}", f"{100 * c['argmax_agreement']:.2f}%", c["size_mb"]])
        print("\n" + _table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    run_opts = _run_options()
    parser = argparse.ArgumentParser(
        prog="erc-distill", usage="erc-distill [COMMAND] [OPTIONS]  (erc-distill COMMAND --help)",
        parents=[run_opts],
        description="Distil large Emotion-Recognition-in-Conversation teachers into small, fast students. "
        "Without a subcommand: run the whole pipeline.",
    )
    parser.set_defaults(func=cmd_run)
    parser.add_argument("--version", action="version", version=f"erc-distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage, text in (("run", "the whole pipeline (the default)"), ("teacher", "fine-tune the teacher"),
                        ("cache", "cache the teacher's outputs"), ("distill", "train the student"),
                        ("evaluate", "score teacher and student, write metrics.json and predictions"),
                        ("export", "the student as an ONNX inference bundle, checked against PyTorch"),
                        ("quantize", "INT8 graphs of the run's bundle, each checked on dev"),
                        ("report", "quantize, profile on the device profile, write the accuracy-vs-speed report")):
        stage_parser = sub.add_parser(stage, parents=[run_opts], help=text)
        stage_parser.set_defaults(func=cmd_run)

    p = sub.add_parser("teacher-outputs", parents=[run_opts],
                       help="train (or reuse) the teacher and write its logits on every split (+ --transfer) to a file")
    p.add_argument("--to", type=Path, required=True, help="the .npz file to write (a .json description goes beside it)")
    p.set_defaults(func=cmd_teacher_outputs)

    p = sub.add_parser("score-outputs", help="score teacher output files and their ensembles on dev and test")
    p.add_argument("files", nargs="+", type=Path, help="teacher output files (.npz from teacher-outputs)")
    p.add_argument("--teacher-weights", type=float, nargs="+", default=[], help="the ensemble's weights (default: equal)")
    p.add_argument("--combinations", action="store_true", help="also every subset of two or more files (equal weights)")
    p.add_argument("--data-dir", type=Path, default=None, help=f"corpus folders (default: ${DATA_ENV})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_score_outputs)

    p = sub.add_parser("data-stats", help="per-split counts, labels and input token lengths of a corpus")
    _add_data_args(p)
    _add_context_args(p)
    p.add_argument("--tokenizer", default=None, help="measure built input lengths with this tokenizer")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("show-input", help="print the exact model input of one turn")
    _add_data_args(p)
    _add_context_args(p)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--dialogue", required=True, help="dialogue id (MELD: Dialogue_ID)")
    p.add_argument("--turn", type=int, required=True, help="turn id (MELD: Utterance_ID)")
    p.add_argument("--tokenizer", default="minilm-l6", help="tokenizer: preset, hub id or folder")
    p.add_argument("--ids", action="store_true", help="also print the token ids")
    p.set_defaults(func=cmd_show_input)

    p = sub.add_parser("profile", help="time the per-turn path of a bundle on real turns, against a device profile")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--profile", default="cpu-2core", help="device profile: shipped name or YAML path")
    p.add_argument("--model-file", default=None, help="graph in the bundle (default: the float model.onnx)")
    p.add_argument("--data", default="meld", choices=sorted(CORPORA))
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--turns", type=_config_type("profile.turns"), default=None,
                   help="timed turns (default: the whole split)")
    p.add_argument("--warmup", type=_config_type("profile.warmup"), default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--media-dir", type=Path, default=None, help="audio bundles: the corpus's media folder")
    p.add_argument("--max-seconds", type=_config_type("media.max_seconds"), default=None,
                   help="audio bundles: longest clip read (longer ones are cut)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("stream", help="classify turns read as JSON lines from stdin with an exported bundle")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", type=Path, help="bundle folder (runs/NAME/bundle)")
    where.add_argument("--edge", type=Path, help="a fused student (RUN/multimodal/edge): turns may carry speech "
                       "('pcm16' / 'audio_path') and video ('frames' / 'video_path')")
    p.add_argument("--float", action="store_true", help="--edge: the float text / audio graphs, not INT8")
    p.add_argument("--face-detector", choices=("auto", "mediapipe", "none"), default="auto",
                   help="--edge: how faces are found in frames")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-text-chars", type=_positive_int, default=2000, help="longer turns are rejected")
    p.add_argument("--max-conversations", type=_positive_int, default=1000,
                   help="live conversations kept (least recently used evicted)")
    p.add_argument("--idle-ttl", type=_positive_float, default=3600.0,
                   help="seconds before an idle conversation is forgotten")
    p.add_argument("--audio-bundle", type=Path, default=None,
                   help="an exported audio bundle: turns may then carry 'pcm16' or 'audio_path'")
    p.add_argument("--max-audio-seconds", type=_positive_float, default=30.0,
                   help="longer clips keep their first seconds (the cut is reported)")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("serve", help="HTTP + WebSocket inference server on an exported bundle (the serve extra)")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (runs/NAME/bundle)")
    p.add_argument("--config", type=Path, default=None, help="serve settings (YAML: host, port, max_batch, ...)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--model-file", default=None, help="graph in the bundle, e.g. model-int8-ort-dynamic.onnx")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-triton", help="a Triton Inference Server model repository from a bundle")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (runs/NAME/bundle)")
    p.add_argument("--out", type=Path, required=True, help="model repository folder (created or added to)")
    p.add_argument("--model-file", default=None, help="graph in the bundle (e.g. model-int8-ort-dynamic.onnx)")
    p.add_argument("--tokenize", choices=("client", "python"), default="client",
                   help="client: the robot builds inputs; python: a Python-backend model keeps the context")
    p.add_argument("--max-batch", type=_positive_int, default=32)
    p.add_argument("--max-queue-delay-us", type=_positive_int, default=5000)
    p.add_argument("--instances", type=_positive_int, default=1)
    p.add_argument("--kind", choices=("KIND_CPU", "KIND_GPU"), default="KIND_CPU")
    p.add_argument("--name", default=None, help="model name (default: the bundle folder's)")
    p.add_argument("--overwrite", action="store_true", help="replace this bundle's models in the repository")
    p.set_defaults(func=cmd_export_triton)

    p = sub.add_parser("multimodal", help="audio and visual students taught by the text teacher, a fusion head on a "
                                          "finished text run, exported and timed per turn (TelME style)")
    p.add_argument("--text-run", type=Path, required=True, help="a finished text run's --out folder (its student "
                   "and, unless --teacher-outputs is given, its teacher outputs are used)")
    p.add_argument("--out", type=Path, required=True, help="where the multimodal run is kept (resumable)")
    p.add_argument("--media-dir", type=Path, default=None, help="the corpus's clips (speech; video too)")
    p.add_argument("--frames-dir", type=Path, default=None, help="video clips or frame folders (default: --media-dir)")
    p.add_argument("--teacher-outputs", type=Path, nargs="+", default=(), help="the text teacher's output files")
    p.add_argument("--audio-student", default="whisper-tiny", help="speech encoder, or 'none'")
    p.add_argument("--visual-student", default="fer-cnn", help="visual encoder (fer-cnn, efficientnet-lite0, "
                   "timesformer, a hub id), or 'none'")
    p.add_argument("--fusion", nargs="+", default=["asf", "mag", "mult"], help="fusion heads (the first is exported)")
    p.add_argument("--audio-epochs", type=_positive_int, default=4)
    p.add_argument("--visual-epochs", type=_positive_int, default=4)
    p.add_argument("--fusion-epochs", type=_positive_int, default=30)
    p.add_argument("--modality-dropout", type=float, default=0.3, help="fusion training: chance of hiding a "
                   "present audio / visual input (so text-only turns are handled)")
    p.add_argument("--seeds", type=_seed, nargs="+", default=[0], help="fusion-head seeds (integers >= 0)")
    p.add_argument("--face-detector", choices=("auto", "mediapipe", "none"), default="auto")
    p.add_argument("--profile-turns", type=_positive_int, default=100, help="test turns timed per path")
    p.add_argument("--threads", type=_positive_int, default=2, help="ONNX Runtime threads when timing")
    p.add_argument("--data-dir", type=Path, default=None)
    p.set_defaults(func=cmd_multimodal)

    p = sub.add_parser("fetch-data", help="download (or copy with --from) a corpus, verified by SHA-256")
    p.add_argument("corpus", choices=sorted(c for c in CORPORA if CORPORA[c].source_url))
    p.add_argument("--from", dest="source", type=Path, default=None, help="copy from this folder instead")
    p.add_argument("--data-dir", type=Path, default=None, help=f"destination (default: ${DATA_ENV} or cache)")
    p.add_argument("--url", default=None, help="download from this mirror ({file} is filled in)")
    p.set_defaults(func=cmd_fetch_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # torchao (imported by transformers when present) registers enums in a way torch now warns about
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    if not argv:
        parser.print_help()
        return 2
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["run", *argv]  # options first: the whole pipeline (errors then name the bad option)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:  # one line; anything else is a bug and keeps its traceback
        print(f"erc-distill {args.command or 'run'}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"erc-distill {args.command or 'run'}: interrupted{': ' + str(err) if str(err) else ''}; "
              "rerun the same command to resume", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- commands


def cmd_teacher_outputs(args: argparse.Namespace) -> int:
    from erc_distill.config import dump_config
    from erc_distill.stages import open_run, run_pipeline
    from erc_distill.stages.teacher_outputs import export_teacher_outputs

    cfg = run_config(args)
    if not cfg.trains_teacher:
        raise ConfigError("teacher-outputs needs a teacher (one) to train or reuse (--teacher NAME, a loss with a teacher "
                          "term, no --teacher-outputs or --teachers: a --teachers run writes each member's file "
                          "itself, in its cache's teacher-outputs/)", field="--teacher")
    if cfg.modality != "text":
        raise ConfigError(f"teacher output files are for text corpora; {cfg.data} is a speech corpus", field="--data")
    if args.to.suffix != ".npz":
        raise ConfigError(f"{args.to}: teacher outputs are written as a .npz file", field="--to")
    out = _out_dir(args, cfg)
    ctx = open_run(cfg, out, args.cache_dir, fetch=not args.no_fetch)
    dump_config(cfg, out / "config.yaml")
    run_pipeline(ctx, ["teacher"], force=args.force)
    export_teacher_outputs(ctx, args.to)
    return 0


def cmd_score_outputs(args: argparse.Namespace) -> int:
    from erc_distill.distill.outputs import read_teacher_outputs, score_outputs

    if args.teacher_weights and len(args.teacher_weights) != len(args.files):
        raise ConfigError(f"{len(args.teacher_weights)} weights for {len(args.files)} files", field="--teacher-weights")
    outputs = [read_teacher_outputs(f) for f in args.files]
    rows = score_outputs(outputs, args.data_dir, args.teacher_weights, args.combinations)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    best = max(rows, key=lambda r: r["dev"]["weighted_f1"])
    table = [["teachers", "weights", "dev wF1", "test wF1", "dev macro F1", "test macro F1", ""]]
    for r in rows:
        table.append([" + ".join(r["teachers"]), ":".join(f"{w:g}" for w in r["weights"]) if len(r["weights"]) > 1
                      else "", *(f"{100 * r[s][m]:.2f}" for m in ("weighted_f1", "macro_f1") for s in ("dev", "test")),
                      "best dev" if r is best else ""])
    print(f"{outputs[0].meta.get('corpus')}: each teacher and ensembles (weighted mean of probabilities), scored like "
          f"models on {rows[0]['turns']['dev']} dev / {rows[0]['turns']['test']} test turns\n")
    print(_table(table))
    weights = f" (weights {':'.join(f'{w:g}' for w in best['weights'])})" if len(best["weights"]) > 1 else ""
    print(f"\nbest on dev: {' + '.join(best['teachers'])}{weights} (choose on dev; test is for the report)")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from erc_distill.data.stats import split_stats

    config = _context_config(args)
    builder = _builder(args.tokenizer, config) if args.tokenizer else None
    stats = [split_stats(load_corpus(args.data, s, args.data_dir), builder, progress=not args.json) for s in args.splits]
    if args.json:
        out = {
            "corpus": args.data,
            "data_dir": str(resolve_data_dir(args.data_dir)),
            "context": {"preset": args.context, **asdict(config)} if builder else None,
            "splits": {s.split: asdict(s) for s in stats},
        }
        print(json.dumps(out, indent=2))
        return 0
    spec = get_corpus(args.data)
    print(f"{spec.description} [{spec.name}] in {resolve_data_dir(args.data_dir)}\n")
    rows = [["split", "utterances", "dialogues", "speakers", "turns/dialogue (mean, max)"]]
    rows += [
        [s.split, s.utterances, s.dialogues, s.speakers, f"{s.turns_per_dialogue_mean:.2f}, {s.turns_per_dialogue_max}"]
        for s in stats
    ]
    print(_table(rows))
    label_rows = [["label", *(s.split for s in stats)]]
    label_rows += [[label, *(f"{s.labels[label]} ({100 * s.labels[label] / max(s.utterances, 1):.1f}%)" for s in stats)]
                   for label in spec.labels]
    if any(s.unlabelled for s in stats):
        label_rows.append(["(unlabelled)", *(s.unlabelled for s in stats)])
    print("\n" + _table(label_rows))
    if builder is None:
        print("\n(input token lengths: pass --tokenizer NAME, e.g. --tokenizer minilm-l6)")
        return 0
    first = stats[0].input_lengths
    print(f"\ninput tokens: tokenizer {first.tokenizer}, context {args.context} "
          f"(max_len {config.max_len}, k {config.max_previous_turns})")
    len_rows = [["split", "p50", "p95", "max", "mean", "context turns (mean)", "context cut", "query cut"]]
    for s in stats:
        x = s.input_lengths
        len_rows.append([s.split, f"{x.p50:g}", f"{x.p95:g}", x.max, x.mean, x.mean_context_turns, x.context_cut, x.query_cut])
    print(_table(len_rows))
    return 0


def cmd_show_input(args: argparse.Namespace) -> int:
    config = _context_config(args)
    data = load_corpus(args.data, args.split, args.data_dir)
    dialogue = data.dialogue(args.dialogue)
    turn = dialogue.turn(args.turn)
    builder = _builder(args.tokenizer, config)
    x = builder.build_turn(dialogue, turn.index)
    print(f"{data.corpus}/{data.split} dialogue {dialogue.dialogue_id}, turn {turn.turn_id} "
          f"(position {turn.index} of {len(dialogue)}; {turn.source})")
    print(f"  {turn.speaker}: {turn.text}")
    print(f"  gold: {turn.label}")
    first = dialogue.turns[x.context_start].turn_id if x.context_start <= turn.index else None
    context = f"turns {first}..{turn.turn_id} ({x.context_turns})" if first is not None else "none"
    print(f"context: {context}; {len(x)} tokens of max_len {config.max_len}; mask at position {x.mask_index}"
          + (f"; {x.context_tokens_cut} oldest context tokens cut" if x.context_tokens_cut else "")
          + (f"; query cut by {x.query_tokens_cut} tokens" if x.query_tokens_cut else ""))
    print(f"tokenizer: {builder.name}\n")
    print(builder.decode(x))
    if args.ids:
        print("\nids: " + " ".join(map(str, x.input_ids)))
    return 0


def cmd_multimodal(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from erc_distill.fusion.multimodal import BranchTrainConfig, MultimodalConfig, MultimodalRun

    none = lambda x: None if x in (None, "none") else x  # noqa: E731
    base = MultimodalConfig(text_run=args.text_run, out=args.out)
    cfg = MultimodalConfig(
        text_run=args.text_run, out=args.out, media_dir=args.media_dir, frames_dir=args.frames_dir,
        teacher_outputs=tuple(args.teacher_outputs), audio_student=none(args.audio_student),
        visual_student=none(args.visual_student), fusion=tuple(args.fusion),
        audio_train=replace(base.audio_train, epochs=args.audio_epochs),
        visual_train=replace(base.visual_train, epochs=args.visual_epochs), fusion_epochs=args.fusion_epochs,
        modality_dropout=args.modality_dropout, seeds=tuple(dict.fromkeys(args.seeds)), data_dir=args.data_dir,
        profile_turns=args.profile_turns, threads=args.threads, face_detector=args.face_detector)
    check_multimodal(cfg)
    MultimodalRun(cfg).run()
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from erc_distill.profiles import load_profile
    from erc_distill.profiles.profiler import profile_audio_bundle, profile_bundle
    from erc_distill.runtime.bundle import _read_meta

    if args.json is not None and args.json.is_dir():
        raise ConfigError(f"{args.json} is a folder; give a file name", field="--json")
    device = load_profile(args.profile)
    data = load_corpus(args.data, args.split, args.data_dir)
    audio = _read_meta(args.bundle, args.bundle / "bundle.json").get("modality") == "audio"
    if audio:
        from erc_distill.media import locate_clip

        turns = [t for d in data.dialogues for t in d.turns]
        clips = [c for c in (locate_clip(t, args.media_dir) for t in turns) if c is not None]
        result = profile_audio_bundle(args.bundle, device, clips, args.model_file, args.warmup, args.turns,
                                      max_seconds=args.max_seconds)
    else:
        result = profile_bundle(args.bundle, device, data.dialogues, args.model_file, args.warmup, args.turns)
    if args.json:
        from erc_distill.atomic import write_text

        write_text(args.json, result.to_json())
    v = result.verdict
    what = (f"{result.turns} clips of {args.data}/{args.split}, mean {result.mean_seconds:.2f} s (decode + log-mel + "
            "model)" if audio else f"{result.turns} turns of {args.data}/{args.split}, mean {result.mean_tokens:.0f} tokens")
    print(f"{result.variant} on {device.name} ({device.backend}, {device.threads} threads): {what}")
    print(f"  latency ms  p50 {result.p50_ms:.2f}  p95 {result.p95_ms:.2f}  p99 {result.p99_ms:.2f}  "
          f"mean {result.mean_ms:.2f}  ->  {result.turns_per_s:.0f} {'clips' if audio else 'turns'}/s")
    print(f"  peak RSS {result.peak_rss_mb:.0f} MB, model {result.model_size_mb:.1f} MB, params {result.params}")
    print(f"  budget p99 {device.p99_budget_ms:g} ms (+{device.network_rtt_ms:g} ms network), memory "
          f"{device.memory_budget_mb:g} MB: {'PASS' if v['pass'] else 'FAIL'}"
          + ("" if v.get("precision_ok") is not False else
             f" (but this graph is {result.precision}; {device.name} deploys {device.precision})"))
    if args.turns and result.turns < args.turns:
        print(f"  note: {args.data}/{args.split} has only {result.turns} {'clips' if audio else 'turns'} to time "
              f"(asked for {args.turns})")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    """stdin: ``{"conversation": ID, "speaker": S, "text": T}`` per line (with ``--audio-bundle`` also
    ``"pcm16"`` + ``"sample_rate"`` or ``"audio_path"``); stdout: one JSON line per input line, a
    prediction or ``{"error": ...}`` (a bad line never stops the stream); a summary on stderr at the end."""
    from erc_distill.runtime import AudioBundle, Bundle, StreamingRecognizer
    from erc_distill.runtime.stream import serve_lines

    # with speech, two sessions take turns on the same cores: neither may spin between runs
    audio = None if args.audio_bundle is None else AudioBundle.load(args.audio_bundle, threads=args.threads,
                                                                     spin=False)
    fused = None
    if args.edge is not None:
        from erc_distill.fusion.edge import FusedRuntime

        if not FusedRuntime.is_edge(args.edge):
            raise ConfigError(f"{args.edge} is not a fused student's edge folder (no edge.json); it is written by "
                              "`erc-distill multimodal` in OUT/edge", field="--edge")
        fused = FusedRuntime(args.edge, threads=args.threads, int8=not args.float, face_detector=args.face_detector)
        bundle = fused.text
    else:
        bundle = Bundle.load(args.bundle, threads=args.threads, spin=audio is None)
    recognizer = StreamingRecognizer(bundle, max_text_chars=args.max_text_chars,
                                     max_conversations=args.max_conversations, idle_ttl_s=args.idle_ttl,
                                     audio_bundle=audio, max_audio_seconds=args.max_audio_seconds, fused=fused)

    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    summary = serve_lines(recognizer, getattr(sys.stdin, "buffer", sys.stdin), write)
    print("stream: " + ", ".join(f"{k} {v}" for k, v in summary.items()), file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a bundle over HTTP and WebSocket until interrupted; prints one line with the URL first."""
    from erc_distill.serve.settings import load_serve_config

    cfg = load_serve_config(args.config, host=args.host, port=args.port, model_file=args.model_file,
                            threads=args.threads)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from erc_distill.serve.app import bind_socket, create_app, uvicorn_server
    except ImportError as err:
        raise UserError(f"the server needs the serve extra ({err}); install it with: "
                        'pip install "erc-distill[serve]"') from None
    app = create_app(args.bundle, cfg)
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except OSError as err:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({err.strerror or err})", field="--port") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    server = app.state.server
    print(f"erc-distill serve: http://{shown}:{port} (bundle {server.bundle.folder}, model {server.bundle.model_file}, "
          f"max_batch {cfg.max_batch}, max_wait_ms {cfg.max_wait_ms:g})", flush=True)
    try:
        uvicorn_server(app, cfg).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises the signal
        pass
    print("erc-distill serve: stopped", file=sys.stderr)
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    from erc_distill.serve.triton import export_triton, summary

    try:
        result = export_triton(args.bundle, args.out, model_file=args.model_file, max_batch=args.max_batch,
                               max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, kind=args.kind,
                               tokenize=args.tokenize, name=args.name, overwrite=args.overwrite)
    except FileExistsError as err:
        raise ConfigError(str(err).replace("pass overwrite=True to replace", "--overwrite replaces it"),
                          field="--out") from None
    except ValueError as err:  # a bad name, kind or limit, said by the exporter
        raise ConfigError(str(err)) from None
    print(summary(result))
    return 0


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from erc_distill.data.fetch import fetch_corpus

    root = resolve_data_dir(args.data_dir)
    files = fetch_corpus(args.corpus, root, source_dir=args.source, base_url=args.url)
    for f in files:
        print(f"{f.action:>10}  {f.path}  sha256 {f.sha256[:16]}…")
    print(f"{args.corpus}: {len(files)} files verified in {root / get_corpus(args.corpus).folder}")
    return 0


def _table(rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
