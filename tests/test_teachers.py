"""Several teachers trained in one run (``--teachers`` / an experiment file's ``teachers:`` list), their ensemble
the KD target, each content-addressed and shared between runs; on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from erc_distill.cli import main
from erc_distill.config import Setting, build_config, load_config_file, quick, teacher_configs
from erc_distill.distill.cache import TeacherCache
from erc_distill.distill.outputs import ensemble, read_teacher_outputs
from erc_distill.errors import ConfigError


def _argv(fixture_data, tmp_path, *extra):
    return ["--student", "tiny", "--data", "meld", "--data-dir", str(fixture_data),
            "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "4",
            "--max-len", "64", "--teacher-max-len", "64", "--loss", "ce=1,kd=1", *extra]


def _experiment(tmp_path, teachers, **more):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"teachers": teachers, **more}))
    return path


def test_an_experiment_file_trains_each_teacher_and_distils_from_their_ensemble(fixture_data, tmp_path, capsys):
    exp = _experiment(tmp_path, [
        {"name": "spcl-s0", "teacher": "tiny", "teacher_train": {"seed": 0}},
        {"name": "utt-s1", "teacher": "tiny", "teacher_context": "utterance", "teacher_train.seed": 1,
         "teacher_loss": {"weights": {"ce": 1}}},
    ], tau=2.0)
    run = tmp_path / "run"
    assert main(["evaluate", "--config", str(exp), *_argv(fixture_data, tmp_path, "--transfer", "emorynlp",
                                                          "--out", str(run))]) == 0
    out = capsys.readouterr().out
    assert "teacher 1/2: spcl-s0" in out and "teacher 2/2: utt-s1" in out
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    members = stages["teacher"]["members"]
    assert [m["name"] for m in members] == ["spcl-s0", "utt-s1"]
    assert members[0]["key"] != members[1]["key"]  # another context and seed: another teacher
    files = [stages["teacher"]["artifacts"][f"outputs:{m['name']}"] for m in members]
    outputs = [read_teacher_outputs(f) for f in files]
    assert outputs[0].meta["teacher_context"]["max_previous_turns"] > 0
    assert outputs[1].meta["teacher_context"]["max_previous_turns"] == 0  # the utterance preset
    assert all("transfer" in o.splits for o in outputs)  # each labelled the transfer turns
    # each member is a run folder of its own holding its teacher's record
    for m in members:
        sub = json.loads((run / "teachers" / m["name"] / "manifest.json").read_text())
        assert sub["stages"]["teacher"]["key"] == m["key"] and sub["config"]["teachers"] == []
    # the KD target is the mean of the members' tempered probabilities (tau 2), joined by id
    cache = TeacherCache(stages["cache"]["artifacts"]["cache"])
    ids = sorted((i for i, (split, _) in cache.row.items() if split == "train"), key=lambda i: cache.row[i][1])
    assert any(i.startswith("emorynlp-transfer/") for i in ids)
    _, want = ensemble(outputs, (), 2.0, ids)
    got = np.asarray(cache.arrays["train"]["logits"])
    assert np.allclose(got, want, atol=1e-5)
    # scored like models: the ensemble and each member, with predictions CSVs
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"teacher", "teacher:spcl-s0", "teacher:utt-s1", "student"} <= set(metrics)
    assert metrics["teacher"]["teachers"] == ["spcl-s0", "utt-s1"]
    assert metrics["teacher:utt-s1"]["test"]["weighted_f1"] == pytest.approx(members[1]["test_weighted_f1"])
    assert (run / "predictions_teacher-spcl-s0_test.csv").is_file()
    # the same files given as --teacher-outputs make the same ensemble: the same cache key
    files_run = tmp_path / "files"
    assert main(["distill", *_argv(fixture_data, tmp_path, "--tau", "2", "--transfer", "emorynlp",
                                   "--teacher-outputs", *files, "--out", str(files_run))]) == 0
    assert json.loads((files_run / "manifest.json").read_text())["stages"]["cache"]["key"] == stages["cache"]["key"]
    capsys.readouterr()
    # rerun: everything up to date
    assert main(["evaluate", "--config", str(exp), *_argv(fixture_data, tmp_path, "--transfer", "emorynlp",
                                                          "--out", str(run))]) == 0
    assert "running" not in capsys.readouterr().out


def test_teachers_are_shared_between_runs_and_a_new_member_trains_alone(fixture_data, tmp_path, capsys):
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny", "--out", str(tmp_path / "a"))]) == 0
    capsys.readouterr()
    # another run, another student seed, one more teacher: the first is reused (model and outputs), not retrained
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny", "tiny;teacher_train.seed=7",
                                   "--seed", "3", "--teacher-weights", "2", "1", "--out", str(tmp_path / "b"))]) == 0
    out = capsys.readouterr().out
    first, second = out.split("teacher 2/2")
    first = first.split("teacher 1/2")[1]
    assert "teacher tiny-1: outputs written before, reused" in first and "[teacher]" not in first  # not loaded
    assert "trained before" not in second and "teacher outputs:" in second  # the new member trains and labels
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())["stages"]
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())["stages"]
    assert b["teacher"]["artifacts"]["outputs:tiny-1"] == a["teacher"]["artifacts"]["outputs:tiny-1"]
    assert b["teacher"]["members"][0]["key"] == a["teacher"]["members"][0]["key"]
    sub = json.loads((tmp_path / "b" / "teachers" / "tiny-2" / "manifest.json").read_text())
    assert sub["stages"]["teacher"]["status"] == "done"


def test_a_member_whose_outputs_file_was_damaged_labels_again(fixture_data, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny", "--out", str(run))]) == 0
    path = json.loads((run / "manifest.json").read_text())["stages"]["teacher"]["artifacts"]["outputs:tiny-1"]
    with open(path, "r+b") as fh:
        fh.truncate(100)
    capsys.readouterr()
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny", "--out", str(run))]) == 0
    out = capsys.readouterr().out
    assert "labelling again" in out and "teacher dev" in out
    assert "[teacher] up to date" in out.split("teacher 1/1")[1]  # the member's model is not retrained
    assert len(read_teacher_outputs(path).ids) > 0


@pytest.mark.parametrize("extra, message", [
    (["--teachers", "tiny;student=tiny"], "not a teacher-side setting"),
    (["--teachers", "tiny;bogus=1"], "unknown option"),
    (["--teachers", "tiny;teacher_epochs=0"], "must be >= 1"),
    (["--teachers", "tiny;teacher_epochs=0"], "--teachers entry 1"),
    (["--teachers", "tiny;name=a", "tiny;name=a"], "two teachers are named 'a'"),
    (["--teachers", "tiny;name=a/b"], "letters, digits"),
    (["--teachers", "tiny;seed"], "expected key=value"),
    (["--teachers", "tiny", "--teacher-outputs", "a.npz"], "not both"),
    (["--teachers", "tiny", "tiny", "--teacher-weights", "1"], "1 weights for 2 --teachers entries"),
    (["--teachers", "tiny", "--loss", "ce=1"], "would be ignored"),
    (["--teachers", "tiny;teacher=none"], "names no teacher encoder"),
    (["--teachers", "tiny;teacher=/no/such/model"], "/no/such/model"),
])
def test_bad_teacher_entries_are_one_line_errors_before_any_training(fixture_data, tmp_path, capsys, extra, message):
    assert main(["distill", *_argv(fixture_data, tmp_path, "--out", str(tmp_path / "r")), *extra]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "teachers").exists()


def test_experiment_file_entries_are_checked_and_named(tmp_path):
    bad = _experiment(tmp_path, [{"teacher": "tiny", "teacher_context.turn_template": "a;b"}], loss="ce=1,kd=1")
    with pytest.raises(ConfigError, match="';' inside a teacher setting"):
        load_config_file(bad)
    cfg = build_config(load_config_file(_experiment(tmp_path, ["tiny", {"teacher": "tiny-bert", "teacher_lr": 1e-4,
                                                                        "teacher_loss": "ce=1,supcon=0.1"}],
                                                   loss="ce=1,kd=1")))
    (n1, c1), (n2, c2) = teacher_configs(cfg)
    assert (n1, n2) == ("tiny-1", "tiny-bert-2")
    assert c2.teacher_train.optim.lr == 1e-4 and c2.teacher_loss.weights == {"ce": 1.0, "supcon": 0.1}
    assert c1.student == cfg.student and c1.teachers == () and c1.trains_teacher


def test_quick_shrinks_every_teacher_entry(tmp_path):
    cfg = build_config([Setting("teachers", ["tiny;teacher_epochs=4;teacher_context=telme;teacher_max_len=256"],
                                "test", "teachers"), Setting("loss", "ce=1,kd=1", "test", "loss")])
    (_, before), = teacher_configs(cfg)
    assert before.teacher_train.epochs == 4 and before.teacher_context.max_len == 256
    (_, after), = teacher_configs(quick(cfg))
    assert after.teacher_train.epochs == 1 and after.teacher_context.max_len == 128
    assert after.teacher_context.max_previous_turns == before.teacher_context.max_previous_turns  # still telme


def test_members_with_outputs_are_not_loaded_and_renames_refresh_the_rows(fixture_data, tmp_path, capsys):
    import shutil

    run = tmp_path / "r"
    assert main(["evaluate", *_argv(fixture_data, tmp_path, "--teachers", "tiny;name=a", "tiny;name=b;"
                                    "teacher_train.seed=2", "--out", str(run))]) == 0
    shutil.rmtree(tmp_path / "cache" / "teachers")  # the trained models are gone, their outputs are not
    capsys.readouterr()
    assert main(["evaluate", *_argv(fixture_data, tmp_path, "--teachers", "tiny;name=x", "tiny;name=y;"
                                    "teacher_train.seed=2", "--out", str(run))]) == 0
    out = capsys.readouterr().out
    assert "teacher x: outputs written before" in out and "teacher y: outputs written before" in out
    assert not (tmp_path / "cache" / "teachers").exists()  # nothing trained again
    metrics = json.loads((run / "metrics.json").read_text())
    assert {k for k in metrics if k.startswith("teacher:")} == {"teacher:x", "teacher:y"}  # no stale a / b rows
    assert metrics["teacher"]["teachers"] == ["x", "y"]


def test_yaml_entries_of_the_wrong_shape_are_named(tmp_path):
    one = build_config(load_config_file(_experiment(tmp_path, "tiny;teacher_loss=ce=1,supcon=0.1",
                                                    loss="ce=1,kd=1")))
    assert len(teacher_configs(one)) == 1  # one string is one entry, commas and all
    named = build_config(load_config_file(_experiment(tmp_path, [{"name": None, "teacher": "tiny"}],
                                                      loss="ce=1,kd=1")))
    assert teacher_configs(named)[0][0] == "tiny-1"
    for bad in ([["tiny", "tiny-bert"]], [None], [3]):
        with pytest.raises(ConfigError, match="an encoder name or a mapping"):
            load_config_file(_experiment(tmp_path, bad, loss="ce=1,kd=1"))


def test_output_files_or_teachers_need_no_teacher_flag():
    s = lambda name, value: Setting(name, value, "test", name)  # noqa: E731
    cfg = build_config([s("teacher", "none"), s("teacher_outputs", ["t.npz"]), s("loss", "ce=1,kd=1")])
    assert cfg.ensemble and not cfg.trains_teacher
    with pytest.raises(ConfigError, match="need a teacher"):
        build_config([s("teacher", "none"), s("loss", "ce=1,kd=1")])


def test_a_run_killed_after_its_first_teacher_keeps_it(fixture_data, tmp_path, capsys, monkeypatch):
    import erc_distill.stages.teacher_outputs as module

    real, calls = module.export_teacher_outputs, []

    def killed_on_the_second(ctx, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(ctx, path)

    monkeypatch.setattr(module, "export_teacher_outputs", killed_on_the_second)
    argv = ["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny;name=a", "tiny;name=b;teacher_train.seed=5",
                              "--out", str(tmp_path / "r"))]
    assert main(argv) != 0
    stages = json.loads((tmp_path / "r" / "manifest.json").read_text())["stages"]
    assert stages["teacher"]["status"] == "failed" and "cache" not in stages
    monkeypatch.setattr(module, "export_teacher_outputs", real)
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    first, second = out.split("teacher 2/2")
    assert "teacher a: outputs written before, reused" in first  # a is kept
    assert "[teacher] up to date" in second and "teacher outputs:" in second  # b's model kept, only labelled


def _wide_tiny(folder):
    """A tiny RoBERTa 48 wide (the ``tiny`` preset is 32): a teacher of another width."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from erc_distill.data.paths import user_cache_dir
    from erc_distill.modeling import tiny_encoder_folder

    tok = AutoTokenizer.from_pretrained(tiny_encoder_folder(user_cache_dir() / "models" / "tiny-v1", "roberta"))
    config = RobertaConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=520, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_feature_terms_get_one_projection_per_teacher(fixture_data, tmp_path, capsys):
    from erc_distill.distill.losses import FeatureKD, HiddenMSE, PerTeacher

    wide = _wide_tiny(tmp_path / "wide")
    loss = ["--loss", "ce=1,kd=1,feature=0.5,hidden=0.5", "--loss.hidden-layers", "1"]
    # the wide teacher alone, as a single-teacher run: its cache is the one the ensemble reads
    single = tmp_path / "single"
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teacher", str(wide), *loss, "--out", str(single))]) == 0
    run = tmp_path / "run"
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny", f"teacher={wide};name=wide", *loss,
                                   "--out", str(run))]) == 0
    out = capsys.readouterr().out
    assert "one projection each" in out and "32+48 wide" in out
    assert "mean over 2 teachers of feature(τ=1)" in out and "mean over 2 teachers of hidden" in out
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    cache = TeacherCache(stages["cache"]["artifacts"]["cache"])
    assert cache.key["feature_dims"] == [32, 48]
    members = [TeacherCache(json.loads((run / "teachers" / n / "manifest.json").read_text())["stages"]["cache"]
                            ["artifacts"]["cache"]) for n in ("tiny-1", "wide")]
    wide_alone = json.loads((single / "manifest.json").read_text())["stages"]["cache"]["artifacts"]["cache"]
    assert str(members[1].folder) == wide_alone  # shared with the single-teacher run, not computed again
    ids = json.loads((cache.folder / "dev.ids.json").read_text())
    got = cache.lookup(ids)
    assert got["features"].shape == (len(ids), 80) and got["hidden"].shape == (len(ids), 1, 80)
    for m, part in zip(members, (slice(0, 32), slice(32, 80))):  # each teacher's own features, joined by id
        assert np.allclose(got["features"][:, part], m.lookup(ids)["features"], atol=1e-3)
    # the objective: one projection per teacher (student 32 wide: identity for tiny, 32 -> 48 for wide)
    from erc_distill.config import LossConfig
    from erc_distill.distill.objective import build_objective

    objective = build_objective(LossConfig(weights={"ce": 1, "feature": 1, "hidden": 1}, hidden_layers=1), 7, 32,
                                [32, 48], student_layers=2)
    feat, hid = objective.terms["feature"], objective.terms["hidden"]
    assert isinstance(feat, PerTeacher) and [type(t) for t in feat.members] == [FeatureKD, FeatureKD]
    assert isinstance(feat.members[0].proj, torch.nn.Identity) and feat.members[1].proj.weight.shape == (48, 32)
    assert isinstance(hid, PerTeacher) and isinstance(hid.members[1], HiddenMSE) and hid.needs_hidden
    # the mean of each teacher's term on its own slice
    from erc_distill.data.datamodule import Batch
    from erc_distill.modeling import ModelOutput

    torch.manual_seed(0)
    student = ModelOutput(logits=torch.randn(5, 7), features=torch.randn(5, 32))
    t = torch.randn(5, 80)
    batch = Batch(input_ids=torch.zeros(5, 3, dtype=torch.long), attention_mask=torch.ones(5, 3, dtype=torch.long),
                  mask_index=torch.zeros(5, dtype=torch.long), labels=torch.zeros(5, dtype=torch.long),
                  example_ids=[str(i) for i in range(5)], teacher={"features": t})
    parts = [Batch(**{**batch.__dict__, "teacher": {"features": x}}) for x in (t[:, :32], t[:, 32:])]
    want = (feat.members[0](student, parts[0]) + feat.members[1](student, parts[1])) / 2
    assert torch.allclose(feat(student, batch), want)
    with pytest.raises(ValueError, match="80"):
        feat(student, Batch(**{**batch.__dict__, "teacher": {"features": t[:, :60]}}))
    weighted = PerTeacher(list(feat.members), [32, 48], [3, 1])  # --teacher-weights 3 1
    want = 0.75 * feat.members[0](student, parts[0]) + 0.25 * feat.members[1](student, parts[1])
    assert torch.allclose(weighted(student, batch), want) and "weighted mean (0.75:0.25)" in weighted.describe()
    capsys.readouterr()
    # another run of the same ensemble: its cache is complete, so no member model is loaded (even deleted ones)
    import shutil

    shutil.rmtree(tmp_path / "cache" / "teachers")
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny", f"teacher={wide};name=wide", *loss,
                                   "--seed", "1", "--out", str(tmp_path / "again"))]) == 0
    out = capsys.readouterr().out
    assert "its features for the feature terms" not in out and "[teacher] running" not in out.split("[cache]")[1]
    # outputs written by other weights than the member's model now has: refused by name, not silently mixed
    outputs_file = json.loads((run / "manifest.json").read_text())["stages"]["teacher"]["artifacts"]["outputs:wide"]
    meta = json.loads(Path(outputs_file).with_suffix(".json").read_text())
    assert meta["teacher_weights"] == wide_cache_weights(wide_alone)
    meta["teacher_weights"] = "0123456789abcdef"
    Path(outputs_file).with_suffix(".json").write_text(json.dumps(meta))
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teachers", "tiny", f"teacher={wide};name=wide", *loss,
                                   "--tau", "3", "--out", str(tmp_path / "mixed"))]) == 1
    err = capsys.readouterr().err
    assert "teacher wide: " in err and "was written by other weights (0123456789abcdef)" in err


def wide_cache_weights(cache_folder):
    return json.loads((Path(cache_folder) / "key.json").read_text())["teacher_weights"]
