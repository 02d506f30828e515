"""The audio branch end to end: export with parity, the audio bundle and its checks, streaming with
speech, per-clip profiling, and the whole `erc-distill report` run on a real-FLAC tone corpus."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from erc_distill.cli import main  # noqa: E402
from erc_distill.errors import BundleError, ConfigError, DataError  # noqa: E402
from erc_distill.runtime import AudioBundle, Bundle, StreamingRecognizer, open_bundle  # noqa: E402
from erc_distill.runtime.stream import serve_lines  # noqa: E402

from conftest import make_tiny_bundle, make_tone_ravdess  # noqa: E402

LABELS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")


def tone(seconds: float, hz: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    from erc_distill.audio.model import load_audio_classifier

    cache = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        torch.manual_seed(0)
        model = load_audio_classifier("tiny-whisper", LABELS)
    return model.eval()


@pytest.fixture(scope="module")
def audio_bundle_dir(audio_model, tmp_path_factory) -> Path:
    from erc_distill.export.bundle import write_audio_bundle

    return write_audio_bundle(audio_model, tmp_path_factory.mktemp("audio") / "bundle")


def test_exported_audio_student_matches_torch(audio_model, audio_bundle_dir):
    bundle = AudioBundle.load(audio_bundle_dir)
    clips = [tone(s, hz) for s, hz in ((0.5, 300), (1.3, 440), (0.9, 660))]  # one padded call, three lengths
    inputs, lengths = audio_model.prepare(clips)
    with torch.no_grad():
        expected = audio_model(inputs, lengths).logits.numpy()
    got = bundle.logits(clips)
    assert got.shape == (3, len(LABELS))
    assert np.abs(got - expected).max() < 1e-4
    alone = np.concatenate([bundle.logits([c]) for c in clips])  # padding does not leak into a clip
    assert np.abs(alone - got).max() < 1e-4
    assert bundle.labels == LABELS and bundle.preprocessing["padding"] == "own-length"


def test_bundles_know_their_modality(audio_bundle_dir, tmp_path):
    text_dir = make_tiny_bundle(tmp_path / "text")[0]
    assert isinstance(open_bundle(audio_bundle_dir), AudioBundle)
    assert isinstance(open_bundle(text_dir), Bundle)
    with pytest.raises(BundleError, match="audio bundle"):
        Bundle.load(audio_bundle_dir)
    with pytest.raises(BundleError, match="not an audio one"):
        AudioBundle.load(text_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["preprocessing"].update(hop_length=320), "not one this runtime computes"),
    (lambda m: m.update(labels=m["labels"][:-1]), "logits per clip"),
    (lambda m: m.pop("preprocessing"), "missing key"),
    (lambda m: m.update(labels=["a", "a"]), "distinct"),
])
def test_a_bad_audio_bundle_names_its_file(audio_bundle_dir, tmp_path, edit, message):
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(audio_bundle_dir, folder)
    meta = json.loads((folder / "bundle.json").read_text())
    edit(meta)
    (folder / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message) as err:
        AudioBundle.load(folder)
    assert str(folder) in str(err.value)


def test_tampered_audio_graph_is_refused(audio_bundle_dir, tmp_path):
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(audio_bundle_dir, folder)
    with open(folder / "model.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(BundleError, match="model.onnx"):
        AudioBundle.load(folder)


# ----------------------------------------------------------------------------- streaming with speech


@pytest.fixture()
def recognizer(audio_bundle_dir, tmp_path) -> StreamingRecognizer:
    text = Bundle.load(make_tiny_bundle(tmp_path / "text")[0])
    return StreamingRecognizer(text, audio_bundle=AudioBundle.load(audio_bundle_dir), max_audio_seconds=2.0)


def test_push_with_audio_carries_the_audio_prediction(recognizer):
    clip = tone(0.8)
    p = recognizer.push("Ross", "Hi!", "c", audio=clip)
    expected = recognizer.audio_bundle.probabilities([clip])[0]
    assert p.audio is not None and p.audio_error is None
    assert np.allclose([p.audio.probabilities[l] for l in LABELS], expected, atol=1e-6)
    assert p.audio.label == LABELS[int(expected.argmax())] and p.audio.seconds == pytest.approx(0.8)
    assert p.turn == 0 and p.label in recognizer.bundle.labels

    long = recognizer.push("Ross", "And more.", "c", audio=tone(3.0))  # cut to max_audio_seconds, counted
    assert long.audio.seconds == pytest.approx(2.0) and long.audio.cut_seconds == pytest.approx(1.0)
    short = recognizer.push("Ross", "Hm.", "c", audio=tone(0.01))  # masked, the text still classified
    assert short.audio is None and "at least 400" in short.audio_error and short.turn == 2
    with pytest.raises(DataError, match="mono float"):
        recognizer.push("Ross", "x", "c", audio=np.zeros((2, 800), np.float32))
    assert recognizer.conversations["c"].turns_seen == 3  # a refused turn leaves the context as it was

    plain = StreamingRecognizer(recognizer.bundle)
    with pytest.raises(DataError, match="no audio bundle"):
        plain.push("Ross", "x", audio=clip)


def _pcm16(samples: np.ndarray) -> str:
    return base64.b64encode((samples * 32767).astype("<i2").tobytes()).decode()


def test_stream_protocol_takes_pcm16_and_files(recognizer, tmp_path):
    flac = tmp_path / "turn.flac"
    sf.write(flac, tone(0.7, rate=48000, hz=330), 48000)
    lines = [
        {"speaker": "A", "text": "Hi", "pcm16": _pcm16(tone(0.6))},
        {"speaker": "A", "text": "Hi", "pcm16": _pcm16(tone(0.6, rate=48000)), "sample_rate": 48000},
        {"speaker": "B", "text": "Yes", "audio_path": str(flac)},
        {"speaker": "B", "text": "No", "audio_path": str(tmp_path / "missing.wav")},  # masked
        {"speaker": "B", "text": "No", "pcm16": "not base64!"},
        {"speaker": "B", "text": "No", "pcm16": _pcm16(tone(0.6)), "audio_path": str(flac)},
        {"speaker": "B", "text": "No", "pcm16": _pcm16(tone(0.6)), "sample_rate": 16000.5},
        {"speaker": "B", "text": "No", "sample_rate": 16000},
        {"speaker": "B", "text": "Plain"},
    ]
    out: list[dict] = []
    summary = serve_lines(recognizer, [json.dumps(x) for x in lines], lambda s: out.append(json.loads(s)))
    a16, a48, f, missing, bad64, both, rate, stray, plain = out
    assert a16["audio"]["label"] in LABELS and a16["audio"]["seconds"] == pytest.approx(0.6)
    # the 48 kHz copy is resampled to the same clip: the same answer within resampling error
    assert max(abs(a16["audio"]["probabilities"][k] - a48["audio"]["probabilities"][k]) for k in LABELS) < 0.05
    assert f["audio"]["seconds"] == pytest.approx(0.7, abs=1e-3) and f["audio"]["latency_ms"] > 0
    assert missing["label"] in recognizer.bundle.labels and "missing.wav" in missing["audio"]["error"]
    assert bad64["error"].startswith("line 5: field 'pcm16': not base64")
    assert "not both" in both["error"] and "field 'sample_rate'" in rate["error"]
    assert "without 'pcm16'" in stray["error"] and "audio" not in plain
    assert summary["audio"] == 3 and summary["audio_masked"] == 1 and summary["errors"] == 4
    assert summary["predictions"] == 5


def test_stream_without_audio_bundle_refuses_audio_lines(recognizer):
    plain = StreamingRecognizer(recognizer.bundle)
    out: list[dict] = []
    serve_lines(plain, [json.dumps({"speaker": "A", "text": "Hi", "pcm16": _pcm16(tone(0.3))})],
                lambda s: out.append(json.loads(s)))
    assert "--audio-bundle" in out[0]["error"]


def test_stream_command_with_an_audio_bundle(audio_bundle_dir, tmp_path, monkeypatch, capsys):
    text_dir = make_tiny_bundle(tmp_path / "text")[0]
    line = json.dumps({"conversation": "r", "speaker": "A", "text": "Hello", "pcm16": _pcm16(tone(0.5))})
    monkeypatch.setattr(sys, "stdin", io.StringIO(line + "\n"))
    assert main(["stream", "--bundle", str(text_dir), "--audio-bundle", str(audio_bundle_dir)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["audio"]["label"] in LABELS and out["turn"] == 0
    assert "audio 1" in captured.err


# ----------------------------------------------------------------------------- profile and the whole run


def test_profile_audio_bundle_times_each_clip(audio_bundle_dir, tmp_path):
    from erc_distill.profiles import load_profile
    from erc_distill.profiles.profiler import profile_audio_bundle

    files = []
    for i, seconds in enumerate((0.5, 0.7, 1.2, 2.5, 0.6, 3.1)):
        files.append(tmp_path / f"c{i}.flac")
        sf.write(files[-1], tone(seconds, 200 + 50 * i), 16000)
    result = profile_audio_bundle(audio_bundle_dir, load_profile("cpu-2core"), files, warmup=2)
    assert result.turns == 4 and result.p50_ms > 0 and result.p99_ms >= result.p50_ms
    assert result.mean_seconds == pytest.approx((1.2 + 2.5 + 0.6 + 3.1) / 4, abs=1e-3)
    with pytest.raises(DataError, match="too few"):
        profile_audio_bundle(audio_bundle_dir, load_profile("cpu-2core"), files[:1])


def test_encoders_must_read_what_the_corpus_holds():
    from erc_distill.config import Setting, build_config

    def cli(**pairs):
        return build_config([Setting(n, v, "command line", "--" + n) for n, v in pairs.items()])

    with pytest.raises(ConfigError, match="ravdess-whisper") as err:
        cli(data="ravdess", teacher="tiny-whisper", student="tiny")
    assert err.value.field == "--student"
    with pytest.raises(ConfigError, match="clip corpus") as err:
        cli(data="meld", teacher="tiny", student="tiny-whisper")
    assert err.value.field == "--student"
    assert cli(data="ravdess", teacher="tiny-whisper", student="tiny-whisper").modality == "audio"


def test_audio_run_end_to_end(tmp_path, monkeypatch, capsys):
    """Teacher, cache, distillation, export, INT8, profile and report on a real-FLAC corpus of tones
    (each emotion its own pitch); one train clip is corrupt: it is skipped and counted, never fatal."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = make_tone_ravdess(tmp_path / "data", seconds=0.5)
    bad = data / "ravdess" / "speech16k" / "Actor_01" / "03-01-05-01-01-01-01.flac"
    bad.write_bytes(b"not a flac file at all")
    args = ["report", "--data", "ravdess", "--data-dir", str(data), "--teacher", "tiny-whisper",
            "--student", "tiny-whisper", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
            "--teacher-epochs", "4", "--epochs", "4", "--batch-size", "16", "--lr", "3e-3", "--head-lr", "1e-2",
            "--teacher-lr", "3e-3", "--quantize-methods", "ort-dynamic", "--profile", "cpu-2core",
            "--seed", "1"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "1 unreadable" in out.out + out.err

    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values()), manifest["stages"]
    assert manifest["stages"]["teacher"]["train"]["best_dev_weighted_f1"] > 0.5  # tones are easy to tell apart
    bundle = open_bundle(run / "bundle")
    assert isinstance(bundle, AudioBundle) and bundle.labels == LABELS
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"]["test"]["labels"] == list(LABELS) and metrics["student"]["test"]["n"] == 60
    profiles = {p.name: json.loads(p.read_text()) for p in run.glob("profile_*.json")}
    assert set(profiles) == {"profile_teacher-fp32.json", "profile_student-fp32.json",
                             "profile_student-int8-ort-dynamic.json"}
    assert all(p["p50_ms"] > 0 and p["mean_seconds"] > 0.3 for p in profiles.values())
    report = (run / "report.md").read_text()
    assert "student-int8-ort-dynamic" in report and "p99 ms, 0-2 s" in report

    assert main(args) == 0  # a rerun finds every stage done
    rerun = capsys.readouterr()
    assert (rerun.out + rerun.err).count("up to date") == 8, rerun.out + rerun.err


