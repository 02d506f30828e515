"""The prompted encoder classifier that teachers and students share.

A transformers encoder reads the built input (see :mod:`erc_distill.data.context`); the turn's
representation is the encoder's last hidden state at the mask position; a head (dropout + linear)
maps it to the corpus's labels::

    h = Encoder(input_ids, attention_mask)            # [B, T, H]
    f = h[b, mask_index[b]]                           # [B, H]   the "feature" used by feature KD
    z = W · dropout(f) + b                            # [B, C]   logits

Saved as a folder: ``encoder/`` (``save_pretrained``: config + safetensors), ``tokenizer/``,
``head.safetensors`` and ``erc_model.json`` (labels, source, dropout).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from erc_distill.data.context import ContextConfig

TINY_TEXTS = (
    "Oh my God! Is that a puppy? It's a duck. No. It's Joey's. I hate that duck! Why are you so sad?",
    "I lost my job today. Ew, that is disgusting. Don't scare me like that! Great news, everyone!",
    "How was the date? It was amazing! You ate my sandwich? It was just sitting there. MY SANDWICH!",
    "For utterance: feels Now okay well yes no hello hi what where when why how really sorry thanks",
    "Rachel Chandler Ross Monica Phoebe Joey Speaker Mad Scared Joyful Peaceful Powerful Neutral",
)


@dataclass
class ModelOutput:
    """What a model gives the losses. ``logits`` [B, C]; ``features`` [B, H] at the mask;
    ``hidden_states``: per layer [B, T, H] (embeddings first), only when asked for."""

    logits: torch.Tensor
    features: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def layer_features(self, layer: int, batch: Any) -> torch.Tensor:
        """Layer ``layer``'s representation of each example, ``[B, H]``: the text model's hidden state
        at the mask position (an audio model's pools over the valid frames instead)."""
        if self.hidden_states is None:
            raise ValueError("no hidden states: run the model with output_hidden_states=True")
        hidden = self.hidden_states[layer]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, batch.mask_index.to(hidden.device)]


def saved_weights_present(folder: str | Path) -> bool:
    """Whether a saved classifier folder (``encoder/`` + ``head.safetensors``, text or audio) holds its weights."""
    folder = Path(folder)
    return (folder / "head.safetensors").is_file() and any((folder / "encoder").glob("*.safetensors"))


