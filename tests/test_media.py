"""The media layer: decoding, mono mixing, resampling, cuts, segments, video tracks, PCM, clip conventions."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from erc_distill.data import load_corpus
from erc_distill.data.types import MediaRef, SourceRef, Turn
from erc_distill.errors import DataError
from erc_distill.media import (
    AudioClip,
    MediaError,
    MediaReport,
    MediaSource,
    audio_from_pcm16,
    iter_turn_audio,
    load_audio,
    load_turn_audio,
    locate_clip,
    resolve_media,
)

RAVDESS_16K = "ravdess/speech16k"
RAVDESS_48K = "ravdess/original48k"


NO_EXTRA = 'the audio extra is not installed (pip install "erc-distill[audio]")'


@pytest.fixture(scope="module")
def sf():
    return pytest.importorskip("soundfile", reason=NO_EXTRA)


@pytest.fixture(scope="module")
def av():
    pytest.importorskip("soxr", reason=NO_EXTRA)
    return pytest.importorskip("av", reason=NO_EXTRA)


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def spectrum(clip: AudioClip) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (Hz) and power of a Hann-windowed FFT of the clip."""
    x = clip.samples * np.hanning(len(clip.samples))
    power = np.abs(np.fft.rfft(x)) ** 2
    return np.fft.rfftfreq(len(x), 1 / clip.sample_rate), power


def power_near(freqs: np.ndarray, power: np.ndarray, hz: float, width: float = 20.0) -> float:
    return float(power[np.abs(freqs - hz) <= width].sum())


# --------------------------------------------------------------------------- files: rates, channels, cuts


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resampling_keeps_a_tone_and_the_length(sf, av, tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, tone(1000, rate, 1.5), rate, subtype="FLOAT")
    clip = load_audio(path)
    assert clip.sample_rate == 16000 and clip.original_rate == rate and clip.channels == 1
    assert abs(len(clip) - 1.5 * 16000) <= 1  # length = duration x 16000
    assert clip.duration_s == pytest.approx(1.5, abs=1e-4) and clip.source_seconds == pytest.approx(1.5)
    assert clip.samples.dtype == np.float32 and not clip.cut
    freqs, power = spectrum(clip)
    assert freqs[np.argmax(power)] == pytest.approx(1000, abs=2)
    assert power_near(freqs, power, 1000) / power.sum() > 0.999  # nothing else appeared
    assert np.abs(clip.samples).max() == pytest.approx(0.5, abs=0.01)  # level kept


def test_resampling_is_band_limited(sf, av, tmp_path):
    """A 10 kHz tone cannot exist at 16 kHz: a correct resampler removes it, a naive one folds it to 6 kHz."""
    rate = 44100
    path = tmp_path / "two_tones.wav"
    sf.write(path, tone(1000, rate, 1.0, 0.4) + tone(10000, rate, 1.0, 0.4), rate, subtype="FLOAT")
    clip = load_audio(path)
    freqs, power = spectrum(clip)
    assert freqs[np.argmax(power)] == pytest.approx(1000, abs=2)
    assert power_near(freqs, power, 6000, 100) < 1e-6 * power_near(freqs, power, 1000)  # no alias


def test_stereo_is_averaged_not_the_first_channel(sf, tmp_path):
    rate = 16000
    left, right = tone(440, rate, 1.0, 0.6), tone(1000, rate, 1.0, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="FLOAT")
    clip = load_audio(path)
    assert clip.channels == 2 and clip.original_rate == 16000
    np.testing.assert_allclose(clip.samples, (left + right) / 2, atol=1e-6)

    sf.write(path, np.stack([left, -left], axis=1), rate, subtype="FLOAT")  # opposite phases cancel
    assert np.abs(load_audio(path).samples).max() < 1e-6