def test_a_shallower_student_keeps_its_lowest_layers(tmp_path, monkeypatch):
    """``--student-layers N`` (student_train.keep_layers): the lowest N encoder layers, saved and loaded at
    that depth, exported; more than the encoder has is a ConfigError naming the flag; the default
    leaves every existing stage key as it was."""
    from types import SimpleNamespace

    from erc_distill.audio.model import AudioClassifier
    from erc_distill.config import Setting, build_config
    from erc_distill.export.bundle import write_audio_bundle
    from erc_distill.modeling import load_encoder
    from erc_distill.stages.base import stage_key
    from erc_distill.stages.modality import AudioModality, new_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def cfg(**pairs):
        return build_config([Setting(n, v, "command line", "--" + n) for n, v in
                             {"data": "ravdess", "teacher": "tiny-whisper", "student": "tiny-whisper", **pairs}.items()])

    two = cfg()
    one = cfg(student_layers=1)
    assert one.student_train.keep_layers == 1 and one.teacher_train.keep_layers is None
    assert stage_key(two.student_train) != stage_key(one.student_train)
    assert stage_key({"a": 1, "keep_layers": None}) == stage_key({"a": 1})  # old keys stay valid

    full, _ = new_model(SimpleNamespace(cfg=two, modality=AudioModality(), labels=LABELS), "tiny-whisper", "student")
    model, _ = new_model(SimpleNamespace(cfg=one, modality=AudioModality(), labels=LABELS), "tiny-whisper", "student")
    assert (full.num_layers, model.num_layers) == (2, 1)
    assert torch.equal(model.encoder.model.layers[0].fc1.weight, full.encoder.model.layers[0].fc1.weight)
    model.eval().save(tmp_path / "m")
    back = AudioClassifier.load(tmp_path / "m").eval()
    clips = [tone(0.4), tone(0.7)]
    with torch.no_grad():
        assert back.num_layers == 1 and torch.equal(back(*back.prepare(clips)).logits, model(*model.prepare(clips)).logits)
    bundle = AudioBundle.load(write_audio_bundle(model, tmp_path / "b"))
    with torch.no_grad():
        assert np.abs(bundle.logits(clips) - model(*model.prepare(clips)).logits.numpy()).max() < 1e-4

    with pytest.raises(ConfigError, match="3 layers to keep, but tiny-whisper has 2") as err:
        new_model(SimpleNamespace(cfg=cfg(student_layers=3), modality=AudioModality(), labels=LABELS),
                  "tiny-whisper", "student")
    assert err.value.field == "--student-train.keep-layers"

    text, _ = load_encoder("tiny", ("a", "b", "c"))
    depth = text.num_layers
    assert text.keep_lower(1) == depth - 1 and text.num_layers == 1 and len(text.layer_groups()) == 3
