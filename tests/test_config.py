"""Configuration: one schema (the dataclasses) for flags and experiment files, validated at start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from erc_distill.cli import build_parser, main, run_config
from erc_distill.config import (LEAVES, RunConfig, Setting, build_config, config_names, load_config_file,
                                to_plain)
from erc_distill.errors import ConfigError, DataError


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def cli(*pairs: tuple[str, object]) -> RunConfig:
    return build_config([Setting(n, v, "command line", "--" + n) for n, v in pairs])


@pytest.mark.parametrize("name", config_names())
def test_every_shipped_config_resolves(name):
    cfg = run_config(parse("--config", name))
    assert cfg.student and cfg.loss.weights and cfg.student_context.max_len > 0
    assert cfg.student_train.precision == "auto"  # shipped recipes let the machine choose (bf16 only if native)


def test_flags_override_the_file():
    cfg = run_config(parse("--config", "meld-ce-baseline", "--seed", "2", "--epochs", "5"))
    assert (cfg.student_train.seed, cfg.student_train.epochs, cfg.teacher) == (2, 5, None)
    assert run_config(parse("distill", "--config", "meld-plain-baseline")).student_context.prompt_template is None


def test_every_field_has_a_flag_and_the_most_specific_setting_wins():
    parser = build_parser()
    flags = {o for a in parser._actions for o in a.option_strings}
    assert {leaf.flag for leaf in LEAVES.values()} <= flags  # focal gamma, label smoothing, patience, ...
    cfg = run_config(parse("--batch-size", "8", "--teacher-train.batch-size", "4", "--loss.label-smoothing", "0.1",
                           "--teacher-loss.focal-gamma", "2", "--student-train.patience", "5"))
    assert (cfg.student_train.batch_size, cfg.teacher_train.batch_size) == (8, 4)
    assert cfg.loss.label_smoothing == 0.1 and cfg.teacher_loss.focal_gamma == 2.0
    assert cfg.student_train.patience == 5 and cfg.teacher_train.patience == 2


def test_a_preset_then_its_fields():
    cfg = run_config(parse("--context", "telme", "--max-len", "300"))
    assert cfg.student_context.speaker_style == "index" and cfg.student_context.max_len == 300
    assert run_config(parse("--context", "telme")).student_context.max_len == 512  # the preset's own budget


@pytest.mark.parametrize("flag, value, message", [
    ("--tau", "0", "must be > 0"),
    ("--epochs", "0", "must be >= 1"),
    ("--epochs", "-1", "must be >= 1"),
    ("--lr", "-1", "must be > 0"),
    ("--loss", "ce=nan", "finite"),
    ("--loss", "ce=1,bogus=1", "unknown loss 'bogus'"),
    ("--loss", "ce=0", "weight > 0"),
    ("--batch-size", "0", "must be >= 1"),
    ("--accumulate", "0", "must be >= 1"),
    ("--devices", "abc", "device indices"),
    ("--precision", "fp8", "is not one of"),
    ("--profile", "no-such-device", "unknown device profile"),
    ("--quantize-methods", "int4", "is not one of"),
    ("--max-len", "2", "max_len must be at least 4"),
    ("--data", "friends", "unknown corpus"),
    ("--teacher-train.optim.warmup-ratio", "2", "must be <= 1"),
    ("--seed", "1.5", "expected an integer"),
])
def test_bad_values_fail_before_anything_runs(flag, value, message, tmp_path, capsys):
    assert main([flag, value, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and flag in err  # one line, naming the flag
    assert not (tmp_path / "run").exists()  # nothing was started


def test_losses_that_need_a_teacher_need_one():
    with pytest.raises(ConfigError, match="need a teacher"):
        cli(("teacher", "none"), ("loss", "ce=1,dist=1"))


def test_experiment_file_errors_name_file_and_key(tmp_path, capsys):
    cases = {
        "unknown.yaml": ("learning_rate: 1e-4\n", "learning_rate: unknown option"),
        "null.yaml": ("teacher: null\nloss: ce=1\n", None),  # null teacher is 'no teacher', not a crash
        "int_loss.yaml": ("loss: 5\n", "loss: expected name=weight"),
        "nested.yaml": ("student_train:\n  optim:\n    lr: -3\n", "student_train.optim.lr: must be > 0"),
        "threads.yaml": ("epochs: 1.5\n", "epochs: expected an integer"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        if message is None:
            assert build_config(load_config_file(path)).teacher is None
            continue
        with pytest.raises(ConfigError) as err:
            build_config(load_config_file(path))
        assert str(path) in str(err.value) and message in str(err.value)
    with pytest.raises(DataError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("epochs: [1\n")
        load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config_file("nope")


def test_nested_dotted_and_alias_keys_agree(tmp_path):
    nested, dotted, alias = (tmp_path / f"{n}.yaml" for n in ("nested", "dotted", "alias"))
    nested.write_text("student_train:\n  epochs: 7\n  optim:\n    lr: 1.0e-4\n")
    dotted.write_text("student_train.epochs: 7\nstudent_train.optim.lr: 1.0e-4\n")
    alias.write_text("epochs: 7\nlr: 1.0e-4\n")
    configs = [build_config(load_config_file(p)) for p in (nested, dotted, alias)]
    assert configs[0] == configs[1] == configs[2] and configs[0].student_train.optim.lr == 1e-4


def test_a_run_writes_a_config_that_repeats_it(fixture_data, tmp_path):
    argv = ["--teacher", "none", "--student", "tiny", "--loss", "ce=1", "--data-dir", str(fixture_data),
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--batch-size", "4", "--max-len", "64", "--quantize-methods", "ort-dynamic", "--seed", "3",
            "--loss.label-smoothing", "0.05"]
    assert main(argv) == 0
    again = run_config(parse("--config", str(tmp_path / "run" / "config.yaml")))
    assert again == run_config(parse(*argv)) and again.loss.label_smoothing == 0.05
    assert to_plain(again)["loss"]["weights"] == {"ce": 1.0}


def test_help_lists_generated_flags_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['lightning'] = None\n"
            "from erc_distill.cli import build_parser\n"
            "h = build_parser().format_help(); assert '--loss.label-smoothing' in h and '--tau' in h, h")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_speech_corpus_is_refused_by_the_text_pipeline():
    with pytest.raises(ConfigError, match="ravdess is a speech corpus"):
        cli(("data", "ravdess"))


@pytest.mark.parametrize("flag, value, message", [
    ("--student-context.turn-template", "{bogus}", "unknown field {bogus}"),
    ("--student-context.turn-template", "{speaker", "write a literal brace"),
    ("--teacher-context.prompt-template", "{speaker} feels {mask} {text}", "unknown field {text}"),
])
def test_context_templates_are_checked_at_start_up(flag, value, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        cli((flag[2:].replace("-", "_"), value))


@pytest.mark.parametrize("value, ok", [("1", True), ("-1", True), ("auto", True), ("0,1", True), ("", False),
                                       ("0,", False), ("gpu0", False), ("0", False)])
def test_devices_values(value, ok):
    if ok:
        cli(("devices", value))
    else:
        with pytest.raises(ConfigError, match="--devices"):
            cli(("devices", value))
