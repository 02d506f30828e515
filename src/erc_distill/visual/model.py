"""The visual classifier that visual teachers and students share.

A visual encoder (:mod:`erc_distill.visual.encoders`) reads each clip's frames (face crops or whole
frames); the turn's representation is the mean of its token features over the valid tokens; a
head (dropout + linear) maps it to the labels::

    out = Encoder(pixels [B, N, C, S, S], frame_mask [B, N])   # tokens [B, T, H], token mask [B, T]
    f = sum_t m[b, t] x[b, t] / max(sum_t m[b, t], 1)          # [B, H]   the "feature" used by feature KD
    z = W · dropout(f) + b                                     # [B, C]   logits

A clip with no frames at all (no video for the turn) has an all-False mask: its feature is zero,
and the fusion heads mask the modality out (:mod:`erc_distill.fusion.heads`). The output is a
:class:`~erc_distill.modeling.ModelOutput`, so the loss registry takes it as it is.

Saved as a folder: ``encoder/``, ``head.safetensors`` and ``erc_model.json`` (labels, source, dropout,
modality ``visual``, preprocessing).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erc_distill.audio.model import PooledClassifier, masked_mean
from erc_distill.media.frames import DEFAULT_FRAMES, frames_to_array
from erc_distill.modeling import ModelOutput, saved_weights_present
from erc_distill.visual.encoders import VisualEncoder, load_visual_encoder

MODEL_FORMAT = "visual-classifier/1"


class VisualClassifier(PooledClassifier):
    """Visual encoder + masked mean over tokens + head. ``forward(pixels, frame_mask)``; :meth:`prepare`
    makes both from each clip's crops."""

    def __init__(self, encoder: VisualEncoder, labels: tuple[str, ...], dropout: float = 0.1, source: str = "",
                 frames: int = DEFAULT_FRAMES) -> None:
        super().__init__(encoder, labels, dropout, source)
        self.frames = int(encoder.preprocessing.get("frames") or frames)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {**self.encoder.preprocessing, "frames": self.frames}

    def prepare(self, clips: Sequence[Sequence[np.ndarray] | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each clip's crops (uint8 RGB images, any sizes; None or empty: no video) ->
        ``pixels [B, N, C, S, S]`` float32 and ``frame_mask [B, N]`` bool, N = :attr:`frames`
        (a clip with more crops is sampled uniformly; one with fewer is padded and masked for per-frame
        encoders, its frames repeated in order for video models)."""
        from erc_distill.media.frames import uniform_indices

        p = self.preprocessing
        channels, size, n = 1 if p["grayscale"] else 3, int(p["size"]), self.frames
        pixels = np.zeros((len(clips), n, channels, size, size), dtype=np.float32)
        mask = np.zeros((len(clips), n), dtype=bool)
        for b, crops in enumerate(clips):
            if not crops:
                continue
            crops = list(crops)
            if len(crops) > n or (len(crops) < n and self.encoder.preprocessing.get("frames")):
                # more crops than slots: sample; a video model (every slot must be real): repeat frames
                crops = [crops[i] for i in uniform_indices(len(crops), n)]
            pixels[b, : len(crops)] = frames_to_array(crops, size, p["mean"], p["std"], p["grayscale"])
            mask[b, : len(crops)] = True
        return torch.from_numpy(pixels), torch.from_numpy(mask)

    def forward(self, pixels: torch.Tensor, frame_mask: torch.Tensor,
                output_hidden_states: bool = False) -> ModelOutput:
        out = self.encoder(pixels, frame_mask, output_hidden_states=output_hidden_states)
        features = masked_mean(out.tokens, out.token_mask)
        logits = self.head(self.dropout(features))
        return ModelOutput(logits, features, out.hidden_states)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from the bottom up, for layer-wise learning rates: [the encoder's parameters outside
        its layers (stem, embeddings, final norm), layer 0, ..., layer L-1, head]."""
        layers = [list(layer.parameters()) for layer in self.encoder.layers()]
        taken = {id(p) for group in layers for p in group}
        return [[p for p in self.encoder.parameters() if id(p) not in taken], *layers, list(self.head.parameters())]

    def keep_lower(self, n_layers: int) -> int:
        raise NotImplementedError("layer dropping is for transformer students; the visual CNNs are already small")

    # -- persistence -------------------------------------------------------------------------------
    def save(self, folder: str | Path, processor: Any | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save(folder / "encoder")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / "head.safetensors")
        meta = {"format": MODEL_FORMAT, "modality": "visual", "labels": list(self.labels), "dropout": self.dropout_p,
                "source": self.source, "frames": self.frames, "preprocessing": self.preprocessing}
        (folder / "erc_model.json").write_text(json.dumps(meta, indent=2))
        return folder

    @staticmethod
    def has_weights(folder: str | Path) -> bool:
        return saved_weights_present(folder)

    @classmethod
    def load(cls, folder: str | Path, weights: bool = True) -> "VisualClassifier":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "erc_model.json").read_text())
        if meta.get("modality") != "visual":
            raise ValueError(f"{folder} holds a {meta.get('modality', 'text')} model, not a visual classifier")
        model = cls(load_visual_encoder(folder / "encoder", pretrained=weights), tuple(meta["labels"]),
                    meta["dropout"], meta["source"], meta["frames"])
        if weights:
            model.head.load_state_dict(load_file(folder / "head.safetensors"))
        return model


def load_visual_classifier(name_or_path: str | Path, labels: tuple[str, ...], dropout: float = 0.1,
                           frames: int = DEFAULT_FRAMES) -> VisualClassifier:
    """A fresh classifier (new head) on a visual encoder: ``fer-cnn``, ``efficientnet-lite0``,
    ``timesformer``, a hub id or folder, ``tiny-vit`` / ``tiny-timesformer``."""
    return VisualClassifier(load_visual_encoder(name_or_path), labels, dropout, source=str(name_or_path), frames=frames)