def test_stereo_44k1_is_mixed_and_resampled(sf, av, tmp_path):
    rate = 44100
    path = tmp_path / "stereo44.flac"
    both = tone(1000, rate, 1.0, 0.3)
    sf.write(path, np.stack([both, both], axis=1), rate, subtype="PCM_16")
    clip = load_audio(path)
    assert (clip.channels, clip.original_rate, len(clip)) == (2, 44100, 16000)
    freqs, power = spectrum(clip)
    assert freqs[np.argmax(power)] == pytest.approx(1000, abs=2)
    assert np.abs(clip.samples).max() == pytest.approx(0.3, abs=0.01)


def test_int16_wav_is_scaled_to_unit_range(sf, tmp_path):
    values = np.array([0, 16384, -16384, 32767, -32768, 1], dtype=np.int16)
    path = tmp_path / "pcm.wav"
    sf.write(path, values, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(path).samples, values.astype(np.float32) / 32768)


def test_max_seconds_cuts_and_records(sf, av, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(300, 48000, 3.0), 48000)
    clip = load_audio(path, max_seconds=1.25)
    assert len(clip) == 20000 and clip.cut and clip.cut_seconds == pytest.approx(1.75, abs=1e-3)
    assert clip.source_seconds == pytest.approx(3.0)
    assert np.abs(clip.samples[-1000:]).max() > 0.4  # cut, not zeroed
    whole = load_audio(path, max_seconds=10)
    assert not whole.cut and whole.cut_seconds == 0 and len(whole) == 48000


def test_start_end_select_a_segment(sf, tmp_path):
    rate = 16000
    signal = np.concatenate([np.zeros(rate, np.float32), tone(500, rate, 1.0), np.zeros(rate, np.float32)])
    path = tmp_path / "session.wav"
    sf.write(path, signal, rate, subtype="FLOAT")
    clip = load_audio(path, start=1.0, end=2.0)
    assert len(clip) == rate and clip.start_s == 1.0 and clip.source_seconds == pytest.approx(1.0)
    np.testing.assert_allclose(clip.samples, signal[rate:2 * rate], atol=1e-7)
    via_source = load_audio(MediaSource(path, 1.0, 2.0))
    np.testing.assert_array_equal(via_source.samples, clip.samples)
    assert len(load_audio(path, start=2.5, end=9.0)) == rate // 2  # an end past the file is its end
    with pytest.raises(MediaError, match="past the end") as err:
        load_audio(path, start=5.0)
    assert err.value.reason == "unreadable"
    with pytest.raises(ValueError, match="not after its start"):
        load_audio(path, start=2.0, end=1.0)


def test_missing_and_corrupt_files_are_media_errors(sf, av, tmp_path):
    with pytest.raises(MediaError) as err:
        load_audio(tmp_path / "nope.flac")
    assert err.value.reason == "missing" and isinstance(err.value, DataError)
    assert str(tmp_path / "nope.flac") in str(err.value)

    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 8)
    with pytest.raises(MediaError) as err:
        load_audio(corrupt)
    assert err.value.reason == "unreadable" and err.value.file == str(corrupt)

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(MediaError, match="no audio samples"):
        load_audio(empty)

    with pytest.raises(TypeError, match="locate_clip"):
        load_audio(MediaRef(path=str(empty)))  # a turn's times need the corpus's convention


# --------------------------------------------------------------------------- video containers (PyAV)


