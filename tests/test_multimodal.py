"""The multimodal run end to end on tiny models and the fixture corpus: the text teacher teaches an audio and
a visual student (cross-modal KD, joined by example id), fusion heads are trained on the frozen features,
the fused student is exported with parity and timed; text-only turns and missing modalities work."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
Image = pytest.importorskip("PIL.Image")

from erc_distill.cli import main  # noqa: E402
from erc_distill.data.corpora import load_corpus  # noqa: E402
from erc_distill.errors import ConfigError  # noqa: E402

MELD_FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
LABEL_HZ = {"neutral": 220, "joy": 330, "surprise": 440, "anger": 550, "sadness": 660, "disgust": 770, "fear": 880}


def make_media(data_dir: Path, root: Path, skip_video: set[str] = frozenset()) -> tuple[Path, Path]:
    """Per fixture turn: a 16 kHz WAV tone (pitch by label) and a folder of 3 PNG frames (colour by label);
    turns in ``skip_video`` get speech only."""
    media, frames = root / "media", root / "frames"
    rng = np.random.default_rng(0)
    for split, folder in MELD_FOLDERS.items():
        (media / folder).mkdir(parents=True, exist_ok=True)
        for d in load_corpus("meld", split, data_dir).dialogues:
            for t in d.turns:
                stem = Path(t.media.path).stem
                hz = LABEL_HZ[t.label]
                x = np.arange(int(0.6 * 16000)) / 16000
                sf.write(media / folder / f"{stem}.wav", (0.3 * np.sin(2 * np.pi * hz * x)).astype(np.float32), 16000)
                if t.example_id in skip_video:
                    continue
                out = frames / folder / stem
                out.mkdir(parents=True)
                colour = np.array([hz % 256, (hz * 3) % 256, (hz * 7) % 256], np.uint8)
                for k in range(3):
                    img = np.clip(colour + rng.integers(-20, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(out / f"{stem}_frame{k}.png")
    return media, frames


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A finished tiny text run on the fixture corpus, its teacher's output file, and media for every turn."""
    import shutil

    from erc_distill.data.corpora import CORPORA

    root = tmp_path_factory.mktemp("mm")
    data = root / "data"
    spec = CORPORA["meld"]
    (data / spec.folder).mkdir(parents=True)
    fixtures = Path(__file__).parent / "fixtures"
    for split, file in spec.files.items():
        shutil.copyfile(fixtures / f"meld_{split}.csv", data / spec.folder / file)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        common = ["--teacher", "tiny", "--student", "tiny", "--data", "meld", "--data-dir", str(data), "--out",
                  str(root / "run"), "--cache-dir", str(root / "cache"), "--epochs", "1", "--teacher-epochs", "1",
                  "--batch-size", "2", "--max-len", "64", "--teacher-max-len", "64"]
        assert main(["export", *common]) == 0
        outputs = root / "teacher.npz"
        assert main(["teacher-outputs", *common, "--to", str(outputs)]) == 0
    media, frames = make_media(data, root, skip_video={"meld/dev/0/1", "meld/test/0/2"})
    return {"root": root, "data": data, "run": root / "run", "outputs": outputs, "media": media, "frames": frames,
            "common": common}


def mm_config(run: dict, out: Path, **changes):
    from erc_distill.fusion.multimodal import BranchTrainConfig, MultimodalConfig

    branch = BranchTrainConfig(epochs=1, batch_size=4, min_train_turns=2, patience=1)
    cfg = MultimodalConfig(text_run=run["run"], out=out, media_dir=run["media"],
                           frames_dir=run["frames"], teacher_outputs=(run["outputs"],),
                           audio_student="tiny-whisper", visual_student="tiny-vit", fusion=("asf", "mag", "mult"),
                           audio_train=branch, visual_train=branch, fusion_epochs=2, data_dir=run["data"],
                           profile_turns=3, threads=1, face_detector="none")
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def finished(text_run, tmp_path_factory):
    from erc_distill.fusion.multimodal import MultimodalRun

    out = tmp_path_factory.mktemp("mmrun")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(text_run["root"] / "xdg"))
        metrics = MultimodalRun(mm_config(text_run, out), log=lambda _: None, progress=False).run()
    return out, metrics


