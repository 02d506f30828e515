"""The context + prompt builder: the exact token ids a model sees for turn t of a conversation.

Layout (``ContextConfig()`` defaults: the SPCL-style prompt of the research this project starts from)::

    [CLS] s_l:u_l [SEP] ... s_t:u_t [SEP] For utterance: s_t:u_t [SEP] s_t feels [MASK] [SEP]
          `------------- context ---------' `-------- query --------'   `----- prompt -----'

``[CLS]``/``[SEP]``/``[MASK]`` are the tokenizer's own special tokens (``<s>``/``</s>``/``<mask>`` for
RoBERTa and MPNet, ``[CLS]``/``[SEP]``/``[MASK]`` for BERT-family models). Each segment is tokenized on
its own (without special tokens) and the ids are joined, so the window rule is exact in tokens.

Window rule (``context_truncation="turns"``): the context is turns l..t where l is the *earliest*
start with ``l >= t - k`` (``k = max_previous_turns``; None = the whole history) such that the whole
input fits in ``max_len`` tokens. If not even turn t fits, the context is empty; if the query and
prompt alone do not fit, the query utterance is cut from its start (its last tokens are kept). The
prompt and the mask are never truncated: a ``max_len`` too small for them is an error. No turn after
t is ever read.

``context_truncation="tokens"`` keeps the last tokens of the context instead of whole turns (TelME's
left truncation). TelME's template (``<s1> u1 <s2> u2 ... </s> Now <s2> feels <mask>``, whole history)
is the ``telme`` preset of this same builder.

:class:`StreamingContext` builds the same ids incrementally, turn by turn, as a robot hears them.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, Literal

from erc_distill.data.types import Dialogue

MASK = "{mask}"


@dataclass(frozen=True)
class ContextConfig:
    """How the input of one turn is built (a typed, hashable part of every cache key)."""

    max_len: int = 256
    """Token budget of the whole input, special tokens included."""
    max_previous_turns: int | None = 8
    """k: at most this many turns before t in the context (None: the whole history)."""
    turn_template: str = "{speaker}:{text}"
    """How a turn is written, in the context and in the query."""
    query_prefix: str | None = "For utterance:"
    """Text before the repeated query turn; None: no query segment (TelME)."""
    prompt_template: str | None = "{speaker} feels {mask}"
    """The prompt; ``{mask}`` becomes the tokenizer's mask token, ``{speaker}`` turn t's speaker.
    None: no prompt, the representation is read at [CLS] (position 0: a plain classifier)."""
    sep_after_each_turn: bool = True
    """True: a [SEP] after every context turn; False: turns run on, one [SEP] ends the context."""
    speaker_style: Literal["name", "index"] = "name"
    """``name``: the speaker as written in the corpus; ``index``: ``<s1>``, ``<s2>``, ... in order of
    first appearance in the dialogue (add them to the tokenizer with :func:`add_speaker_tokens`)."""
    context_truncation: Literal["turns", "tokens"] = "turns"
    """Drop whole oldest turns (``turns``) or oldest tokens (``tokens``) to fit ``max_len``."""

    def __post_init__(self) -> None:
        if self.max_len < 4:
            raise ValueError(f"max_len must be at least 4, got {self.max_len}")
        if self.max_previous_turns is not None and self.max_previous_turns < 0:
            raise ValueError(f"max_previous_turns must be >= 0 or None, got {self.max_previous_turns}")
        if self.prompt_template is not None and self.prompt_template.count(MASK) != 1:
            raise ValueError(f"prompt_template must contain {MASK} exactly once: {self.prompt_template!r}")
        if self.speaker_style not in ("name", "index"):
            raise ValueError(f"speaker_style must be 'name' or 'index', got {self.speaker_style!r}")
        if self.context_truncation not in ("turns", "tokens"):
            raise ValueError(f"context_truncation must be 'turns' or 'tokens', got {self.context_truncation!r}")

    def fingerprint(self) -> str:
        """A short stable hash of every field (part of cache keys)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