class PromptedClassifier(nn.Module):
    """Encoder + mask-position head. ``forward(input_ids [B,T], attention_mask [B,T], mask_index [B])``."""

    def __init__(self, encoder: nn.Module, labels: tuple[str, ...], dropout: float = 0.1, source: str = "") -> None:
        super().__init__()
        self.encoder = encoder
        self.labels = tuple(labels)
        self.source = source
        self.dropout_p = dropout
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, len(labels))

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask_index: torch.Tensor,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        out = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        features = out.last_hidden_state[rows, mask_index]
        logits = self.head(self.dropout(features))
        return ModelOutput(logits, features, tuple(out.hidden_states) if output_hidden_states else None)

    # -- layer groups (freezing, layer-wise LR decay) ---------------------------------------------
    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from the bottom up: [embeddings, layer 0, ..., layer L-1, rest (pooler, head)]."""
        layers = _encoder_layers(self.encoder)
        embeddings = [p for n, p in self.encoder.named_parameters() if "embeddings" in n.split(".")[0:2]]
        taken = {id(p) for p in embeddings} | {id(p) for layer in layers for p in layer.parameters()}
        rest = [p for p in self.parameters() if id(p) not in taken]
        return [embeddings, *[list(layer.parameters()) for layer in layers], rest]

    def keep_lower(self, n_layers: int) -> int:
        """Keep only the encoder's lowest ``n_layers`` layers (:func:`keep_lower_layers`)."""
        return keep_lower_layers(self.encoder, n_layers)

    def freeze_lower(self, n_layers: int) -> int:
        """Freeze the embeddings and the lowest ``n_layers`` layers; returns the frozen parameter count."""
        frozen = 0
        for group in self.layer_groups()[: 1 + n_layers] if n_layers > 0 else []:
            for p in group:
                p.requires_grad_(False)
                frozen += p.numel()
        return frozen

    # -- persistence -------------------------------------------------------------------------------
    def save(self, folder: str | Path, tokenizer: Any | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder / "encoder", safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / "head.safetensors")
        meta = {"labels": list(self.labels), "dropout": self.dropout_p, "source": self.source}
        (folder / "erc_model.json").write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "tokenizer")
        return folder

    @staticmethod
    def has_weights(folder: str | Path) -> bool:
        """Whether a saved model folder holds its weights (not only configs, as when copied without them)."""
        return saved_weights_present(folder)

    @classmethod
    def load(cls, folder: str | Path, weights: bool = True) -> "PromptedClassifier":
        """A model saved by :meth:`save`. ``weights=False``: the same architecture, randomly initialised
        from the saved configs (for timing a model whose weights live on another machine)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        meta = json.loads((folder / "erc_model.json").read_text())
        if weights:
            encoder = AutoModel.from_pretrained(folder / "encoder", add_pooling_layer=False)
        else:
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder / "encoder"), add_pooling_layer=False)
        model = cls(encoder, tuple(meta["labels"]), meta["dropout"], meta["source"])
        if weights:
            model.head.load_state_dict(load_file(folder / "head.safetensors"))
        return model


def _encoder_layers(encoder: nn.Module) -> list[nn.Module]:
    return list(layer_list(encoder))


def keep_lower_layers(encoder: nn.Module, n_layers: int) -> int:
    """Drop every layer of a transformers ``encoder`` above its lowest ``n_layers`` (the config follows,
    so the model saves and loads at its new depth); returns how many were dropped."""
    layers = layer_list(encoder)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"cannot keep {n_layers} layers of {len(layers)}")
    dropped = len(layers) - n_layers
    del layers[n_layers:]
    encoder.config.num_hidden_layers = n_layers  # Whisper maps it to encoder_layers
    return dropped


def layer_list(encoder: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        obj: Any = encoder
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the layer list of {type(encoder).__name__}")


def tiny_encoder_folder(folder: str | Path, style: str = "roberta", vocab_size: int = 400) -> Path:
    """Write a tiny random encoder (hidden 32, 2 layers) and its tokenizer to ``folder``.

    ``style="roberta"``: RoBERTa with a byte-level BPE (``<s>``/``</s>``/``<mask>``); ``"bert"``: BERT with
    WordPiece (``[CLS]``/``[SEP]``/``[MASK]``). For tests and smoke runs: loads like any hub model.
    """
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    from erc_distill.tiny import train_tiny_tokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))  # whole, or not there at all
    tokenizer = train_tiny_tokenizer(TINY_TEXTS, style, vocab_size=vocab_size)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=520, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if style == "roberta":
        config = RobertaConfig(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **sizes)
        model = RobertaModel(config, add_pooling_layer=False)
    else:
        model = BertModel(BertConfig(**sizes), add_pooling_layer=False)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


TINY_PRESETS = {"tiny": "roberta", "tiny-bert": "bert"}


def load_encoder(name_or_path: str | Path, labels: tuple[str, ...], dropout: float = 0.1) -> tuple[PromptedClassifier, Any]:
    """A fresh classifier on a pretrained encoder (preset, hub id, folder, ``tiny`` or ``tiny-bert``) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    from erc_distill.data.paths import user_cache_dir
    from erc_distill.pretrained import resolve_pretrained

    name = str(name_or_path)
    if name in TINY_PRESETS:
        location = str(tiny_encoder_folder(user_cache_dir() / "models" / f"{name}-v1", TINY_PRESETS[name]))
    else:
        location = resolve_pretrained(name).location
    tokenizer = AutoTokenizer.from_pretrained(location)
    with _quiet_transformers():  # the checkpoint's unused pooler weights are expected: no report
        try:
            encoder = AutoModel.from_pretrained(location, add_pooling_layer=False)
        except TypeError:  # encoders without a pooler argument
            encoder = AutoModel.from_pretrained(location)
    return PromptedClassifier(encoder, labels, dropout, source=name), tokenizer


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def prepare_for_context(model: PromptedClassifier, tokenizer: Any, context: "ContextConfig") -> None:
    """Make tokenizer and model ready for ``context``: speaker tokens (``<s1>``...) for TelME-style
    ``speaker_style='index'``, added as special tokens with the embedding matrix resized."""
    from erc_distill.data.context import add_speaker_tokens

    positions = usable_positions(model.encoder.config)
    if positions is not None and context.max_len > positions:
        from erc_distill.errors import ConfigError

        raise ConfigError(f"max_len {context.max_len} exceeds the {positions} positions of {model.source} "
                          "(longer inputs would fail at inference)", field="--max-len / --teacher-max-len")
    if context.speaker_style == "index" and add_speaker_tokens(tokenizer):
        model.encoder.resize_token_embeddings(len(tokenizer))


def usable_positions(config: Any) -> int | None:
    """Tokens an encoder can take: ``max_position_embeddings``, less RoBERTa-style padding offsets
    (RoBERTa / MPNet number positions from ``pad_token_id + 1``)."""
    total = getattr(config, "max_position_embeddings", None)
    if total is None:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer"):
        total -= (getattr(config, "pad_token_id", 1) or 0) + 1
    return int(total)