def test_students_learn_from_the_text_teacher(finished):
    out, m = finished
    for kind in ("audio", "visual"):
        info = m["branches"][kind]
        assert info["trained"] is True, info
        assert info["loss"] == {"ce": 1.0, "dist": 1.0}  # the cross-modal term, from the teacher's logits
        assert info["train_turns"] == 9
        assert (out / kind / "model").is_dir()
    assert m["branches"]["visual"]["dev_turns"] == 1  # one dev turn has no video: left out, counted
    assert m["counts"]["dev"] == {"turns": 2, "with_media": 2, "audio": 2, "visual": 1}


def test_a_trained_teacher_also_teaches_through_its_features(text_run, tmp_path, monkeypatch):
    """Without output files the text run's own teacher cache (logits + features) teaches: TelME's feature
    term joins CE + DIST, through a projection to the teacher's width."""
    from erc_distill.fusion.multimodal import MultimodalRun

    monkeypatch.setenv("XDG_CACHE_HOME", str(text_run["root"] / "xdg"))
    cfg = mm_config(text_run, tmp_path, teacher_outputs=(), visual_student=None, fusion=("mag",))
    run = MultimodalRun(cfg, log=lambda _: None, progress=False)
    assert run.teacher_files == () and run.run_cache is not None
    model, _, info = run.branch("audio")
    assert info["trained"] is True and info["loss"] == {"ce": 1.0, "dist": 1.0, "feature": 0.5}


def test_teacher_targets_are_joined_by_example_id(text_run, tmp_path):
    """The visual batch's teacher logits are the teacher file's rows for the same turns, whatever the order."""
    from erc_distill.distill.outputs import read_teacher_outputs
    from erc_distill.fusion.multimodal import MultimodalRun

    run = MultimodalRun(mm_config(text_run, tmp_path), log=lambda _: None, progress=False)
    model = run.new_branch("visual")
    dm = run.branch_data("visual", model, run.teacher_targets(), batch_size=4, seed=0)
    dm.setup("fit")
    file = read_teacher_outputs(text_run["outputs"])
    row = {i: k for k, i in enumerate(file.ids)}
    seen = 0
    for batch in dm.train_dataloader():
        want = torch.from_numpy(np.stack([file.logits[row[i]] for i in batch.example_ids]).astype(np.float32))
        # the cache holds the (ensemble's) log-probabilities: the same distribution as the file's logits
        np.testing.assert_allclose(batch.teacher["logits"].log_softmax(-1).numpy(), want.log_softmax(-1).numpy(),
                                   atol=1e-3)
        seen += len(batch)
    assert seen == 9


def test_every_head_is_scored_with_and_without_media(finished):
    _, m = finished
    scores = m["scores"]
    for head in ("asf", "mag", "mult"):
        for name in (f"fused {head} s0", f"fused {head} s0, media hidden"):
            row = scores[name]
            assert set(row) == {"media_dev", "media_test", "all_dev", "all_test"}
            assert all(0 <= v <= 100 for v in row.values())
    assert {"text student", "text teacher", "audio student alone", "visual student alone"} <= set(scores)


def test_fused_student_onnx_matches_pytorch_and_is_timed(finished):
    out, m = finished
    edge = m["edge"]
    assert edge["branches"] == ["text", "audio", "visual"]
    assert edge["parity_turns"] > 0 and edge["parity_max_abs"] <= 1e-3
    for f in ("text/model.onnx", "text/model-features-int8.onnx", "audio/model-features-int8.onnx",
              "visual/model.onnx", "fusion.onnx", "edge.json"):
        assert (out / "edge" / f).is_file(), f
    paths = m["latency"]["paths"]
    assert {"text only", "text + speech", "text + speech + face frames"} <= set(paths)
    assert {"context + tokenize", "text graph", "speech decode", "speech log-mel + graph", "frames decode",
            "face crop", "visual graph", "fusion graph"} <= set(m["latency"]["parts_p50_ms"])
    assert all(p["p99_ms"] >= p["p50_ms"] > 0 for p in paths.values())
    report = (out / "report.md").read_text()
    assert "media hidden" in report and "p99 ms" in report and "Where the time goes" in report