CONTEXT_PRESETS: dict[str, ContextConfig] = {
    # SPCL / the research this project starts from (DESIGN.md)
    "spcl": ContextConfig(),
    # TelME: whole history, speaker tokens, `Now <sK> feels <mask>`, left truncation
    "telme": ContextConfig(
        max_len=512,
        max_previous_turns=None,
        turn_template="{speaker} {text}",
        query_prefix=None,
        prompt_template="Now {speaker} feels {mask}",
        sep_after_each_turn=False,
        speaker_style="index",
        context_truncation="tokens",
    ),
    # no context, no repeated query: the utterance with its prompt, read at the mask
    "utterance": ContextConfig(max_previous_turns=0, query_prefix=None),
    # the plain classifier a user would otherwise fine-tune: [CLS] utterance [SEP], read at [CLS]
    "plain": ContextConfig(max_previous_turns=0, turn_template="{text}", query_prefix=None, prompt_template=None,
                           context_truncation="tokens"),
}


def context_preset(name: str, **overrides: Any) -> ContextConfig:
    """A preset by name (``spcl``, ``telme``, ``utterance``), with field overrides."""
    if name not in CONTEXT_PRESETS:
        raise ValueError(f"unknown context preset {name!r}; choose one of: {', '.join(CONTEXT_PRESETS)}")
    return replace(CONTEXT_PRESETS[name], **overrides)


def speaker_tokens(n: int) -> list[str]:
    """``['<s1>', ..., '<sn>']``: the speaker tokens of ``speaker_style='index'``."""
    return [f"<s{i}>" for i in range(1, n + 1)]


def add_speaker_tokens(tokenizer: Any, n: int = 9) -> int:
    """Add ``<s1>``..``<sn>`` to a transformers tokenizer as special tokens; returns how many were new.

    The model's embedding matrix must then be resized (``model.resize_token_embeddings``).
    """
    from tokenizers import AddedToken

    tokens = [AddedToken(t, lstrip=True, rstrip=False, normalized=False) for t in speaker_tokens(n)]
    return tokenizer.add_tokens(tokens, special_tokens=True)


@dataclass(frozen=True)
class EncodedTurn:
    """One turn, tokenized once: as a segment start (``ids``) and as a continuation (``spaced_ids``,
    tokenized with a leading space, which byte-level BPE encodes differently)."""

    speaker: str
    ids: tuple[int, ...]
    spaced_ids: tuple[int, ...]


@dataclass(frozen=True)
class ModelInput:
    """The built input of turn ``turn_index`` (0-based position in its dialogue)."""

    input_ids: tuple[int, ...]
    mask_index: int
    """Position of the mask token: the turn's representation is the encoder state there."""
    turn_index: int
    context_start: int
    """Index of the earliest context turn (partly kept, for token truncation); ``turn_index + 1``
    when the context is empty."""
    context_tokens_cut: int = 0
    """Tokens dropped from the oldest kept turn (``context_truncation='tokens'``)."""
    query_tokens_cut: int = 0
    """Tokens cut from the start of the query utterance because even it did not fit."""

    @property
    def context_turns(self) -> int:
        """Number of turns in the context (turn t included)."""
        return self.turn_index + 1 - self.context_start

    def __len__(self) -> int:
        return len(self.input_ids)


