"""The audio classifier that audio teachers and students share.

A speech encoder (:mod:`erc_distill.audio.encoders`) reads a batch of clips on their own lengths;
the utterance's representation is the mean of the encoder's last hidden states over the clip's
valid frames; a head (dropout + linear) maps it to the labels::

    h, m = Encoder(inputs, lengths)                   # [B, F, H], frame mask [B, F]
    f = sum_t m[b, t] h[b, t] / sum_t m[b, t]         # [B, H]   the "feature" used by feature KD
    z = W · dropout(f) + b                            # [B, C]   logits

The output is a :class:`~erc_distill.modeling.ModelOutput` (the text model's), so the loss
registry and the objective take it as they are; it also carries the frame mask
(:class:`AudioModelOutput`), needed to pool the per-layer ``hidden_states``. A clip's logits and
features do not depend on the clips batched with it (to ~1e-6; see the encoders' doc).

Saved as a folder: ``encoder/`` (the transformers model, safetensors, and its preprocessor config),
``head.safetensors`` and ``erc_model.json`` (labels, source, dropout, modality, preprocessing).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from erc_distill.audio.encoders import (
    AudioEncoder,
    audio_encoder_from_pretrained,
    load_audio_encoder,
    quiet_transformers,
)
from erc_distill.modeling import ModelOutput, saved_weights_present

MODEL_FORMAT = "audio-classifier/1"


@dataclass
class AudioModelOutput(ModelOutput):
    """:class:`ModelOutput` plus ``frame_mask`` ``[B, F]`` (True on each clip's valid frames).

    ``hidden_states`` are per frame; where the text model's are read at the mask position, an audio
    model's are pooled over the valid frames: :meth:`pooled_hidden_states`."""

    frame_mask: torch.Tensor | None = None

    def pooled_hidden_states(self) -> tuple[torch.Tensor, ...]:
        """Each layer's hidden states averaged over the valid frames: ``[B, H]`` per layer."""
        if self.hidden_states is None or self.frame_mask is None:
            raise ValueError("no hidden states: run the model with output_hidden_states=True")
        return tuple(masked_mean(h, self.frame_mask) for h in self.hidden_states)

    def layer_features(self, layer: int, batch: Any = None) -> torch.Tensor:
        """Layer ``layer``'s hidden states averaged over each clip's valid frames, ``[B, H]``."""
        if self.hidden_states is None or self.frame_mask is None:
            raise ValueError("no hidden states: run the model with output_hidden_states=True")
        return masked_mean(self.hidden_states[layer], self.frame_mask)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[B, F, H]`` over the frames where ``mask`` ``[B, F]`` is True -> ``[B, H]``."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class PooledClassifier(nn.Module):
    """A non-verbal branch: ``encoder`` (with ``hidden_size`` and ``num_layers``) + masked mean pooling +
    dropout + a linear head over ``labels``; ``source`` names where the encoder came from."""

    def __init__(self, encoder: nn.Module, labels: tuple[str, ...], dropout: float = 0.1, source: str = "") -> None:
        super().__init__()
        self.encoder = encoder
        self.labels = tuple(labels)
        self.source = source
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.hidden_size, len(labels))

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers


class AudioClassifier(PooledClassifier):
    """Speech encoder + masked mean pooling + head. ``forward(inputs, lengths)``: ``inputs`` log-mel
    ``[B, 80, T]`` (Whisper) or samples ``[B, N]`` (waveform encoders), ``lengths`` ``[B]`` valid
    frames / samples of each row; :meth:`prepare` makes both from clips."""

    def __init__(self, encoder: AudioEncoder, labels: tuple[str, ...], dropout: float = 0.1, source: str = "") -> None:
        super().__init__(encoder, labels, dropout, source)

    @property
    def input_kind(self) -> str:
        return self.encoder.input_kind

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What turns samples into :meth:`forward`'s inputs (part of a teacher cache's key)."""
        return self.encoder.preprocessing

    def prepare(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono 16 kHz samples (``AudioClip.samples``) of several clips -> ``(inputs, lengths)``."""
        return self.encoder.prepare(clips)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> AudioModelOutput:
        out = self.encoder(inputs, lengths, output_hidden_states=output_hidden_states)
        features = masked_mean(out.last_hidden_state, out.frame_mask)
        logits = self.head(self.dropout(features))
        return AudioModelOutput(logits, features, out.hidden_states, out.frame_mask)

    @torch.no_grad()
    def embed(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
        """Pooled embeddings ``[B, H]`` of clips, in eval mode (the model's mode is restored after)."""
        was_training = self.training
        self.eval()
        try:
            inputs, lengths = self.prepare(clips)
            device = self.head.weight.device
            return self(inputs.to(device), lengths.to(device)).features
        finally:
            self.train(was_training)

    # -- layer groups (freezing, layer-wise LR decay) ---------------------------------------------
    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from the bottom up: [below the layers, layer 0, ..., layer L-1 (with a final
        layer norm), head]."""
        layers = [list(layer.parameters()) for layer in self.encoder.layers()]
        layers[-1] += self.encoder.top_parameters()
        embeddings = self.encoder.embedding_parameters()
        taken = {id(p) for p in embeddings} | {id(p) for group in layers for p in group}
        rest = [p for p in self.parameters() if id(p) not in taken]
        return [embeddings, *layers, rest]

    def keep_lower(self, n_layers: int) -> int:
        """Keep only the encoder's lowest ``n_layers`` layers (a 2-layer Whisper-tiny student, say);
        returns how many were dropped."""
        from erc_distill.modeling import keep_lower_layers

        return keep_lower_layers(self.encoder.model, n_layers)

    def freeze_lower(self, n_layers: int) -> int:
        """Freeze everything below the layers and the lowest ``n_layers`` layers; returns the frozen
        parameter count (those that were trainable)."""
        frozen = 0
        for group in self.layer_groups()[: 1 + n_layers] if n_layers > 0 else []:
            for p in group:
                frozen += p.numel() if p.requires_grad else 0
                p.requires_grad_(False)
        return frozen

    # -- persistence -------------------------------------------------------------------------------
    def save(self, folder: str | Path, processor: Any | None = None) -> Path:
        """Write the model to ``folder`` (module doc). ``processor``: ignored when None (the
        encoder folder already holds its preprocessor config), else saved to ``processor/``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder / "encoder")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / "head.safetensors")
        meta = {"format": MODEL_FORMAT, "modality": "audio", "labels": list(self.labels), "dropout": self.dropout_p,
                "source": self.source, "preprocessing": self.preprocessing}
        (folder / "erc_model.json").write_text(json.dumps(meta, indent=2))
        if processor is not None:
            processor.save_pretrained(folder / "processor")
        return folder

    @staticmethod
    def has_weights(folder: str | Path) -> bool:
        return saved_weights_present(folder)

    @classmethod
    def load(cls, folder: str | Path, weights: bool = True) -> "AudioClassifier":
        """A model saved by :meth:`save`. ``weights=False``: the same architecture, randomly
        initialised from the saved configs."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "erc_model.json").read_text())
        if meta.get("modality") != "audio":
            raise ValueError(f"{folder} holds a {meta.get('modality', 'text')} model, not an audio classifier")
        if weights:
            encoder = audio_encoder_from_pretrained(folder / "encoder")
        else:
            encoder = _random_like(folder / "encoder")
        model = cls(encoder, tuple(meta["labels"]), meta["dropout"], meta["source"])
        if weights:
            model.head.load_state_dict(load_file(folder / "head.safetensors"))
        return model


def _random_like(folder: Path) -> AudioEncoder:
    from transformers import AutoConfig, AutoModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from erc_distill.audio.encoders import WhisperAudioEncoder, WaveformAudioEncoder, _do_normalize

    config = AutoConfig.from_pretrained(folder)
    with quiet_transformers():
        if config.model_type == "whisper":
            return WhisperAudioEncoder(WhisperEncoder(config))
        return WaveformAudioEncoder(AutoModel.from_config(config), _do_normalize(str(folder)))


def load_audio_classifier(name_or_path: str | Path, labels: tuple[str, ...], dropout: float = 0.1) -> AudioClassifier:
    """A fresh classifier (new head) on a pretrained speech encoder: preset (``whisper-base``,
    ``whisper-tiny``, ``data2vec-audio-base``, ...), hub id, folder or ``tiny-whisper``."""
    return AudioClassifier(load_audio_encoder(name_or_path), labels, dropout, source=str(name_or_path))