def write_video(av, path: Path, audio: np.ndarray | None, rate: int, codec: str = "aac", frames: int = 10) -> None:
    """A small real video file: an MPEG-4 picture track and, optionally, a stereo audio track."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream(codec, rate=rate, layout="stereo") if audio is not None else None
        for i in range(frames):
            picture = np.full((48, 64, 3), i * 20, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if sound is None:
            return
        planar = sound.codec_context.format.name.endswith("p")
        step = rate // 10
        for i in range(0, audio.shape[1], step):
            chunk = audio[:, i:i + step]
            if sound.codec_context.format.name.startswith("s16"):
                chunk = (chunk * 32767).astype(np.int16)
            array = np.ascontiguousarray(chunk if planar else chunk.T.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(array, format=sound.codec_context.format.name, layout="stereo")
            frame.rate, frame.pts = rate, i
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)


def test_mp4_audio_track_decodes(av, tmp_path):
    """MELD's clips are mp4 (H.264 + AAC): the audio track is found behind the picture track."""
    rate = 44100
    left = tone(1000, rate, 2.0, 0.5)
    path = tmp_path / "dia5_utt3.mp4"
    write_video(av, path, np.stack([left, 0.5 * left]), rate)
    clip = load_audio(path)
    assert (clip.sample_rate, clip.original_rate, clip.channels) == (16000, 44100, 2)
    assert clip.duration_s == pytest.approx(2.0, abs=0.03)  # AAC's padding is dropped
    freqs, power = spectrum(clip)
    assert freqs[np.argmax(power)] == pytest.approx(1000, abs=2)
    middle = clip.samples[8000:24000]
    assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.75 * 0.5 / np.sqrt(2), rel=0.05)  # mean of 0.5 and 0.25

    cut = load_audio(path, max_seconds=0.5)
    assert len(cut) == 8000 and cut.cut and cut.cut_seconds == pytest.approx(1.5, abs=0.03)