class ContextBuilder:
    """Builds :class:`ModelInput` s for turns of dialogues with one tokenizer and one config.

    ``tokenizer`` is a transformers tokenizer (fast or slow) with a mask token; ``name`` is how the
    user named it (a preset, hub id or folder), for reports.
    """

    def __init__(self, tokenizer: Any, config: ContextConfig | None = None, name: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        self.config = config or ContextConfig()
        self.cls_id = _special_id(tokenizer, "cls_token_id", "bos_token_id")
        self.sep_id = _special_id(tokenizer, "sep_token_id", "eos_token_id")
        self.mask_id = _special_id(tokenizer, "mask_token_id")
        cfg = self.config
        self._query_prefix_ids = tuple(self._tokenize([cfg.query_prefix])[0]) if cfg.query_prefix is not None else ()
        self._prompt_ids = lru_cache(maxsize=4096)(self._make_prompt_ids)
        # fixed cost of an input without any context: [CLS] ... + query [SEP]
        self._fixed = 1 + (len(self._query_prefix_ids) + 1 if cfg.query_prefix is not None else 0)

    # -- tokenization ----------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_turns(self, speakers: Sequence[str], texts: Sequence[str]) -> list[EncodedTurn]:
        """Tokenize turns (speakers already rendered, see :meth:`speaker_labels`) in one batch."""
        if not texts:
            return []
        rendered = [self.config.turn_template.format(speaker=s, text=x) for s, x in zip(speakers, texts)]
        ids = self._tokenize(rendered)
        spaced = self._tokenize([" " + r for r in rendered])
        return [EncodedTurn(s, tuple(a), tuple(b)) for s, a, b in zip(speakers, ids, spaced)]

    def speaker_labels(self, speakers: Iterable[str]) -> list[str]:
        """Speakers as written into the input (names, or ``<sK>`` by first appearance)."""
        speakers = list(speakers)
        if self.config.speaker_style == "name":
            return speakers
        order: dict[str, int] = {}
        return [f"<s{order.setdefault(s, len(order) + 1)}>" for s in speakers]

    def _make_prompt_ids(self, speaker: str) -> tuple[int, ...]:
        if self.config.prompt_template is None:
            return ()
        before, after = self.config.prompt_template.format(speaker=speaker, mask=MASK).split(MASK)
        before_ids = self._tokenize([before.rstrip()])[0] if before.strip() else []
        after_ids = self._tokenize([after])[0] if after.strip() else []
        return (*before_ids, self.mask_id, *after_ids, self.sep_id)

    # -- building --------------------------------------------------------------------------------
    def window(self, encoded: Sequence[EncodedTurn], index: int) -> Sequence[EncodedTurn]:
        """The candidate context of turn ``index``: turns max(0, index-k)..index (never later)."""
        k = self.config.max_previous_turns
        start = 0 if k is None else max(0, index - k)
        return encoded[start : index + 1]

    def assemble(self, window: Sequence[EncodedTurn], turn_index: int) -> ModelInput:
        """Build the input of the last turn of ``window`` (turn ``turn_index`` of its dialogue)."""
        cfg = self.config
        current = window[-1]
        prompt = self._prompt_ids(current.speaker)
        query_utt: tuple[int, ...] = current.spaced_ids if cfg.query_prefix is not None else ()
        budget = cfg.max_len - self._fixed - len(prompt) - len(query_utt)
        query_cut = 0
        if budget < 0:
            query_cut = -budget
            if cfg.query_prefix is None or query_cut > len(query_utt):
                raise ValueError(
                    f"max_len={cfg.max_len} cannot hold the prompt ({len(prompt)} tokens with [SEP]) plus "
                    f"{self._fixed} special/query-prefix tokens; raise max_len"
                )
            query_utt, budget = query_utt[query_cut:], 0

        context, start, context_cut = self._context(window, budget)
        ids: list[int] = [self.cls_id, *context]
        if cfg.query_prefix is not None:
            ids += [*self._query_prefix_ids, *query_utt, self.sep_id]
        ids += prompt
        if prompt:
            mask_index = len(ids) - 1 - prompt[::-1].index(self.mask_id)
        else:  # no prompt: the context block ends with its own [SEP]; read the encoder at [CLS]
            if ids[-1] != self.sep_id:
                ids.append(self.sep_id)
            mask_index = 0
        first = turn_index - len(window) + 1
        return ModelInput(tuple(ids), mask_index, turn_index, first + start, context_cut, query_cut)

    def _pieces(self, window: Sequence[EncodedTurn], start: int) -> tuple[list[tuple[int, ...]], int]:
        """Token pieces of turns start..end and the trailing [SEP] count of the context block."""
        if self.config.sep_after_each_turn:
            return [(*t.ids, self.sep_id) for t in window[start:]], 0
        turns = window[start:]
        return [turns[0].ids, *(t.spaced_ids for t in turns[1:])], 1

    def _context(self, window: Sequence[EncodedTurn], budget: int) -> tuple[list[int], int, int]:
        """(context ids, index in ``window`` of its first turn, tokens cut from that turn)."""
        n = len(window)
        if self.config.context_truncation == "turns":
            for start in range(n):  # earliest start that fits
                pieces, tail = self._pieces(window, start)
                if sum(map(len, pieces)) + tail <= budget:
                    return [i for p in pieces for i in p] + [self.sep_id] * tail, start, 0
            return [], n, 0
        pieces, tail = self._pieces(window, 0)
        keep = budget - tail
        if keep <= 0:
            return [], n, 0
        out: list[int] = []
        for start in range(n - 1, -1, -1):  # walk back from turn t, cutting the oldest kept turn
            piece = pieces[start]
            room = keep - len(out)
            if room == 0:
                return out + [self.sep_id] * tail, start + 1, 0
            if len(piece) >= room:
                cut = len(piece) - room
                return list(piece[cut:]) + out + [self.sep_id] * tail, start, cut
            out = list(piece) + out
        return out + [self.sep_id] * tail, 0, 0

    def build_dialogue(self, dialogue: Dialogue) -> list[ModelInput]:
        """Inputs for every turn of ``dialogue`` (turn t reads turns <= t only)."""
        turns = dialogue.turns
        encoded = self.encode_turns(self.speaker_labels(t.speaker for t in turns), [t.text for t in turns])
        return [self.assemble(self.window(encoded, i), i) for i in range(len(encoded))]

    def build_turn(self, dialogue: Dialogue, index: int) -> ModelInput:
        """The input of the turn at position ``index`` (reads only turns up to it)."""
        if not 0 <= index < len(dialogue.turns):
            raise IndexError(f"dialogue {dialogue.dialogue_id} has {len(dialogue.turns)} turns, no index {index}")
        seen = dialogue.turns[: index + 1]
        encoded = self.encode_turns(self.speaker_labels(t.speaker for t in seen), [t.text for t in seen])
        return self.assemble(self.window(encoded, index), index)

    def stream(self) -> StreamingContext:
        """A fresh incremental builder for one conversation."""
        return StreamingContext(self)

    def decode(self, model_input: ModelInput) -> str:
        return self.tokenizer.decode(list(model_input.input_ids), skip_special_tokens=False)


class StreamingContext:
    """Builds inputs turn by turn, as a live conversation unfolds (real-time mode).

    Each turn is tokenized once, when pushed; only the last ``k + 1`` encoded turns are kept, and
    fewer when the newer ones already fill ``max_len``: a turn j can enter a later input only while
    Σ_{i>j} len(turn i) < max_len, so older turns are dropped (this bounds memory and per-turn cost
    for whole-history presets such as ``telme``). For the same turns, the ids equal
    :meth:`ContextBuilder.build_dialogue` exactly.
    """

    def __init__(self, builder: ContextBuilder) -> None:
        self.builder = builder
        k = builder.config.max_previous_turns
        self._window: deque[EncodedTurn] = deque(maxlen=None if k is None else k + 1)
        self._speakers: dict[str, int] = {}
        self.turns_seen = 0

    def push(self, speaker: str, text: str) -> ModelInput:
        """Add the next turn and return its input."""
        b = self.builder
        if b.config.speaker_style == "index":
            label = f"<s{self._speakers.setdefault(speaker, len(self._speakers) + 1)}>"
        else:
            label = speaker
        self._window.append(b.encode_turns([label], [text])[0])
        sep = 1 if b.config.sep_after_each_turn else 0
        newer = sum(min(len(t.ids), len(t.spaced_ids)) + sep for t in list(self._window)[1:])
        while len(self._window) > 1 and newer >= b.config.max_len:  # the oldest can never fit again
            self._window.popleft()
            head = self._window[0]
            newer -= min(len(head.ids), len(head.spaced_ids)) + sep
        out = b.assemble(list(self._window), self.turns_seen)
        self.turns_seen += 1
        return out


def _special_id(tokenizer: Any, *names: str) -> int:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    kind = names[0].replace("_token_id", "")
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no {kind} token (looked for {', '.join(names)}); "
        "the prompt needs an encoder tokenizer with a mask token (RoBERTa, MPNet, BERT, ...)"
    )