def test_runtime_answers_text_only_and_partial_turns(finished, text_run):
    """A turn with no speech and no face, speech only, frames only, and both: each a distribution; masks
    change the answer only through the fusion head (the text-only answer equals the head with both hidden)."""
    from erc_distill.fusion.edge import FusedRuntime, load_turn_media

    out, _ = finished
    rt = FusedRuntime(out / "edge", threads=1, int8=False, face_detector="none")
    dialogue = load_corpus("meld", "test", text_run["data"]).dialogues[0].turns
    audio, frames = load_turn_media(dialogue[0], text_run["media"], text_run["frames"], rt.frames)
    assert audio is not None and frames is not None
    results = {k: rt.classify(dialogue[:1], *v) for k, v in {
        "text": (None, None), "speech": (audio, None), "face": (None, frames), "both": (audio, frames)}.items()}
    assert results["text"].used == ("text",) and results["both"].used == ("text", "audio", "visual")
    assert results["face"].used == ("text", "visual")
    for r in results.values():
        assert r.probabilities.shape == (7,) and abs(float(r.probabilities.sum()) - 1) < 1e-5
    # the text-only answer is the head with both modalities masked: zeros in, whatever the branch features
    t = rt.text_features(dialogue[:1])
    z = rt.fusion_session.run(None, {"text": t, "audio": np.full((1, rt.dims[0]), 5, np.float32),
                                     "visual": np.full((1, rt.dims[1]), -5, np.float32),
                                     "audio_mask": np.zeros(1, np.float32), "visual_mask": np.zeros(1, np.float32)})[0]
    np.testing.assert_allclose(z, rt.logits(dialogue[:1]), atol=1e-5)
    # the branches take turns on the same cores: no session's threads spin after its run
    for session in (rt.text_session, rt.audio_session, rt.visual_session, rt.fusion_session, rt.audio.session):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_rerun_resumes_without_training(finished, text_run, monkeypatch):
    from erc_distill.fusion import multimodal
    from erc_distill.fusion.multimodal import MultimodalRun

    out, first = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished step was trained again")

    monkeypatch.setattr("erc_distill.distill.train.train_model", no_training)
    monkeypatch.setattr("erc_distill.fusion.train.train_fusion", no_training)
    monkeypatch.setenv("XDG_CACHE_HOME", str(text_run["root"] / "xdg"))
    assert multimodal  # imported for the patch targets
    again = MultimodalRun(mm_config(text_run, out), log=lambda _: None, progress=False).run()
    assert again["scores"] == first["scores"]