def test_mkv_flac_track_is_exact(av, tmp_path):
    rate = 22050
    left, right = tone(700, rate, 1.0, 0.4), tone(700, rate, 1.0, 0.2)
    path = tmp_path / "clip.mkv"
    write_video(av, path, np.stack([left, right]), rate, codec="flac")
    clip = load_audio(path, sample_rate=rate)  # no resampling: the decoded track itself
    expected = ((left * 32767).astype(np.int16).astype(np.float32) + (right * 32767).astype(np.int16)) / 2 / 32768
    assert len(clip) == len(left)
    np.testing.assert_allclose(clip.samples, expected, atol=1e-6)
    segment = load_audio(path, sample_rate=rate, start=0.25, end=0.5)
    np.testing.assert_allclose(segment.samples, expected[rate // 4:rate // 2], atol=1e-6)


def test_video_without_audio_is_unreadable(av, tmp_path):
    path = tmp_path / "silent_film.mp4"
    write_video(av, path, None, 16000)
    with pytest.raises(MediaError, match="no audio track") as err:
        load_audio(path)
    assert err.value.reason == "unreadable"


# --------------------------------------------------------------------------- PCM from the robot


def test_pcm16_bytes_are_resampled(av):
    ints = (tone(500, 8000, 0.5, 0.5) * 32767).astype("<i2")
    clip = audio_from_pcm16(ints.tobytes(), 8000)
    assert (clip.sample_rate, clip.original_rate, clip.channels, clip.source) == (16000, 8000, 1, None)
    assert len(clip) == 8000
    freqs, power = spectrum(clip)
    assert freqs[np.argmax(power)] == pytest.approx(500, abs=3)


def test_pcm16_at_16k_is_exact_and_needs_no_decoder(monkeypatch):
    monkeypatch.setitem(sys.modules, "soxr", None)  # not needed when no resampling is
    ints = np.array([0, 1000, -1000, 32767, -32768], dtype=np.int16)
    np.testing.assert_array_equal(audio_from_pcm16(ints.tobytes(), 16000).samples, ints / np.float32(32768))
    big_endian = ints.astype(">i2")
    np.testing.assert_array_equal(audio_from_pcm16(big_endian, 16000).samples, ints / np.float32(32768))
    assert len(audio_from_pcm16(bytearray(ints.tobytes()), 16000, max_seconds=2 / 16000)) == 2
    with pytest.raises(ImportError, match=r'pip install "erc-distill\[audio\]"'):
        audio_from_pcm16(ints.tobytes(), 8000)


@pytest.mark.parametrize(
    "data, message",
    [(b"\x00\x01\x02", "odd number of bytes"), (np.zeros(4, np.float32), "int16"), (b"", "no samples"),
     (np.zeros((2, 3), np.int16), "mono")],
)
def test_bad_pcm16_is_a_media_error(data, message):
    with pytest.raises(MediaError, match=message):
        audio_from_pcm16(data, 16000)


def test_missing_audio_extra_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    path = tmp_path / "x.wav"
    path.write_bytes(b"RIFF")
    with pytest.raises(ImportError, match=r'pip install "erc-distill\[audio\]"'):
        load_audio(path)


def test_text_path_imports_no_audio_library(tmp_path):
    ravdess = tmp_path / "data" / "ravdess" / "speech16k" / "Actor_01"
    ravdess.mkdir(parents=True)
    (ravdess / "03-01-01-01-01-01-01.flac").write_bytes(b"")
    code = (
        "import sys\n"
        "import erc_distill.data, erc_distill.media, erc_distill.data.stats\n"
        f"erc_distill.data.load_corpus('ravdess', 'train', {str(tmp_path / 'data')!r})\n"
        "print(sorted(m for m in ('soundfile', 'soxr', 'av') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- corpus conventions, many turns


def turn(corpus: str, media: MediaRef | None, dialogue: str = "d", turn_id: int = 0) -> Turn:
    return Turn(corpus, "test", dialogue, turn_id, turn_id, "A", "hi", None, SourceRef("mem", 2), media)


def test_meld_clip_convention(fixture_data, tmp_path):
    t = load_corpus("meld", "train", fixture_data).dialogue(0).turn(2)
    assert t.media.path == "train_splits/dia0_utt2.mp4"
    assert resolve_media(t) is None  # relative to a media dir that was not given
    media = tmp_path / "MELD.Raw"
    assert resolve_media(t, media) == media / "train_splits" / "dia0_utt2.mp4"  # where it should be
    where = locate_clip(t, media)
    assert where.start is None and where.end is None  # StartTime/EndTime are episode times: the clip is cut already
    media.mkdir()
    (media / "dia0_utt2.wav").write_bytes(b"")  # flat, but which split's? MELD reuses names in every split
    assert resolve_media(t, media) == media / "train_splits" / "dia0_utt2.mp4"  # not taken: named as missing
    split = tmp_path / "train_splits"  # a media dir that is the split folder itself, audio extracted
    split.mkdir()
    (split / "dia0_utt2.wav").write_bytes(b"")
    assert resolve_media(t, split) == split / "dia0_utt2.wav"
    (media / "train_splits").mkdir()
    (media / "train_splits" / "dia0_utt2.mp4").write_bytes(b"")
    assert resolve_media(t, media) == media / "train_splits" / "dia0_utt2.mp4"


def test_iemocap_clip_convention(fixture_data, tmp_path):
    t = load_corpus("iemocap", "train", fixture_data).dialogue("Ses01F_impro01").turns[0]
    own = locate_clip(t, tmp_path)  # Session1/wav/Ses01F_impro01_F000.wav: the utterance's own file
    assert own == MediaSource(tmp_path / "Session1/wav/Ses01F_impro01_F000.wav")
    session = replace(t, media=replace(t.media, path="/corpora/IEMOCAP/Session1/dialog/wav/Ses01F_impro01.wav"))
    cut = locate_clip(session, tmp_path)  # the dialogue's recording: cut to the turn's times
    assert cut == MediaSource(Path("/corpora/IEMOCAP/Session1/dialog/wav/Ses01F_impro01.wav"), 1.5, 2.9)
    video_only = replace(t, media=replace(t.media, path=None))
    assert locate_clip(video_only, tmp_path) == MediaSource(tmp_path / "Session1/avi/Ses01F_impro01.avi", 1.5, 2.9)
    emory = load_corpus("emorynlp", "train", fixture_data).turns[0]
    assert emory.media is not None and locate_clip(emory, tmp_path) is None  # times but no clips


def test_missing_and_corrupt_clips_are_masked_and_counted(sf, av, tmp_path):
    rate = 16000
    sf.write(tmp_path / "Ses01F_impro01.wav", tone(440, rate, 4.0), rate)  # a session recording
    sf.write(tmp_path / "long.flac", tone(440, 48000, 3.0), 48000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    turns = [
        turn("iemocap", MediaRef("Ses01F_impro01.wav", start=1.0, end=2.5), "Ses01F_impro01", 0),
        turn("iemocap", MediaRef("gone.wav"), "Ses01F_impro01", 1),
        turn("iemocap", MediaRef("corrupt.wav"), "Ses01F_impro01", 2),
        turn("iemocap", None, "Ses01F_impro01", 3),
        turn("other", MediaRef(str(tmp_path / "long.flac"))),
        turn("iemocap", MediaRef("Ses01F_impro01.wav", start=3.0, end=2.0), "Ses01F_impro01", 4),  # bad times
    ]
    clips, report = load_turn_audio(turns, tmp_path, max_seconds=2.0)
    assert [c is not None for c in clips] == [True, False, False, False, True, False]
    assert len(clips[0]) == 24000 and clips[0].start_s == 1.0 and not clips[0].cut
    assert len(clips[4]) == 32000 and clips[4].cut and clips[4].original_rate == 48000
    assert (report.total, report.loaded, report.missing, report.unreadable, report.no_media, report.cut) == (
        6, 2, 1, 2, 1, 1)
    assert report.masked == 4 and report.cut_seconds == pytest.approx(1.0, abs=1e-3)
    assert report.first_missing == [str(tmp_path / "gone.wav")]
    assert report.first_unreadable[0].startswith(str(tmp_path / "corrupt.wav"))
    assert "not after its start" in report.first_unreadable[1]
    assert report.first_no_media == ["iemocap/test/Ses01F_impro01/3"]
    summary = report.summary()
    assert "6 turns, 2 loaded" in summary and "1 missing, 2 unreadable, 1 without media" in summary
    assert "gone.wav" in summary and "1 cut to 2 s" in summary
    assert json.loads(json.dumps(report.as_dict()))["masked"] == 4


def test_report_keeps_only_the_first_paths(tmp_path):
    turns = [turn("other", MediaRef(str(tmp_path / f"missing{i}.wav")), turn_id=i) for i in range(12)]
    clips, report = load_turn_audio(turns)
    assert clips == [None] * 12 and report.missing == 12 and len(report.first_missing) == 5
    assert "(+7 more)" in report.summary()


# --------------------------------------------------------------------------- real RAVDESS audio


@pytest.mark.realdata
def test_real_48k_wavs_match_the_shipped_16k_flacs(real_data, sf, av):
    originals = sorted((real_data / RAVDESS_48K / "Actor_01").glob("*.wav"))
    if not originals:
        pytest.skip(f"{RAVDESS_48K} not in {real_data}")
    assert len(originals) == 60
    for wav in originals:
        ours = load_audio(wav)
        shipped = load_audio(real_data / RAVDESS_16K / "Actor_01" / f"{wav.stem}.flac")
        assert ours.original_rate == 48000 and ours.sample_rate == shipped.sample_rate == 16000
        assert abs(ours.duration_s - sf.info(wav).duration) < 0.005
        n = min(len(ours), len(shipped))
        assert abs(len(ours) - len(shipped)) <= 1
        assert np.corrcoef(ours.samples[:n], shipped.samples[:n])[0, 1] > 0.99, wav.name


def test_audio_is_an_extra_and_dev_installs_it():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    audio = {r.split(">")[0].split("=")[0].strip() for r in extras["audio"]}
    assert audio == {"soundfile", "soxr", "av"} and "erc-distill[audio]" in extras["dev"]
    assert not {r.split(">")[0].split("=")[0].strip() for r in project["dependencies"]} & audio


def test_iter_turn_audio_streams_into_a_report(sf, tmp_path):
    sf.write(tmp_path / "a.wav", tone(440, 16000, 0.5), 16000)
    turns = [turn("other", MediaRef(str(tmp_path / "a.wav"))),
             turn("other", MediaRef(str(tmp_path / "b.wav")), turn_id=1)]
    report = MediaReport()
    stream = iter_turn_audio(turns, None, report)
    first_turn, first_clip = next(stream)
    assert first_turn is turns[0] and len(first_clip) == 8000 and (report.loaded, report.missing) == (1, 0)
    assert next(stream)[1] is None and report.missing == 1 and report.total == 2
