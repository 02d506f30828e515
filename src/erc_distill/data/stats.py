"""Per-split corpus statistics, including the token lengths of the built model inputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from erc_distill.data.context import ContextBuilder
from erc_distill.data.types import CorpusSplit


@dataclass(frozen=True)
class InputLengthStats:
    """Token lengths of the built inputs (special tokens included) under one tokenizer and config."""

    tokenizer: str
    max_len: int
    p50: float
    p95: float
    max: int
    mean: float
    context_cut: int
    """Inputs whose context lost turns or tokens to fit ``max_len`` (fewer than min(t, k) + 1 turns)."""
    query_cut: int
    """Inputs whose query utterance had to be cut (even turn t alone did not fit)."""
    mean_context_turns: float


@dataclass(frozen=True)
class SplitStats:
    corpus: str
    split: str
    utterances: int
    dialogues: int
    speakers: int
    labels: dict[str, int]
    """Label counts in the corpus's label order (unlabelled turns under ``None`` are left out)."""
    unlabelled: int
    turns_per_dialogue_mean: float
    turns_per_dialogue_max: int
    input_lengths: InputLengthStats | None = None


def split_stats(data: CorpusSplit, builder: ContextBuilder | None = None, progress: bool = True) -> SplitStats:
    """Count utterances, dialogues, speakers and labels; with a builder, also the built input lengths."""
    turns = data.turns
    counts = Counter(t.label for t in turns)
    sizes = [len(d) for d in data.dialogues]
    lengths = None
    if builder is not None:
        built = [
            x
            for d in tqdm(data.dialogues, desc=f"{data.corpus}/{data.split} inputs", disable=not progress, leave=False)
            for x in builder.build_dialogue(d)
        ]
        n = np.array([len(x) for x in built])
        k = builder.config.max_previous_turns
        lengths = InputLengthStats(
            tokenizer=builder.name,
            max_len=builder.config.max_len,
            p50=float(np.percentile(n, 50)),
            p95=float(np.percentile(n, 95)),
            max=int(n.max()),
            mean=round(float(n.mean()), 2),
            context_cut=sum(1 for x in built if x.context_turns < _available(x.turn_index, k) or x.context_tokens_cut),
            query_cut=sum(1 for x in built if x.query_tokens_cut),
            mean_context_turns=round(float(np.mean([x.context_turns for x in built])), 2),
        )
    return SplitStats(
        corpus=data.corpus,
        split=data.split,
        utterances=len(turns),
        dialogues=len(data.dialogues),
        speakers=len({t.speaker for t in turns}),
        labels={label: counts.get(label, 0) for label in data.labels},
        unlabelled=counts.get(None, 0),
        turns_per_dialogue_mean=round(float(np.mean(sizes)), 2) if sizes else 0.0,
        turns_per_dialogue_max=max(sizes, default=0),
        input_lengths=lengths,
    )


def _available(turn_index: int, k: int | None) -> int:
    """Turns a context could hold before any truncation: turn t and up to k before it."""
    return turn_index + 1 if k is None else min(turn_index, k) + 1
