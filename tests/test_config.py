"""Experiment files: every shipped one resolves to a RunConfig; flags override; runs write theirs."""

from __future__ import annotations

import pytest

from erc_distill.cli import _apply_config_file, _run_option_names, build_parser, main, run_config
from erc_distill.config import config_names, load_config_file
from erc_distill.errors import DataError
from erc_distill.pipeline import Run


def parse(*argv: str):
    parser = build_parser()
    _apply_config_file(parser, list(argv))
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("name", config_names())
def test_every_shipped_config_resolves(name):
    cfg = run_config(parse("--config", name))
    assert cfg.student and cfg.loss.weights and cfg.student_context.max_len > 0


def test_the_shipped_recipe_keeps_the_cached_teacher(tmp_path):
    cfg = run_config(parse("--config", "meld-mpnet-minilm"))
    assert Run(cfg, tmp_path / "r", tmp_path / "c").teacher_key == "89ed079728c57c9f"  # the GPU-trained teacher


def test_flags_override_the_file():
    args = parse("--config", "meld-ce-baseline", "--seed", "2", "--epochs", "5")
    cfg = run_config(args)
    assert (cfg.student_train.seed, cfg.student_train.epochs, cfg.teacher) == (2, 5, None)
    stage = parse("distill", "--config", "meld-plain-baseline")
    assert run_config(stage).student_context.prompt_template is None


def test_unknown_option_names_file_and_key(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("student: minilm-l6\nlearning_rate: 1e-4\n")
    with pytest.raises(DataError, match="field 'learning_rate'"):
        load_config_file(bad, _run_option_names())
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        load_config_file("nope", _run_option_names())


def test_a_run_writes_a_config_that_repeats_it(fixture_data, tmp_path):
    argv = ["--teacher", "none", "--student", "tiny", "--loss", "ce=1", "--data-dir", str(fixture_data),
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--batch-size", "4", "--max-len", "64", "--quantize-methods", "ort-dynamic", "--seed", "3"]
    assert main(argv) == 0
    again = parse("--config", str(tmp_path / "run" / "config.yaml"))
    assert run_config(again) == run_config(parse(*argv))
