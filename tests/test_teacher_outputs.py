"""Teacher output files, ensembles of them, and distilling from them (with the transfer set) on tiny models."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from erc_distill.cli import main
from erc_distill.distill.cache import TeacherCache
from erc_distill.distill.outputs import (
    check_compatible,
    ensemble,
    import_as_cache,
    read_teacher_outputs,
    write_teacher_outputs,
)
from erc_distill.errors import ConfigError
from erc_distill.report.metrics import compute_metrics

LABELS = ["neutral", "joy", "sadness"]


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _write(path, ids, logits, **meta):
    meta = {"labels": LABELS, "corpus": "meld", "data_fingerprint": "abc", "teacher": "t", **meta}
    return read_teacher_outputs(write_teacher_outputs(path, ids, ["train"] * len(ids), logits, meta))


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_ensemble_logits_temper_to_the_weighted_mean_of_tempered_probabilities(tmp_path, tau):
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(5, 3)) * 3, rng.normal(size=(5, 3)) * 3
    ids = [f"meld/train/0/{i}" for i in range(5)]
    a, b = _write(tmp_path / "a.npz", ids, za), _write(tmp_path / "b.npz", ids[::-1], zb[::-1])
    za, zb = a.logits, b.logits[::-1]  # as stored (fp16), b's rows reversed back into a's order
    got_ids, z = ensemble([a, b], [1, 3], tau)
    assert got_ids == ids  # joined by id, not by row
    want = 0.25 * _softmax(za / tau) + 0.75 * _softmax(zb / tau)
    assert np.allclose(_softmax(z / tau), want, atol=1e-5)
    _, single = ensemble([a], (), tau)
    assert np.allclose(_softmax(single / tau), _softmax(za / tau), atol=1e-5)


def test_ensemble_names_the_file_that_lacks_an_example(tmp_path):
    a = _write(tmp_path / "a.npz", ["x", "y"], np.zeros((2, 3)))
    b = _write(tmp_path / "b.npz", ["x"], np.zeros((1, 3)))
    with pytest.raises(ConfigError, match=r"b\.npz: no outputs for example 'y'"):
        ensemble([a, b], (), 1.0, ["x", "y"])
    with pytest.raises(ConfigError, match="2 weights for 1"):
        ensemble([a], [1, 1], 1.0)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_teacher_outputs(tmp_path / "none.npz")
    good = _write(tmp_path / "g.npz", ["x"], np.zeros((1, 3)))
    (tmp_path / "g.json").unlink()
    with pytest.raises(ConfigError, match="g.json is missing"):
        read_teacher_outputs(good.path)
    (tmp_path / "h.npz").write_bytes(b"not a zip")
    (tmp_path / "h.json").write_text(json.dumps({"format": "erc-distill-teacher-outputs/1", "labels": LABELS}))
    with pytest.raises(ConfigError, match="h.npz: not a teacher-outputs file"):
        read_teacher_outputs(tmp_path / "h.npz")
    with pytest.raises(ValueError, match="non-finite"):
        _write(tmp_path / "n.npz", ["x"], np.full((1, 3), np.nan))
    other = _write(tmp_path / "o.npz", ["x"], np.zeros((1, 3)), data_fingerprint="zzz")
    with pytest.raises(ConfigError, match="other meld files"):
        check_compatible([other], "meld", LABELS, "abc")
    with pytest.raises(ConfigError, match="made without the transfer source"):
        check_compatible([good], "meld", LABELS, "abc", ("emorynlp",))
    with pytest.raises(ConfigError, match="labels"):
        check_compatible([good], "meld", ["a", "b", "c"], "abc")


def test_careless_files_are_named_not_tracebacks(tmp_path):
    good = _write(tmp_path / "g.npz", ["x", "y"], np.zeros((2, 3)))
    cut = tmp_path / "cut.npz"  # a copy killed midway
    cut.write_bytes(good.path.read_bytes()[: good.path.stat().st_size // 2])
    (tmp_path / "cut.json").write_bytes((tmp_path / "g.json").read_bytes())
    with pytest.raises(ConfigError, match="cut.npz: not a teacher-outputs file"):
        read_teacher_outputs(cut)
    (tmp_path / "g.json").write_bytes(b'{"format": "\xff\xfe"}' + b"\xff")  # not UTF-8
    with pytest.raises(ConfigError, match="g.npz: not a teacher-outputs file"):
        read_teacher_outputs(good.path)
    for labels in (7, [], [1, 2, 3]):
        (tmp_path / "g.json").write_text(json.dumps({"format": "erc-distill-teacher-outputs/1", "labels": labels}))
        with pytest.raises(ConfigError, match="'labels' must be a non-empty list"):
            read_teacher_outputs(good.path)
    (tmp_path / "g.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="is not a erc-distill-teacher-outputs/1 description"):
        read_teacher_outputs(good.path)
    with pytest.raises(ValueError, match="beyond float16"):  # huge logits would not survive the fp16 file
        _write(tmp_path / "big.npz", ["x"], np.full((1, 3), 1e6))
    with pytest.raises(ConfigError, match="written as a .npz"):
        _write(tmp_path / "t.txt", ["x"], np.zeros((1, 3)))


def test_import_as_cache_is_a_teacher_cache_of_the_ensemble(tmp_path):
    z = np.arange(12, dtype=np.float32).reshape(4, 3) / 4
    a = _write(tmp_path / "a.npz", ["t0", "t1", "d0", "d1"], z)
    folder = import_as_cache([a], (), 2.0, {"train": ["t1", "t0"], "dev": ["d0"]}, tmp_path / "c", {"k": 1})
    cache = TeacherCache(folder)
    cache.check()
    got = cache.lookup(["t0", "d0"])["logits"].numpy()
    assert np.allclose(_softmax(got / 2), _softmax(a.logits[[0, 2]] / 2), atol=1e-5)
    assert "features" not in cache.lookup(["t0"])
    mtime = (folder / "train.logits.npy").stat().st_mtime_ns
    import_as_cache([a], (), 2.0, {"train": ["t1", "t0"], "dev": ["d0"]}, tmp_path / "c", {"k": 1})
    assert (folder / "train.logits.npy").stat().st_mtime_ns == mtime  # same key: reused


def _argv(fixture_data, tmp_path, *extra):
    return ["--teacher", "tiny", "--student", "tiny", "--data", "meld", "--data-dir", str(fixture_data),
            "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "4",
            "--max-len", "64", "--teacher-max-len", "64", *extra]


def test_teacher_outputs_then_a_student_distilled_from_their_ensemble_with_the_transfer_set(fixture_data, tmp_path,
                                                                                           capsys):
    files = []
    for seed in ("0", "1"):
        f = tmp_path / f"t{seed}.npz"
        assert main(["teacher-outputs", *_argv(fixture_data, tmp_path, "--teacher-train.seed", seed, "--transfer",
                                               "emorynlp", "mask", "short", "--out", str(tmp_path / f"t{seed}"),
                                               "--to", str(f))]) == 0
        files.append(str(f))
    t = read_teacher_outputs(files[0])
    assert {"train", "dev", "test", "transfer"} == set(t.splits)
    assert all(i.split("/")[0] in ("emorynlp-transfer", "meld-mask", "meld-short")
               for i, s in zip(t.ids, t.splits) if s == "transfer")
    assert t.meta["transfer"]["sources"] == ["emorynlp", "mask", "short"] and "dev" in t.meta["metrics"]
    run = tmp_path / "student"
    assert main(["evaluate", *_argv(fixture_data, tmp_path, "--teacher-outputs", *files, "--loss", "ce=1,kd=1",
                                    "--transfer", "emorynlp", "--out", str(run))]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2 output file(s)" in out and "transfer set emorynlp" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["teacher"]["teachers"] == ["t0", "t1"] and "test" in metrics["teacher"]
    assert (run / "predictions_teacher_test.csv").is_file()
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert "teacher" not in manifest or manifest["teacher"].get("status") != "done"  # no teacher trained
    cache = TeacherCache(manifest["cache"]["artifacts"]["cache"])
    train_ids = [i for i in cache.row if cache.row[i][0] == "train"]
    assert any(i.startswith("emorynlp-transfer/") for i in train_ids)
    assert not any(i.startswith(("meld-mask/", "meld-short/")) for i in train_ids)  # only the asked source
    assert not any(i.startswith(("meld/dev/", "meld/test/")) for i in train_ids)
    # the same command again: every stage up to date
    assert main(["evaluate", *_argv(fixture_data, tmp_path, "--teacher-outputs", *files, "--loss", "ce=1,kd=1",
                                    "--transfer", "emorynlp", "--out", str(run))]) == 0
    assert "running" not in capsys.readouterr().out
    # score-outputs: each file and the ensemble scored like models, the same numbers as the run's rows
    assert main(["score-outputs", *files, "--data-dir", str(fixture_data), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["teachers"] for r in rows] == [["t0"], ["t1"], ["t0", "t1"]]
    assert rows[0]["dev"]["weighted_f1"] == pytest.approx(t.meta["metrics"]["dev"]["weighted_f1"], abs=1e-6)
    assert rows[2]["test"]["weighted_f1"] == pytest.approx(metrics["teacher"]["test"]["weighted_f1"], abs=1e-6)
    assert main(["score-outputs", *files, "--data-dir", str(fixture_data), "--teacher-weights", "1", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"t0 \+ t1 +1:3", out) and "best on dev:" in out and out.count("best dev") == 1
    for bad, message in ((["--teacher-weights", "1"], "1 weights for 2 files"),  # careless input: one line each
                         (["--teacher-weights", "1", "-1"], "weights >= 0"),
                         (["--teacher-weights", "0", "0"], "weights >= 0, not all 0"),
                         ([str(tmp_path / "none.npz")], "no such file")):
        assert main(["score-outputs", *files, *bad, "--data-dir", str(fixture_data)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    other = tmp_path / "other-data"  # the files were made on other MELD files: named, not scored
    (other / "meld").mkdir(parents=True)
    for f in (fixture_data / "meld").iterdir():
        (other / "meld" / f.name).write_bytes(f.read_bytes() + (b"\n" if f.name.startswith("dev") else b""))
    assert main(["score-outputs", files[0], "--data-dir", str(other)]) == 1
    assert "t0.npz: made on other meld files" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--teacher-outputs", "a.npz", "--loss", "ce=1,dist=1,feature=0.5"], "need the teacher models' features"),
    (["--teacher-outputs", "a.npz", "--teacher-weights", "1", "2", "--loss", "ce=1,kd=1"], "2 weights for 1"),
    (["--transfer", "emorynlp", "--teacher", "none", "--loss", "ce=1"], "transfer turns have no labels"),
    (["--transfer", "emorynlp", "--data", "emorynlp", "--loss", "ce=1,kd=1"], "made for MELD"),
    (["--transfer", "nope"], "nope"),
    (["--teacher-outputs", "missing.npz", "--loss", "ce=1,kd=1"], "missing.npz: no such file"),
    (["--teacher-outputs", "a.npz", "--loss", "ce=1"], "would be ignored"),
    (["--teacher-outputs", "a.npz", "--teacher-weights", "0", "--loss", "ce=1,kd=1"], "all 0"),
    (["--teacher-outputs", "a.npz", "--loss", "ce=1,kd=1,feature=0"], "need the teacher models' features"),
    (["--teacher-outputs", "a.npz", "--teacher-weights", "-1", "--loss", "ce=1,kd=1"], "--teacher-weights"),
    (["--teacher-outputs", "a.npz", "--teacher-weights", "x", "--loss", "ce=1,kd=1"], "--teacher-weights"),
])
def test_bad_teacher_output_and_transfer_settings_are_one_line_errors(fixture_data, tmp_path, capsys, extra, message):
    assert main(["distill", *_argv(fixture_data, tmp_path, "--out", str(tmp_path / "r")), *extra]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_teacher_outputs_needs_a_teacher(fixture_data, tmp_path, capsys):
    assert main(["teacher-outputs", *_argv(fixture_data, tmp_path, "--teacher", "none", "--loss", "ce=1",
                                           "--out", str(tmp_path / "r"), "--to", str(tmp_path / "x.npz"))]) == 1
    assert "needs a teacher" in capsys.readouterr().err
    assert main(["teacher-outputs", *_argv(fixture_data, tmp_path, "--out", str(tmp_path / "r"),
                                           "--to", str(tmp_path / "x.txt"))]) == 1
    assert "written as a .npz file" in capsys.readouterr().err  # said before any training
    assert not (tmp_path / "r" / "manifest.json").exists() or "teacher" not in json.loads(
        (tmp_path / "r" / "manifest.json").read_text())["stages"]


def test_a_trained_teacher_labels_the_transfer_turns_too(fixture_data, tmp_path):
    run = tmp_path / "r"
    assert main(["distill", *_argv(fixture_data, tmp_path, "--transfer", "emorynlp", "mask", "--loss", "ce=1,kd=1",
                                   "--out", str(run))]) == 0
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    cache = TeacherCache(stages["cache"]["artifacts"]["cache"])
    assert any(i.startswith("emorynlp-transfer/") for i in cache.row)
    assert any(i.startswith("meld-mask/") for i in cache.row)


def test_output_files_from_a_slice_are_refused_for_the_whole_corpus(fixture_data, tmp_path, capsys):
    f = tmp_path / "q.npz"
    assert main(["teacher-outputs", *_argv(fixture_data, tmp_path, "--limit", "2", "--out", str(tmp_path / "t"),
                                           "--to", str(f))]) == 0
    assert main(["distill", *_argv(fixture_data, tmp_path, "--teacher-outputs", str(f), "--loss", "ce=1,kd=1",
                                   "--out", str(tmp_path / "s"))]) == 1
    assert "made on the first 2 dialogues" in capsys.readouterr().err


@pytest.mark.realdata
def test_the_shipped_teacher_outputs_cover_the_real_meld_and_transfer_turns(real_data):
    """The file behind `--config meld-cpu` (the README's main command) fits the real corpus: same files, every
    train / dev / test turn and every EmoryNLP transfer turn, and its recorded scores are its own argmax's."""
    from pathlib import Path

    from erc_distill.data import corpus_fingerprint, load_corpus
    from erc_distill.data.transfer import build_transfer_set

    shipped = sorted((Path(__file__).resolve().parents[1] / "bench" / "results" / "teachers").glob("*.npz"))
    assert shipped, "bench/results/teachers/ holds no teacher outputs"
    for path in shipped:
        t = read_teacher_outputs(path)
        labels = load_corpus("meld", "train", real_data).labels
        check_compatible([t], "meld", labels, corpus_fingerprint("meld", real_data), tuple(t.meta["transfer"]["sources"]),
                         {"emorynlp": corpus_fingerprint("emorynlp", real_data)})
        transfer = build_transfer_set(t.meta["transfer"]["sources"], real_data)
        assert transfer.report.fingerprint == t.meta["transfer"]["fingerprint"]
        have = set(t.ids)
        for split in ("train", "dev", "test"):
            assert {x.example_id for x in load_corpus("meld", split, real_data).turns} <= have
        assert {x.example_id for x in transfer.turns} <= have
        dev = load_corpus("meld", "dev", real_data)
        ids, z = ensemble([t], (), 1.0, [x.example_id for x in dev.turns])
        gold = torch.tensor([labels.index(x.label) for x in dev.turns])
        scored = compute_metrics(torch.from_numpy(z.argmax(-1)), gold, labels).to_dict()
        assert scored["weighted_f1"] == pytest.approx(t.meta["metrics"]["dev"]["weighted_f1"], abs=2e-3)