def test_bad_multimodal_options_are_named_before_training(text_run, tmp_path, capsys):
    from erc_distill.fusion.multimodal import MultimodalRun

    with pytest.raises(ConfigError, match="not a finished text run"):
        MultimodalRun(mm_config(text_run, tmp_path, text_run=tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="no media"):
        MultimodalRun(mm_config(text_run, tmp_path, media_dir=None, frames_dir=None))
    base = ["multimodal", "--text-run", str(text_run["run"]), "--out", str(tmp_path / "o"),
            "--media-dir", str(text_run["media"])]
    assert main([*base, "--fusion", "concat"]) == 1
    assert "unknown fusion head 'concat'" in capsys.readouterr().err
    assert main([*base, "--modality-dropout", "1.5"]) == 1
    assert "--modality-dropout" in capsys.readouterr().err
    assert main(["multimodal", "--text-run", str(text_run["run"]), "--out", str(tmp_path / "o"),
                 "--media-dir", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_main_command_runs_the_multimodal_stage(text_run, monkeypatch):
    """`erc-distill ... --audio-student --fusion --media-dir`: the text run, then the multimodal stage in
    RUN/multimodal (here the fixture is below the branches' minimum, so the pretrained features are used)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(text_run["root"] / "xdg"))
    args = [*text_run["common"], "--audio-student", "tiny-whisper", "--visual-student", "none", "--fusion", "mag",
            "--media-dir", str(text_run["media"]), "--quantize-methods", "ort-dynamic"]
    assert main(args) == 0
    mm = text_run["run"] / "multimodal"
    m = json.loads((mm / "metrics.json").read_text())
    assert m["branches"]["audio"]["trained"] is False and "too few" in m["branches"]["audio"]["why"]
    assert "teacher-cache" in m["teacher_outputs"][0]  # the run's own teacher (its cache) is the text teacher
    assert "fused mag s0" in m["scores"] and m["edge"]["branches"] == ["text", "audio"]


def _png(rgb: tuple[int, int, int]) -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), rgb, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_stream_with_the_fused_student_takes_speech_and_frames(finished, text_run):
    """`erc-distill stream --edge`: text-only turns as before, speech as PCM, frames as base64 images or a
    folder; undecodable frames mask the visual input, malformed fields are line errors; the stream goes on."""
    import base64

    from erc_distill.fusion.edge import FusedRuntime
    from erc_distill.runtime import StreamingRecognizer
    from erc_distill.runtime.stream import serve_lines

    out, _ = finished
    fused = FusedRuntime(out / "edge", threads=1, face_detector="none")
    rec = StreamingRecognizer(fused.text, fused=fused)
    pcm = base64.b64encode((0.3 * np.sin(np.arange(8000) / 5) * 32767).astype("<i2").tobytes()).decode()
    folder = next((text_run["frames"] / "output_repeated_splits_test").iterdir())
    lines = [
        {"conversation": "c", "speaker": "Ross", "text": "Hi."},
        {"conversation": "c", "speaker": "Rachel", "text": "Oh my God!", "pcm16": pcm, "sample_rate": 16000,
         "frames": [_png((200, 10, 10)), _png((190, 20, 10)), _png((180, 30, 10))]},
        {"conversation": "c", "speaker": "Ross", "text": "What?", "video_path": str(folder)},
        {"conversation": "c", "speaker": "Ross", "text": "Well.", "frames": [base64.b64encode(b"not an image").decode()]},
        {"conversation": "c", "speaker": "Ross", "text": "x", "frames": "abc"},
        {"conversation": "c", "speaker": "Ross", "text": "y", "frames": [_png((0, 0, 0))] * 65},
    ]
    got = []
    summary = serve_lines(rec, [json.dumps(x) for x in lines], got.append)
    rows = [json.loads(x) for x in got]
    assert rows[0]["modalities"] == ["text"] and "visual" not in rows[0]
    assert rows[1]["modalities"] == ["text", "audio", "visual"] and rows[1]["visual"] == {"frames": 3, "faces": 0}
    assert rows[1]["audio"]["label"] in fused.labels  # the speech student's own answer is reported too
    assert rows[2]["modalities"] == ["text", "visual"] and rows[2]["turn"] == 2
    assert rows[3]["modalities"] == ["text"] and "not a readable image" in rows[3]["visual"]["error"]
    assert "list of base64" in rows[4]["error"] and "over the limit of 64" in rows[5]["error"]
    assert summary["predictions"] == 4 and summary["errors"] == 2
    assert summary["visual"] == 2 and summary["visual_masked"] == 1 and summary["audio"] == 1
    # the fused answer of a text-only turn is the head's with both modalities masked (not the text bundle's)
    np.testing.assert_allclose([rows[0]["probabilities"][k] for k in fused.labels],
                               FusedRuntime.__dict__["classify"](fused, [_Turn("Ross", "Hi.")]).probabilities, atol=1e-5)


class _Turn:
    def __init__(self, speaker: str, text: str) -> None:
        self.speaker, self.text = speaker, text


def test_frames_need_a_visual_branch(text_run, finished):
    from erc_distill.errors import DataError
    from erc_distill.runtime import Bundle, StreamingRecognizer
    from erc_distill.runtime.stream import serve_lines

    rec = StreamingRecognizer(Bundle.load(text_run["run"] / "bundle"))
    with pytest.raises(DataError, match="no visual branch"):
        rec.push("Ross", "Hi.", frames=[np.zeros((8, 8, 3), np.uint8)])
    got = []
    serve_lines(rec, [json.dumps({"speaker": "Ross", "text": "Hi.", "frames": [_png((1, 2, 3))]})], got.append)
    assert "no visual branch" in json.loads(got[0])["error"]
    assert rec.stats()["open"] == 0  # the bad turn left no conversation behind


def test_stream_edge_flag_names_a_wrong_folder(text_run, capsys):
    assert main(["stream", "--edge", str(text_run["run"])]) == 1
    assert "not a fused student's edge folder" in capsys.readouterr().err


def test_video_in_train_only_leaves_dev_and_test_text_and_speech(text_run, tmp_path, monkeypatch):
    """Real frames exist for a few train dialogues only (the shared dia65): the visual student is left as it
    is (no dev turn to choose it on), dev / test turns carry no visual input, and the run still finishes."""
    from erc_distill.fusion.multimodal import MultimodalRun

    monkeypatch.setenv("XDG_CACHE_HOME", str(text_run["root"] / "xdg"))
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "train_splits").symlink_to(text_run["frames"] / "train_splits")
    cfg = mm_config(text_run, tmp_path / "out", frames_dir=frames, fusion=("mag",), profile_turns=2)
    m = MultimodalRun(cfg, log=lambda _: None, progress=False).run()
    assert m["branches"]["visual"]["trained"] is False and "0 dev" in m["branches"]["visual"]["why"]
    assert m["counts"]["train"]["visual"] == 9 and m["counts"]["dev"]["visual"] == 0 == m["counts"]["test"]["visual"]
    assert "visual student alone" not in m["scores"]


def test_careless_multimodal_flags_are_named(text_run, tmp_path, capsys):
    base = ["multimodal", "--text-run", str(text_run["run"]), "--out", str(tmp_path / "o"),
            "--media-dir", str(text_run["media"])]
    with pytest.raises(SystemExit):
        main([*base, "--seeds", "-1"])
    assert "a seed is from 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--modality-dropout", "abc"])
    assert "invalid float value" in capsys.readouterr().err
    assert main([*base, "--teacher-outputs", str(tmp_path / "missing.npz")]) == 1
    assert "missing.npz not found" in capsys.readouterr().err
    a_file = tmp_path / "frames.txt"
    a_file.write_text("not a folder")
    assert main([*base, "--frames-dir", str(a_file)]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_careless_stream_lines_get_an_error_each_and_the_stream_goes_on(finished, text_run):
    import base64
    import io

    from erc_distill.errors import DataError
    from erc_distill.fusion.edge import FusedRuntime
    from erc_distill.runtime import StreamingRecognizer
    from erc_distill.runtime.stream import serve_lines

    out, _ = finished
    fused = FusedRuntime(out / "edge", threads=1, face_detector="none")
    rec = StreamingRecognizer(fused.text, fused=fused)
    buf = io.BytesIO()
    Image.new("1", (5000, 4000)).save(buf, format="PNG")  # a pixel bomb, small on the wire
    bomb = base64.b64encode(buf.getvalue()).decode()
    turn = {"conversation": "c", "speaker": "Ross", "text": "Hi."}
    lines = [
        {**turn, "frames": ["***not base64***"]},
        {**turn, "frames": []},
        {**turn, "video_path": 7},
        {**turn, "frames": [_png((1, 2, 3))], "video_path": "x"},
        {**turn, "video_path": str(text_run["root"] / "no-such-clip.mp4")},
        {**turn, "frames": [bomb]},
        turn,
    ]
    got = []
    summary = serve_lines(rec, [json.dumps(x) for x in lines], got.append)
    rows = [json.loads(x) for x in got]
    assert "not base64" in rows[0]["error"] and "empty list" in rows[1]["error"]
    assert "must be a string" in rows[2]["error"] and "not both" in rows[3]["error"]
    assert rows[4]["modalities"] == ["text"] and "no such video" in rows[4]["visual"]["error"]
    assert rows[5]["modalities"] == ["text"] and "over 4096x4096" in rows[5]["visual"]["error"]
    assert rows[6]["turn"] == 2  # the line errors left the conversation as it was
    assert summary["errors"] == 4 and summary["visual_masked"] == 2
    for bad in (np.zeros((2, 8, 8, 3), np.float32), [np.zeros((8, 8), np.uint8)], "frames", []):
        with pytest.raises(DataError):
            rec.push("Ross", "Hi.", "d", frames=bad)
    assert "d" not in rec.conversations


def test_a_run_killed_midway_resumes_without_retraining_what_it_finished(text_run, tmp_path, monkeypatch):
    from erc_distill.fusion import train as fusion_train
    from erc_distill.fusion.multimodal import MultimodalRun

    monkeypatch.setenv("XDG_CACHE_HOME", str(text_run["root"] / "xdg"))
    cfg = mm_config(text_run, tmp_path, visual_student=None, fusion=("mag",), profile_turns=2)
    real = fusion_train.train_fusion

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run is killed while the fusion head trains

    monkeypatch.setattr(fusion_train, "train_fusion", killed)
    with pytest.raises(KeyboardInterrupt):
        MultimodalRun(cfg, log=lambda _: None, progress=False).run()
    assert (tmp_path / "audio" / "done.json").is_file() and (tmp_path / "features" / "done.json").is_file()
    monkeypatch.setattr(fusion_train, "train_fusion", real)

    def no_training(*args, **kwargs):
        raise AssertionError("the finished speech student was trained again")

    monkeypatch.setattr("erc_distill.distill.train.train_model", no_training)
    m = MultimodalRun(cfg, log=lambda _: None, progress=False).run()
    assert "fused mag s0" in m["scores"]
