"""Conversations in, model inputs out: corpus readers, the context + prompt builder, statistics."""

from erc_distill.data.context import (
    CONTEXT_PRESETS,
    ContextBuilder,
    ContextConfig,
    ModelInput,
    StreamingContext,
    context_preset,
)
from erc_distill.data.corpora import CORPORA, CorpusSpec, get_corpus, load_corpus, read_split
from erc_distill.data.fetch import ensure_corpus
from erc_distill.data.fingerprint import corpus_files, corpus_fingerprint
from erc_distill.data.ravdess import RAVDESS_LABELS, RAVDESS_TO_MELD, parse_ravdess_name, ravdess_to_meld
from erc_distill.data.types import SPLITS, CorpusSplit, Dialogue, MediaRef, SourceRef, Turn

__all__ = [
    "CONTEXT_PRESETS", "CORPORA", "RAVDESS_LABELS", "RAVDESS_TO_MELD", "SPLITS", "ContextBuilder", "ContextConfig",
    "CorpusSpec", "CorpusSplit", "Dialogue", "MediaRef", "ModelInput", "SourceRef", "StreamingContext", "Turn",
    "context_preset", "corpus_files", "corpus_fingerprint", "ensure_corpus", "get_corpus", "load_corpus",
    "parse_ravdess_name", "ravdess_to_meld", "read_split",
]
