"""What the stages do differently for text and for audio, behind one small interface.

The teacher, cache, distill and evaluate stages are the same for every modality: train a model on
an objective, cache the teacher's outputs by example id, score predictions. What differs is how a
model is made, saved and loaded, and how a corpus becomes batches:

============  ============================================  ==============================================
              :class:`TextModality`                         :class:`AudioModality`
============  ============================================  ==============================================
model         :class:`~erc_distill.modeling.PromptedClassifier`  :class:`~erc_distill.audio.model.AudioClassifier`
processor     its tokenizer (saved in ``tokenizer/``)       none (features are numpy log-mel / samples)
data          :class:`~erc_distill.data.datamodule.ErcDataModule`   :class:`~erc_distill.audio.data.ClipDataModule`
              (context builder of the role)                 (``--media-dir``, ``--max-seconds``)
input key     the role's context config                     the model's preprocessing + media settings
============  ============================================  ==============================================

``role`` is ``teacher`` or ``student``: it picks the context and training sections of the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from erc_distill.stages.base import RunContext

Role = Literal["teacher", "student"]


class TextModality:
    name = "text"

    def new_model(self, ctx: "RunContext", name: str, role: Role) -> tuple[Any, Any]:
        """A fresh classifier on the pretrained encoder ``name`` and its tokenizer, set up for the role's context."""
        from erc_distill.modeling import load_encoder, prepare_for_context

        model, tok = load_encoder(name, ctx.labels)
        prepare_for_context(model, tok, getattr(ctx.cfg, f"{role}_context"))
        return model, tok

    def load(self, folder: Path, weights: bool = True) -> tuple[Any, Any]:
        """A saved model and its processor (``weights=False``: the architecture, randomly initialised)."""
        from transformers import AutoTokenizer

        from erc_distill.modeling import PromptedClassifier

        return PromptedClassifier.load(folder, weights=weights), AutoTokenizer.from_pretrained(folder / "tokenizer")

    def save(self, model: Any, processor: Any, folder: Path) -> None:
        model.save(folder, processor)

    def write_bundle(self, ctx: "RunContext", model: Any, processor: Any, folder: Path,
                     provenance: dict[str, Any]) -> Path:
        from erc_distill.export.bundle import write_bundle

        return write_bundle(model, processor, ctx.cfg.student_context, folder, provenance=provenance)

    def datamodule(self, ctx: "RunContext", model: Any, processor: Any, role: Role, teacher: Any = None) -> Any:
        return ctx.datamodule(processor, getattr(ctx.cfg, f"{role}_context"), getattr(ctx.cfg, f"{role}_train"),
                              teacher, transfer=role == "student")

    def input_key(self, ctx: "RunContext", model_dir: Path, role: Role) -> str:
        """What turns a corpus row into the model's input (part of the teacher cache's key)."""
        return getattr(ctx.cfg, f"{role}_context").fingerprint()

    def depth(self, model_dir: Path) -> int:
        return int(json.loads((model_dir / "encoder" / "config.json").read_text())["num_hidden_layers"])


class AudioModality:
    name = "audio"

    def new_model(self, ctx: "RunContext", name: str, role: Role) -> tuple[Any, None]:
        from erc_distill.audio.model import load_audio_classifier

        return load_audio_classifier(name, ctx.labels), None

    def load(self, folder: Path, weights: bool = True) -> tuple[Any, None]:
        from erc_distill.audio.model import AudioClassifier

        return AudioClassifier.load(folder, weights=weights), None

    def save(self, model: Any, processor: Any, folder: Path) -> None:
        model.save(folder)

    def write_bundle(self, ctx: "RunContext", model: Any, processor: Any, folder: Path,
                     provenance: dict[str, Any]) -> Path:
        from erc_distill.export.bundle import write_audio_bundle

        return write_audio_bundle(model, folder, provenance=provenance)

    def datamodule(self, ctx: "RunContext", model: Any, processor: Any, role: Role, teacher: Any = None) -> Any:
        from erc_distill.audio.data import ClipDataModule

        c, train = ctx.cfg, getattr(ctx.cfg, f"{role}_train")
        return ClipDataModule(c.data, model.prepare, model.input_kind, c.data_dir, c.media.dir, c.media.max_seconds,
                              batch_size=train.batch_size, eval_batch_size=train.eval_batch_size, seed=train.seed,
                              limit=c.limit, teacher=teacher, log=ctx.log_once, progress=ctx.progress)

    def input_key(self, ctx: "RunContext", model_dir: Path, role: Role) -> str:
        from erc_distill.stages.base import stage_key

        preprocessing = json.loads((model_dir / "erc_model.json").read_text())["preprocessing"]
        return stage_key(preprocessing, ctx.cfg.media)

    def depth(self, model_dir: Path) -> int:
        config = json.loads((model_dir / "encoder" / "config.json").read_text())
        return int(config.get("encoder_layers") or config["num_hidden_layers"])


def new_model(ctx: "RunContext", name: str, role: Role) -> tuple[Any, Any]:
    """``ctx.modality.new_model``, then the role's ``keep_layers`` (a shallower model) applied and checked."""
    from erc_distill.errors import ConfigError

    model, processor = ctx.modality.new_model(ctx, name, role)
    keep = getattr(ctx.cfg, f"{role}_train").keep_layers
    if keep is not None:
        if keep > model.num_layers:
            raise ConfigError(f"{keep} layers to keep, but {name} has {model.num_layers}",
                              field=f"--{role}-train.keep-layers")
        model.keep_lower(keep)
    return model, processor


def modality_of(name: str) -> TextModality | AudioModality:
    return AudioModality() if name == "audio" else TextModality()
