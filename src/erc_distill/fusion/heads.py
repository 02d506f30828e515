"""Multimodal fusion heads for ERC (TelME style), each registered by name.

A turn has a text feature ``t`` [B, Dt] (text student), an audio feature ``a`` [B, Da] and a
visual feature ``v`` [B, Dv] (audio / visual students), plus presence masks ``audio_mask`` [B] and
``visual_mask`` [B] (True / 1.0 = the modality exists for that sample). Text is always present.

Every head is a :class:`FusionHead` called as::

    out = head(text, audio, visual, audio_mask, visual_mask)
    out.features   # [B, D]  fused representation f, before the classifier
    out.logits     # [B, C]  z = W_c · dropout(f) + b_c

Conventions shared by all heads (implemented once, in :meth:`FusionHead.forward`):

* Masks may be ``bool`` (True = present), floating (present where ``> 0.5``; the ONNX graph takes
  float32 0/1 tensors named ``audio_mask`` / ``visual_mask``, shape [B]), integer (present where
  ``!= 0``) or ``None`` (all present).
* An absent modality's feature row is replaced by zeros (``torch.where``) before anything reads it,
  so the output never depends on the values passed for an absent modality (even NaN / inf).
* Every sample is fused on its own: no operation mixes samples of a batch, so a sample's output
  does not depend on the batch it is in (up to float rounding).
* No data-dependent Python control flow: presence is handled with ``torch.where`` and mask
  products, so the heads export to ONNX (``torch.onnx.export(..., dynamo=False, opset 17)``),
  see :func:`export_onnx`.

Notation: m_a, m_v ∈ {0, 1} presence per sample, m = m_a ∨ m_v; [x; y] concatenation on the
feature axis; ⊙ elementwise product; ‖·‖ the L2 norm over the feature axis (per sample).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FUSION_HEADS",
    "ONNX_INPUT_NAMES",
    "ONNX_OUTPUT_NAMES",
    "ASFHead",
    "FusionHead",
    "FusionOutput",
    "MAGHead",
    "MulTHead",
    "build_fusion_head",
    "export_onnx",
    "register",
]

FUSION_HEADS: dict[str, type[FusionHead]] = {}

ONNX_INPUT_NAMES = ("text", "audio", "visual", "audio_mask", "visual_mask")
ONNX_OUTPUT_NAMES = ("logits", "features")


def register(name: str) -> Callable[[type[FusionHead]], type[FusionHead]]:
    """Class decorator: make a head available to :func:`build_fusion_head` as ``name``."""

    def add(cls: type[FusionHead]) -> type[FusionHead]:
        if name in FUSION_HEADS:
            twice = f"{FUSION_HEADS[name].__name__}, {cls.__name__}"
            raise ValueError(f"fusion head {name!r} is registered twice ({twice})")
        cls.name = name
        FUSION_HEADS[name] = cls
        return cls

    return add


def build_fusion_head(
    name: str, text_dim: int, audio_dim: int, visual_dim: int, num_labels: int, **options: Any
) -> FusionHead:
    """The registered head ``name`` built for these widths; ``options`` go to its constructor."""
    if name not in FUSION_HEADS:
        raise ValueError(f"unknown fusion head {name!r}; known heads: {', '.join(sorted(FUSION_HEADS))}")
    cls = FUSION_HEADS[name]
    try:
        return cls(text_dim, audio_dim, visual_dim, num_labels, **options)
    except TypeError as err:  # an unknown keyword option
        raise ValueError(f"fusion head {name!r}: bad option ({err})") from err


@dataclass
class FusionOutput:
    """``logits`` [B, C]; ``features`` [B, D], the fused representation before dropout + classifier."""

    logits: Tensor
    features: Tensor


def _check_positive(**values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_heads(width: int, num_heads: int, what: str) -> None:
    _check_positive(num_heads=num_heads)
    if width % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the {what} width {width}")


def _presence(mask: Tensor | None, arg: str, batch: int, like: Tensor, check: bool) -> Tensor:
    """A presence mask as bool [B] (see the module docstring for the accepted forms)."""
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=like.device)
    if not isinstance(mask, Tensor):
        raise ValueError(f"{arg} must be a tensor of shape [B], got {type(mask).__name__}")
    if check and (mask.dim() != 1 or mask.shape[0] != batch):
        raise ValueError(f"{arg}: expected shape [B] with B={batch} (the text batch size), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask > 0.5
    return mask != 0


def _check_features(x: Tensor, arg: str, width: int, batch: int | None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{arg} must be a tensor of shape [B, {width}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{arg}: expected shape [B, {width}] ({arg}_dim={width}), got {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{arg}: batch size {x.shape[0]} does not match the text batch size {batch}")
    if not x.is_floating_point():
        raise ValueError(f"{arg} must be a floating tensor, got {x.dtype}")


class FusionHead(nn.Module):
    """Base of all fusion heads: checks inputs, normalises masks, zeroes absent rows, classifies.

    Subclasses implement :meth:`fuse` (``features`` [B, D]); the base adds the classifier::

        f = fuse(t, a, v, m_a, m_v)          # [B, D]
        z = W_c · dropout(f) + b_c           # [B, C],  W_c: nn.Linear(D, num_labels)
    """

    name: ClassVar[str] = "?"

    def __init__(
        self, text_dim: int, audio_dim: int, visual_dim: int, num_labels: int, feature_dim: int, dropout: float
    ) -> None:
        super().__init__()
        _check_positive(
            text_dim=text_dim, audio_dim=audio_dim, visual_dim=visual_dim, num_labels=num_labels,
            feature_dim=feature_dim,
        )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.text_dim, self.audio_dim, self.visual_dim = text_dim, audio_dim, visual_dim
        self.num_labels, self.feature_dim = num_labels, feature_dim
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_dim, num_labels)

    def forward(
        self,
        text: Tensor,
        audio: Tensor,
        visual: Tensor,
        audio_mask: Tensor | None = None,
        visual_mask: Tensor | None = None,
    ) -> FusionOutput:
        """text [B, Dt], audio [B, Da], visual [B, Dv], masks [B] → logits [B, C], features [B, D].

        Raises ``ValueError`` naming the argument when a width or batch size disagrees.
        """
        # Shape checks are plain Python: skipped while tracing (ONNX export) to keep the batch dynamic.
        check = not torch.jit.is_tracing()
        if check:
            _check_features(text, "text", self.text_dim, None)
        batch = text.shape[0]
        if check:
            _check_features(audio, "audio", self.audio_dim, batch)
            _check_features(visual, "visual", self.visual_dim, batch)
        has_audio = _presence(audio_mask, "audio_mask", batch, text, check)
        has_visual = _presence(visual_mask, "visual_mask", batch, text, check)
        audio = torch.where(has_audio.unsqueeze(-1), audio, torch.zeros_like(audio))
        visual = torch.where(has_visual.unsqueeze(-1), visual, torch.zeros_like(visual))
        features = self.fuse(text, audio, visual, has_audio, has_visual)
        return FusionOutput(logits=self.classifier(self.dropout(features)), features=features)

    def fuse(self, text: Tensor, audio: Tensor, visual: Tensor, has_audio: Tensor, has_visual: Tensor) -> Tensor:
        """text [B, Dt], audio [B, Da], visual [B, Dv] (absent rows already zero), bool masks [B] → [B, D]."""
        raise NotImplementedError


def _shift_scale(text: Tensor, shift: Tensor, beta: float, eps: float) -> Tensor:
    """α = min(β ‖t‖ / (‖H‖ + ε), 1), shape [B, 1]. ‖H‖ = 0 gives α·H = 0 exactly."""
    ratio = beta * torch.linalg.vector_norm(text, dim=-1) / (torch.linalg.vector_norm(shift, dim=-1) + eps)
    return torch.clamp(ratio, max=1.0).unsqueeze(-1)


@register("asf")
class ASFHead(FusionHead):
    """Attention-based modality Shifting Fusion (TelME), per sample.

    TelME's ASF attends across the samples of a batch; here each sample attends only to its own
    non-verbal tokens, so outputs are batch-independent. With t [B, Dt], a [B, Da], v [B, Dv]::

        a' = W_a a + b_a,  v' = W_v v + b_v                      # [B, Dt] each
        K = [a'; v']                                             # [B, 2, Dt], tokens of the sample
        h = m · MHA(q = t, k = K, v = K, absent tokens masked)   # [B, Dt]; h = 0 when m = 0
        g = relu(W_g [h; t] + b_g)                               # [B, Dt]
        H = m · g ⊙ (W_h h + b_h)                                # [B, Dt]; the shift, 0 when m = 0
        α = min(β ‖t‖ / (‖H‖ + ε), 1)                            # [B, 1]
        f = LayerNorm(t + α H)                                   # [B, Dt]  features (D = Dt)
        z = W_c dropout(f) + b_c                                 # [B, C]

    MHA (``num_heads`` heads) projects the text to its query internally (W_q t). A sample with no
    audio and no visual gets H = 0 and so ``features == LayerNorm(t)`` exactly (``self.norm(text)``),
    in training and eval mode. β (``beta``, default 1.0 as MAG's ``beta_shift``) caps the shift at
    β times the text norm; ε (``eps``) guards ‖H‖ = 0.
    """

    def __init__(
        self,
        text_dim: int,
        audio_dim: int,
        visual_dim: int,
        num_labels: int,
        *,
        num_heads: int = 4,
        beta: float = 1.0,
        eps: float = 1e-6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(text_dim, audio_dim, visual_dim, num_labels, text_dim, dropout)
        _check_heads(text_dim, num_heads, "text")
        self.beta, self.eps = float(beta), float(eps)
        self.proj_audio = nn.Linear(audio_dim, text_dim)
        self.proj_visual = nn.Linear(visual_dim, text_dim)
        self.attention = nn.MultiheadAttention(text_dim, num_heads, dropout=dropout, batch_first=True)
        self.gate = nn.Linear(2 * text_dim, text_dim)
        self.shift = nn.Linear(text_dim, text_dim)
        self.norm = nn.LayerNorm(text_dim)

    def fuse(self, text: Tensor, audio: Tensor, visual: Tensor, has_audio: Tensor, has_visual: Tensor) -> Tensor:
        tokens = torch.stack([self.proj_audio(audio), self.proj_visual(visual)], dim=1)  # [B, 2, Dt]
        present = torch.stack([has_audio, has_visual], dim=1)  # [B, 2]
        any_present = (has_audio | has_visual).unsqueeze(-1)  # [B, 1]
        # Samples with no token would attend to nothing (softmax over -inf only: NaN); leave their
        # (zero-input) tokens unmasked and zero the result instead.
        padding = ~present & any_present
        attended, _ = self.attention(text.unsqueeze(1), tokens, tokens, key_padding_mask=padding, need_weights=False)
        zeros = torch.zeros_like(text)
        h = torch.where(any_present, attended.squeeze(1), zeros)  # [B, Dt]
        gate = F.relu(self.gate(torch.cat([h, text], dim=-1)))
        shift = torch.where(any_present, gate * self.shift(h), zeros)  # [B, Dt]
        return self.norm(text + _shift_scale(text, shift, self.beta, self.eps) * shift)


@register("mag")
class MAGHead(FusionHead):
    """Multimodal Adaptation Gate (Rahman et al., ACL 2020, eqs. 7-8) on pooled features.

    With t [B, Dt], a [B, Da], v [B, Dv]::

        g_a = relu(W_ga [t; a] + b_a),  g_v = relu(W_gv [t; v] + b_v)           # [B, Dt]
        H = m_a g_a ⊙ (W_a a) + m_v g_v ⊙ (W_v v) + m b_H                       # [B, Dt]
        α = min(β ‖t‖ / (‖H‖ + ε), 1)                                           # [B, 1]
        f = LayerNorm(t + α H)                                                  # [B, Dt] (D = Dt)
        z = W_c dropout(f) + b_c                                                # [B, C]

    An absent modality contributes nothing; the bias b_H is applied only when at least one
    non-verbal modality is present (m = m_a ∨ m_v), so a sample with neither gets H = 0 and
    ``features == LayerNorm(t)`` exactly (``self.norm(text)``). β (``beta``) defaults to 1.0.
    """

    def __init__(
        self,
        text_dim: int,
        audio_dim: int,
        visual_dim: int,
        num_labels: int,
        *,
        beta: float = 1.0,
        eps: float = 1e-6,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(text_dim, audio_dim, visual_dim, num_labels, text_dim, dropout)
        self.beta, self.eps = float(beta), float(eps)
        self.gate_audio = nn.Linear(text_dim + audio_dim, text_dim)
        self.gate_visual = nn.Linear(text_dim + visual_dim, text_dim)
        self.shift_audio = nn.Linear(audio_dim, text_dim, bias=False)
        self.shift_visual = nn.Linear(visual_dim, text_dim, bias=False)
        self.shift_bias = nn.Parameter(torch.zeros(text_dim))
        self.norm = nn.LayerNorm(text_dim)

    def fuse(self, text: Tensor, audio: Tensor, visual: Tensor, has_audio: Tensor, has_visual: Tensor) -> Tensor:
        m_a = has_audio.to(text.dtype).unsqueeze(-1)  # [B, 1]
        m_v = has_visual.to(text.dtype).unsqueeze(-1)
        m = (has_audio | has_visual).to(text.dtype).unsqueeze(-1)
        g_a = F.relu(self.gate_audio(torch.cat([text, audio], dim=-1)))
        g_v = F.relu(self.gate_visual(torch.cat([text, visual], dim=-1)))
        shift = m_a * g_a * self.shift_audio(audio) + m_v * g_v * self.shift_visual(visual) + m * self.shift_bias
        return self.norm(text + _shift_scale(text, shift, self.beta, self.eps) * shift)


class _ReLU(nn.Module):
    """relu as a module that is not ``nn.ReLU``: keeps ``nn.TransformerEncoderLayer`` off its fused
    eval fast path (``aten::_transformer_encoder_layer_fwd``, which has no ONNX export), so eval,
    training and the exported graph run the same ops."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class _CrossModalBlock(nn.Module):
    """Pre-norm cross-modal attention block (MulT): query x [B, 1, D] attends to y [B, 1, D].

        u = x + dropout(MHA(LN_q x, LN_k y, LN_k y))
        out = u + dropout(FFN(LN_f u)),  FFN = W_2 relu(W_1 ·)                 # [B, 1, D]
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_key = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        key = self.norm_key(y)
        attended, _ = self.attention(self.norm_query(x), key, key, need_weights=False)
        u = x + self.dropout(attended)
        return u + self.dropout(self.ffn(self.norm_ffn(u)))


@register("mult")
class MulTHead(FusionHead):
    """MulT-style cross-modal transformer over modality tokens (Tsai et al., ACL 2019), per sample.

    Each modality is one token of width D (``dim``, default 128), e_* learned modality embeddings::

        x_t = W_t t + e_t,  x_a = W_a a + e_a,  x_v = W_v v + e_v              # [B, D] each
        c_a = CM(x_t ← x_a) if m_a else x_t                                    # [B, D]
        c_v = CM(x_t ← x_v) if m_v else x_t                                    # [B, D]
        Y = Encoder([x_t, c_a, c_v], key_padding = [0, ¬m_a, ¬m_v])            # [B, 3, D]
        f = LayerNorm((Y_t + m_a Y_a + m_v Y_v) / (1 + m_a + m_v))              # [B, D]
        z = W_c dropout(f) + b_c                                                # [B, C]

    CM is a pre-norm cross-modal attention block (query = text token, key/value = the other
    modality's token). With one token per modality, masking an absent key is done by replacing the
    block's output with x_t (``torch.where``): the absent modality contributes nothing. The
    encoder is ``nn.TransformerEncoder`` (``num_layers`` pre-norm layers, batch_first, relu FFN
    of width 2D); absent tokens are masked as keys and left out of the mean. Text is always
    present, so no row is fully masked.
    """

    def __init__(
        self,
        text_dim: int,
        audio_dim: int,
        visual_dim: int,
        num_labels: int,
        *,
        dim: int = 128,
        num_heads: int = 4,
        num_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(text_dim, audio_dim, visual_dim, num_labels, dim, dropout)
        _check_heads(dim, num_heads, "model (dim)")
        _check_positive(num_layers=num_layers)
        self.proj_text = nn.Linear(text_dim, dim)
        self.proj_audio = nn.Linear(audio_dim, dim)
        self.proj_visual = nn.Linear(visual_dim, dim)
        self.modality_embedding = nn.Parameter(torch.randn(3, dim) * 0.02)  # rows: text, audio, visual
        self.text_from_audio = _CrossModalBlock(dim, num_heads, dropout)
        self.text_from_visual = _CrossModalBlock(dim, num_heads, dropout)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=2 * dim, dropout=dropout, activation=_ReLU(), batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def fuse(self, text: Tensor, audio: Tensor, visual: Tensor, has_audio: Tensor, has_visual: Tensor) -> Tensor:
        x_t = (self.proj_text(text) + self.modality_embedding[0]).unsqueeze(1)  # [B, 1, D]
        x_a = (self.proj_audio(audio) + self.modality_embedding[1]).unsqueeze(1)
        x_v = (self.proj_visual(visual) + self.modality_embedding[2]).unsqueeze(1)
        a3 = has_audio.view(-1, 1, 1)
        v3 = has_visual.view(-1, 1, 1)
        c_a = torch.where(a3, self.text_from_audio(x_t, x_a), x_t)
        c_v = torch.where(v3, self.text_from_visual(x_t, x_v), x_t)
        tokens = torch.cat([x_t, c_a, c_v], dim=1)  # [B, 3, D]
        present = torch.stack([torch.ones_like(has_audio), has_audio, has_visual], dim=1)  # [B, 3] bool
        encoded = self.encoder(tokens, src_key_padding_mask=~present)  # [B, 3, D]
        weights = present.to(encoded.dtype).unsqueeze(-1)  # [B, 3, 1]
        pooled = (encoded * weights).sum(dim=1) / weights.sum(dim=1)
        return self.norm(pooled)


class _TupleOutput(nn.Module):
    """Wraps a head so that tracing sees ``(logits, features)`` instead of a dataclass."""

    def __init__(self, head: FusionHead) -> None:
        super().__init__()
        self.head = head

    def forward(
        self, text: Tensor, audio: Tensor, visual: Tensor, audio_mask: Tensor, visual_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        out = self.head(text, audio, visual, audio_mask, visual_mask)
        return out.logits, out.features


def export_onnx(head: FusionHead, path: str | Path, *, opset: int = 17, batch: int = 2) -> Path:
    """Export ``head`` (in eval mode) to ONNX with TorchScript tracing (``dynamo=False``).

    Inputs: ``text`` [B, Dt], ``audio`` [B, Da], ``visual`` [B, Dv] float32, ``audio_mask`` [B],
    ``visual_mask`` [B] float32 0/1 (1 = present); outputs ``logits`` [B, C], ``features`` [B, D].
    Axis 0 (B) is dynamic. The head's training flag is restored afterwards; the file is checked with
    ``onnx.checker``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = next(head.parameters())
    example = (
        torch.randn(batch, head.text_dim, device=p.device),
        torch.randn(batch, head.audio_dim, device=p.device),
        torch.randn(batch, head.visual_dim, device=p.device),
        torch.ones(batch, device=p.device),
        torch.ones(batch, device=p.device),
    )
    dynamic = {name: {0: "batch"} for name in (*ONNX_INPUT_NAMES, *ONNX_OUTPUT_NAMES)}
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # PyTorch's own attention code compares traced shapes (constant here): not actionable.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.")
            torch.onnx.export(
                _TupleOutput(head),
                example,
                str(path),
                input_names=list(ONNX_INPUT_NAMES),
                output_names=list(ONNX_OUTPUT_NAMES),
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
    finally:
        head.train(was_training)
    onnx.checker.check_model(str(path))
    return path
