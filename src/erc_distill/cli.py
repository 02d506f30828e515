"""``erc-distill``: the command line.

``erc-distill --teacher T --student S --data D --out runs/NAME`` runs the whole pipeline
(teacher -> cache -> distill -> evaluate -> export); ``erc-distill teacher|cache|...|export ...`` runs
up to that stage (the stages before it are skipped when up to date).

Subcommands (each prints a readable summary; ``--json`` where a machine reads it):

- ``data-stats``  per split: utterances, dialogues, speakers, label counts, input token lengths;
- ``show-input``  the exact model input of one turn (decoded, and ids with ``--ids``);
- ``fetch-data``  download or copy a corpus's public CSVs, verified by SHA-256.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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
from erc_distill.errors import DataError, ExportError

if TYPE_CHECKING:  # the pipeline pulls in torch; `erc-distill stream` must run without it
    from erc_distill.pipeline import RunConfig


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


def _run_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("pipeline")
    g.add_argument("--config", default=None,
                   help="experiment file (shipped name or YAML path) setting these options; flags override it")
    g.add_argument("--teacher", default="mpnet-base", help="teacher encoder: preset, hub id, folder, or 'none'")
    g.add_argument("--student", default="minilm-l6", help="student encoder: preset, hub id or folder")
    g.add_argument("--data", default="meld", choices=sorted(CORPORA))
    g.add_argument("--data-dir", type=Path, default=None)
    g.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<data>-<teacher>-<student>)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="teachers and teacher-output caches (default: $ERC_DISTILL_CACHE or ~/.cache/erc-distill)")
    g.add_argument("--context", default="spcl", choices=sorted(CONTEXT_PRESETS), help="student context preset")
    g.add_argument("--teacher-context", default="spcl", choices=sorted(CONTEXT_PRESETS))
    g.add_argument("--max-len", type=int, default=256, help="student input budget")
    g.add_argument("--teacher-max-len", type=int, default=256)
    g.add_argument("--loss", default="ce=1,dist=1,feature=0.5", help="student objective, name=weight,...")
    g.add_argument("--teacher-loss", default="ce=1", help="teacher objective")
    g.add_argument("--tau", type=float, default=4.0, help="temperature of kd / dist")
    g.add_argument("--class-weight-power", type=float, default=0.0, help="ce class weights (N / C n_c)^p")
    g.add_argument("--spcl-curriculum", action="store_true", help="SPCL's easy-to-hard curriculum for the spcl term")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--teacher-epochs", type=int, default=3)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--teacher-lr", type=float, default=2e-5)
    g.add_argument("--head-lr", type=float, default=1e-4)
    g.add_argument("--layer-decay", type=float, default=1.0, help="student layer-wise LR decay")
    g.add_argument("--teacher-layer-decay", type=float, default=0.9)
    g.add_argument("--freeze-teacher-layers", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--accumulate", type=int, default=1)
    g.add_argument("--val-check-interval", type=float, default=1.0, help="dev evaluations per epoch: 1/x")
    g.add_argument("--checkpoint-every", type=int, default=100, help="save last.ckpt every N optimizer steps")
    g.add_argument("--seed", type=int, default=0, help="student seed")
    g.add_argument("--quick", action="store_true", help="minutes end to end on a slice of the data")
    g.add_argument("--profile", dest="device_profile", default="cpu-2core",
                   help="device profile for the profile stage: shipped name or YAML path")
    g.add_argument("--quantize-methods", nargs="+", default=["ort-dynamic", "ort-static", "nncf-ptq", "nncf-qat"],
                   choices=["ort-dynamic", "ort-static", "nncf-ptq", "nncf-qat"])
    g.add_argument("--qat-epochs", type=int, default=1, help="nncf-qat fine-tuning epochs")
    g.add_argument("--start-at", default=None, choices=STAGES,
                   help="begin at this stage and take the earlier ones from the run's manifest as they are "
                   "(a run trained on a GPU machine, copied here without the teacher's weights)")
    g.add_argument("--accelerator", default="cpu")
    g.add_argument("--devices", default="1")
    g.add_argument("--strategy", default="auto")
    g.add_argument("--precision", default="32-true")
    return p


def run_config(args: argparse.Namespace) -> "RunConfig":
    from erc_distill.distill.module import OptimConfig
    from erc_distill.distill.objective import LossConfig, parse_loss_spec
    from erc_distill.distill.train import TrainConfig
    from erc_distill.pipeline import RunConfig, quick

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    common = dict(batch_size=args.batch_size, accumulate=args.accumulate, accelerator=args.accelerator,
                  devices=devices, strategy=args.strategy, precision=args.precision,
                  val_check_interval=args.val_check_interval, checkpoint_every_n_steps=args.checkpoint_every)
    cfg = RunConfig(
        teacher=None if args.teacher.lower() == "none" else args.teacher,
        student=args.student,
        data=args.data,
        data_dir=str(args.data_dir) if args.data_dir else None,
        teacher_context=context_preset(args.teacher_context, max_len=args.teacher_max_len),
        student_context=context_preset(args.context, max_len=args.max_len),
        teacher_train=TrainConfig(epochs=args.teacher_epochs, freeze_layers=args.freeze_teacher_layers,
                                  optim=OptimConfig(lr=args.teacher_lr, head_lr=args.head_lr,
                                                    layer_decay=args.teacher_layer_decay), **common),
        teacher_loss=LossConfig(weights=parse_loss_spec(args.teacher_loss),
                                class_weight_power=args.class_weight_power),
        student_train=TrainConfig(epochs=args.epochs, seed=args.seed,
                                  optim=OptimConfig(lr=args.lr, head_lr=args.head_lr, layer_decay=args.layer_decay),
                                  **common),
        loss=LossConfig(weights=parse_loss_spec(args.loss), tau=args.tau, class_weight_power=args.class_weight_power,
                        spcl_curriculum=args.spcl_curriculum),
    )
    return quick(cfg) if args.quick else cfg


def _out_dir(args: argparse.Namespace, cfg: "RunConfig") -> Path:
    names = [cfg.data, *([Path(cfg.teacher).name] if cfg.uses_teacher else []), Path(cfg.student).name]
    return args.out or Path("runs") / "-".join(names)


def cmd_run(args: argparse.Namespace) -> int:
    from erc_distill.pipeline import Run

    cfg = run_config(args)
    out = _out_dir(args, cfg)
    stages = STAGES if args.command in (None, "run") else STAGES[: STAGES.index(args.command) + 1]
    if args.start_at:  # earlier stages are taken from the manifest as they are (e.g. trained on another machine)
        if args.start_at not in stages:
            raise SystemExit(f"--start-at {args.start_at}: not among this command's stages {', '.join(stages)}")
        stages = stages[stages.index(args.start_at):]
    run = Run(cfg, out, args.cache_dir, progress=True, device_profile=args.device_profile,
              quantize_methods=args.quantize_methods, qat_epochs=args.qat_epochs)
    from erc_distill.config import dump_config

    dump_config({k: getattr(args, k) for k in sorted(_run_option_names()) if k not in ("out", "start_at")},
                out / "config.yaml")
    run.run(stages)
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    run_opts = _run_options()
    parser = argparse.ArgumentParser(
        prog="erc-distill",
        parents=[run_opts],
        description="Distil large Emotion-Recognition-in-Conversation teachers into small, fast students. "
        "Without a subcommand: run the whole pipeline.",
    )
    parser.set_defaults(func=cmd_run)
    parser.add_argument("--version", action="version", version=f"erc-distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.run_parsers = [parser]  # the parsers whose defaults an experiment file sets
    for stage, text in (("run", "the whole pipeline (the default)"), ("teacher", "fine-tune the teacher"),
                        ("cache", "cache the teacher's outputs"), ("distill", "train the student"),
                        ("evaluate", "score teacher and student, write metrics.json and predictions"),
                        ("export", "the student as an ONNX inference bundle, checked against PyTorch"),
                        ("report", "quantize, profile on the device profile, write the accuracy-vs-speed report")):
        stage_parser = sub.add_parser(stage, parents=[run_opts], help=text)
        stage_parser.set_defaults(func=cmd_run)
        parser.run_parsers.append(stage_parser)

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

    p = sub.add_parser("quantize", parents=[run_opts], help="INT8 graphs of the run's bundle, checked on dev")
    p.add_argument("--method", nargs="+", default=["ort-dynamic", "ort-static", "nncf-ptq", "nncf-qat"],
                   choices=["ort-dynamic", "ort-static", "nncf-ptq", "nncf-qat"])
    p.add_argument("--budget", type=float, default=None, help="allowed dev weighted-F1 drop, points (1.0)")
    p.add_argument("--calibration-turns", type=int, default=256)
    p.set_defaults(func=cmd_quantize)
    parser.run_parsers.append(p)

    p = sub.add_parser("profile", help="time the per-turn path of a bundle on real turns, against a device profile")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--profile", default="cpu-2core", help="device profile: shipped name or YAML path")
    p.add_argument("--model-file", default=None, help="graph in the bundle (default: the float model.onnx)")
    p.add_argument("--data", default="meld", choices=sorted(CORPORA))
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--turns", type=int, default=None, help="timed turns (default: the whole split)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("stream", help="classify turns read as JSON lines from stdin with an exported bundle")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (runs/NAME/bundle)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=cmd_stream)

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
    args = None
    try:
        _apply_config_file(parser, argv)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except (DataError, ExportError, OSError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        command = (args.command if args is not None else None) or "run"
        print(f"erc-distill {command}: error: {message}", file=sys.stderr)
        return 1


def _run_option_names() -> set[str]:
    return {a.dest for a in _run_options()._actions if a.dest not in ("help", "config")}


def _apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """``--config FILE``: its values become the defaults of the run options (typed flags still win)."""
    from erc_distill.config import load_config_file

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    values = load_config_file(known.config, _run_option_names())
    for p in parser.run_parsers:
        p.set_defaults(**values)


# ----------------------------------------------------------------------------- commands


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


def cmd_quantize(args: argparse.Namespace) -> int:
    """Run the pipeline up to ``export`` (skipping what is done), then quantize the bundle."""
    from erc_distill.pipeline import Run

    args.command = "export"
    cmd_run(args)
    run = Run(run_config(args), _out_dir(args, run_config(args)), args.cache_dir, qat_epochs=args.qat_epochs)
    record = run.run_quantize(args.method, args.budget, args.calibration_turns)
    rows = [["method", "dev wF1 int8", "dev wF1 float", "drop (points)", "agreement", "MB"]]
    for method, c in record["checks"].items():
        rows.append([method, f"{100 * c['int8_dev_weighted_f1']:.2f}", f"{100 * c['float_dev_weighted_f1']:.2f}",
                     f"{c['drop_points']:.2f}", f"{100 * c['argmax_agreement']:.2f}%", c["size_mb"]])
    print(_table(rows))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from erc_distill.profiles import load_profile
    from erc_distill.profiles.profiler import profile_bundle

    device = load_profile(args.profile)
    data = load_corpus(args.data, args.split, args.data_dir)
    result = profile_bundle(args.bundle, device, data.dialogues, args.model_file, args.warmup, args.turns)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(result.to_json())
    v = result.verdict
    print(f"{result.variant} on {device.name} ({device.backend}, {device.threads} threads): {result.turns} turns of "
          f"{args.data}/{args.split}, mean {result.mean_tokens:.0f} tokens")
    print(f"  latency ms  p50 {result.p50_ms:.2f}  p95 {result.p95_ms:.2f}  p99 {result.p99_ms:.2f}  "
          f"mean {result.mean_ms:.2f}  ->  {result.turns_per_s:.0f} turns/s")
    print(f"  peak RSS {result.peak_rss_mb:.0f} MB, model {result.model_size_mb:.1f} MB, params {result.params}")
    print(f"  budget p99 {device.p99_budget_ms:g} ms (+{device.network_rtt_ms:g} ms network), memory "
          f"{device.memory_budget_mb:g} MB: {'PASS' if v['pass'] else 'FAIL'}")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    """stdin: ``{"conversation": ID, "speaker": S, "text": T}`` per line; stdout: one prediction per line."""
    from erc_distill.runtime import Bundle, StreamingRecognizer

    recognizer = StreamingRecognizer(Bundle.load(args.bundle, threads=args.threads))
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            turn = json.loads(line)
        except json.JSONDecodeError as err:
            print(json.dumps({"error": f"line {number}: not JSON ({err.msg})"}), flush=True)
            continue
        missing = [k for k in ("speaker", "text") if not isinstance(turn, dict) or k not in turn]
        if missing:
            print(json.dumps({"error": f"line {number}: missing {missing[0]!r}"}), flush=True)
            continue
        p = recognizer.push(str(turn["speaker"]), str(turn["text"]), str(turn.get("conversation", "default")))
        print(json.dumps({"conversation": p.conversation, "turn": p.turn, "speaker": p.speaker, "label": p.label,
                          "probabilities": {k: round(v, 6) for k, v in p.probabilities.items()},
                          "latency_ms": round(p.latency_ms, 3)}), flush=True)
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
