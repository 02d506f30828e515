"""The context + prompt builder: exact layout, the window rule at its boundaries, no future turns,
the prompt never truncated, and streaming == batch."""

from __future__ import annotations

import dataclasses

import pytest

from erc_distill.data import ContextBuilder, ContextConfig, Dialogue, context_preset, get_corpus, load_corpus
from erc_distill.data.context import add_speaker_tokens
from erc_distill.data.corpora import read_split

from conftest import FIXTURES, TINY_TEXTS, make_dialogue


@pytest.fixture
def duck() -> Dialogue:
    return read_split(get_corpus("meld"), FIXTURES / "meld_train.csv", "train").dialogue(0)


@pytest.fixture(params=["bert", "roberta"])
def tokenizer(request, bert_tokenizer, roberta_tokenizer):
    return {"bert": bert_tokenizer, "roberta": roberta_tokenizer}[request.param]


def reference_ids(tok, dialogue: Dialogue, t: int, cfg: ContextConfig) -> list[int]:
    """The research's algorithm for the default (SPCL-style) layout, written out plainly.

    [CLS] s_l:u_l [SEP] ... s_t:u_t [SEP] For utterance: s_t:u_t [SEP] s_t feels [MASK] [SEP],
    l = the earliest start >= t - k that fits max_len; else no context; else cut the query's start.
    """
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    turns = dialogue.turns
    cur = turns[t]
    query_utt = enc(" " + f"{cur.speaker}:{cur.text}")
    tail = enc(cfg.query_prefix) + query_utt + [tok.sep_token_id] + enc(f"{cur.speaker} feels")
    tail += [tok.mask_token_id, tok.sep_token_id]
    k = t if cfg.max_previous_turns is None else cfg.max_previous_turns
    for start in range(max(0, t - k), t + 1):
        context = [i for turn in turns[start : t + 1] for i in enc(f"{turn.speaker}:{turn.text}") + [tok.sep_token_id]]
        ids = [tok.cls_token_id] + context + tail
        if len(ids) <= cfg.max_len:
            return ids
    ids = [tok.cls_token_id] + tail
    overflow = len(ids) - cfg.max_len
    if overflow > 0:  # cut the query utterance from its start
        q = len(enc(cfg.query_prefix))
        ids = ids[: 1 + q] + ids[1 + q + overflow :]
    return ids


# ---------------------------------------------------------------------------------- layout


def test_exact_layout_bert_family(bert_tokenizer, duck):
    b = ContextBuilder(bert_tokenizer)
    x = b.build_turn(duck, 2)
    assert b.decode(x) == (
        "[CLS] rachel : oh my god! is that a puppy? [SEP] ross : no. it ' s joey ' s. [SEP] "
        "chandler : it ' s a duck, rach. a baby duck. [SEP] for utterance : chandler : it ' s a duck, "
        "rach. a baby duck. [SEP] chandler feels [MASK] [SEP]"
    )
    assert x.input_ids[x.mask_index] == bert_tokenizer.mask_token_id
    assert (x.turn_index, x.context_start, x.context_turns) == (2, 0, 3)


def test_exact_layout_roberta_family(roberta_tokenizer, duck):
    tok = roberta_tokenizer
    b = ContextBuilder(tok)
    x = b.build_turn(duck, 1)
    assert b.decode(x) == (
        "<s>Rachel:Oh my God! Is that a puppy?</s>Ross:No. It's Joey's.</s>"
        "For utterance: Ross:No. It's Joey's.</s>Ross feels<mask></s>"
    )
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # the query turn follows text, so it is encoded with its leading space (byte-level BPE)
    query = enc("For utterance:") + enc(" Ross:No. It's Joey's.")
    assert query == enc("For utterance: Ross:No. It's Joey's.")
    assert list(x.input_ids) == reference_ids(tok, duck, 1, b.config)
    assert x.input_ids[0] == tok.convert_tokens_to_ids("<s>") and x.input_ids[-1] == tok.convert_tokens_to_ids("</s>")


def test_mask_position_is_the_mask_token(tokenizer, fixture_data):
    for corpus in ("meld", "emorynlp", "iemocap"):
        for d in load_corpus(corpus, "train", fixture_data).dialogues:
            for x in ContextBuilder(tokenizer).build_dialogue(d):
                assert x.input_ids[x.mask_index] == tokenizer.mask_token_id
                assert x.input_ids.count(tokenizer.mask_token_id) == 1


# ---------------------------------------------------------------------------------- window rule

LONG = make_dialogue([(("Ross", "Rachel", "Joey")[i % 3], f"hello number {i} okay") for i in range(12)])


@pytest.mark.parametrize("k, turn, start", [(8, 11, 3), (8, 8, 0), (8, 5, 0), (0, 7, 7), (None, 11, 0), (2, 11, 9)])
def test_k_previous_turns_at_most(tokenizer, k, turn, start):
    b = ContextBuilder(tokenizer, ContextConfig(max_len=10_000, max_previous_turns=k))
    x = b.build_turn(LONG, turn)
    assert x.context_start == start
    assert list(x.input_ids) == reference_ids(tokenizer, LONG, turn, b.config)


def test_max_len_boundary_exact_fit_and_one_less(tokenizer):
    full = ContextBuilder(tokenizer, ContextConfig(max_len=10_000)).build_turn(LONG, 11)
    assert full.context_start == 3  # k = 8 limits it
    fits = ContextBuilder(tokenizer, ContextConfig(max_len=len(full))).build_turn(LONG, 11)
    assert fits.input_ids == full.input_ids and fits.context_start == 3
    short = ContextBuilder(tokenizer, ContextConfig(max_len=len(full) - 1)).build_turn(LONG, 11)
    assert short.context_start == 4  # the oldest turn is dropped whole
    assert len(short) < len(full) and short.input_ids[-12:] == full.input_ids[-12:]


def test_every_budget_matches_the_reference_algorithm(tokenizer, duck):
    cfg0 = ContextConfig(max_len=10_000)
    for d in (duck, LONG):
        for t in range(len(d)):
            longest = len(ContextBuilder(tokenizer, cfg0).build_turn(d, t))
            for max_len in range(max(4, longest - 40), longest + 2):
                cfg = dataclasses.replace(cfg0, max_len=max_len)
                try:
                    x = ContextBuilder(tokenizer, cfg).build_turn(d, t)
                except ValueError:
                    continue  # too small for the prompt: tested below
                assert list(x.input_ids) == reference_ids(tokenizer, d, t, cfg), (t, max_len)
                assert len(x) <= max_len


def test_no_turn_after_t_is_ever_used(tokenizer, duck):
    b = ContextBuilder(tokenizer)
    original = b.build_dialogue(duck)
    for t in range(len(duck)):
        changed = Dialogue(
            duck.corpus, duck.split, duck.dialogue_id,
            duck.turns[: t + 1] + tuple(dataclasses.replace(x, text="sandwich " * 50, speaker="Zed")
                                       for x in duck.turns[t + 1 :]),
        )
        assert b.build_dialogue(changed)[t] == original[t]
        assert b.build_turn(duck, t) == original[t]


# ---------------------------------------------------------------------------------- truncation


def test_prompt_is_never_truncated_and_query_is_cut_from_its_start(tokenizer):
    words = " ".join(f"okay{i % 7} hello" for i in range(200))
    d = make_dialogue([("Ross", "hi"), ("Rachel", words)])
    b = ContextBuilder(tokenizer, ContextConfig(max_len=40))
    x = b.build_turn(d, 1)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc("Rachel feels") + [tokenizer.mask_token_id, tokenizer.sep_token_id]
    assert len(x) == 40
    assert list(x.input_ids[-len(prompt) :]) == prompt
    assert x.context_turns == 0 and x.query_tokens_cut > 0
    query = enc(" Rachel:" + words)
    kept = list(x.input_ids[1 + len(enc("For utterance:")) : -len(prompt) - 1])
    assert kept == query[-len(kept) :]  # the end of the utterance is kept
    assert x.query_tokens_cut == len(query) - len(kept)


def test_context_goes_before_the_query_is_cut(tokenizer):
    d = make_dialogue([("Ross", "hello " * 30), ("Rachel", "okay yes")])
    x = ContextBuilder(tokenizer, ContextConfig(max_len=30)).build_turn(d, 1)
    assert x.query_tokens_cut == 0 and x.context_start == 1  # turn 0 dropped, turn 1 kept
    assert x.input_ids == ContextBuilder(tokenizer, ContextConfig(max_len=30, max_previous_turns=0)).build_turn(d, 1).input_ids


def test_max_len_too_small_for_the_prompt_is_an_error(tokenizer, duck):
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        ContextBuilder(tokenizer, ContextConfig(max_len=6)).build_turn(duck, 0)


# ---------------------------------------------------------------------------------- presets


def test_telme_preset_layout_and_left_token_truncation(roberta_tokenizer, duck):
    tok = roberta_tokenizer
    add_speaker_tokens(tok, 9)
    b = ContextBuilder(tok, context_preset("telme"))
    x = b.build_turn(duck, 3)
    assert b.decode(x) == (
        "<s><s1> Oh my God! Is that a puppy?<s2> No. It's Joey's.<s3> It's a duck, Rach.\nA baby duck."
        "<s1> I hate that duck!</s>Now<s1> feels<mask></s>"
    )
    assert x.input_ids.count(tok.sep_token_id) == 2  # one after the context, one after the prompt
    full = len(x)
    cut = ContextBuilder(tok, context_preset("telme", max_len=full - 5)).build_turn(duck, 3)
    assert len(cut) == full - 5 and cut.context_tokens_cut == 5 and cut.context_start == 0
    assert cut.input_ids[1:] == x.input_ids[6:]  # the oldest 5 tokens go; everything after stays
    assert cut.input_ids[0] == x.input_ids[0]


def test_utterance_preset_has_no_context(bert_tokenizer, duck):
    b = ContextBuilder(bert_tokenizer, context_preset("utterance"))
    assert b.decode(b.build_turn(duck, 3)) == "[CLS] rachel : i hate that duck! [SEP] rachel feels [MASK] [SEP]"


def test_plain_preset_is_a_cls_classifier_input(bert_tokenizer, duck):
    b = ContextBuilder(bert_tokenizer, context_preset("plain"))
    x = b.build_turn(duck, 3)
    assert b.decode(x) == "[CLS] i hate that duck! [SEP]" and x.mask_index == 0
    long = make_dialogue([("Ross", "hello okay " * 100)])
    cut = ContextBuilder(bert_tokenizer, context_preset("plain", max_len=16)).build_turn(long, 0)
    assert len(cut) == 16 and cut.input_ids[-1] == bert_tokenizer.sep_token_id and cut.context_tokens_cut > 0


def test_config_validation_and_fingerprint():
    with pytest.raises(ValueError, match="exactly once"):
        ContextConfig(prompt_template="{speaker} feels")
    with pytest.raises(ValueError, match="unknown context preset"):
        context_preset("nope")
    assert ContextConfig().fingerprint() == context_preset("spcl").fingerprint()
    assert ContextConfig(max_len=128).fingerprint() != ContextConfig().fingerprint()


def test_tokenizer_without_a_mask_token_is_refused():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(ValueError, match="no cls token"):
        ContextBuilder(tok)


# ---------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("preset", ["spcl", "telme", "utterance", "plain"])
def test_streaming_equals_batch_on_fixtures(roberta_tokenizer, bert_tokenizer, fixture_data, preset):
    for tok in (bert_tokenizer, roberta_tokenizer):
        if preset == "telme":
            add_speaker_tokens(tok, 9)
        for max_len in (32, 48, 512):
            b = ContextBuilder(tok, context_preset(preset, max_len=max_len))
            for corpus in ("meld", "emorynlp", "iemocap"):
                for d in load_corpus(corpus, "train", fixture_data).dialogues:
                    stream = b.stream()
                    assert all(len(x) <= max_len for x in b.build_dialogue(d))
                    assert [stream.push(t.speaker, t.text) for t in d.turns] == b.build_dialogue(d)


@pytest.mark.realdata
@pytest.mark.pretrained
@pytest.mark.parametrize("preset", ["spcl", "telme"])
def test_streaming_equals_batch_on_real_meld_with_minilm(real_data, minilm_tokenizer, preset):
    add_speaker_tokens(minilm_tokenizer, 9)
    b = ContextBuilder(minilm_tokenizer, context_preset(preset, max_len=128))
    data = load_corpus("meld", "dev", real_data)
    n = 0
    for d in data.dialogues:
        stream = b.stream()
        batch = b.build_dialogue(d)
        for t, expected in zip(d.turns, batch):
            assert stream.push(t.speaker, t.text) == expected
            assert len(expected) <= 128
            n += 1
    assert n == 1109


@pytest.mark.realdata
@pytest.mark.pretrained
def test_real_meld_matches_the_reference_algorithm(real_data, minilm_tokenizer):
    data = load_corpus("meld", "test", real_data)
    for max_len in (64, 256):
        cfg = ContextConfig(max_len=max_len)
        b = ContextBuilder(minilm_tokenizer, cfg)
        for d in data.dialogues[:40]:
            for t, x in enumerate(b.build_dialogue(d)):
                assert list(x.input_ids) == reference_ids(minilm_tokenizer, d, t, cfg)


@pytest.mark.parametrize("preset", ["telme", "spcl"])
def test_a_long_live_conversation_keeps_a_bounded_window(roberta_tokenizer, preset):
    """Whole-history presets used to keep every turn (per-turn cost grew with the conversation);
    turns that can never fit again are dropped, and the inputs still equal the offline ones."""
    if preset == "telme":
        add_speaker_tokens(roberta_tokenizer, 9)
    b = ContextBuilder(roberta_tokenizer, context_preset(preset, max_len=48))
    lines = [(f"Speaker{i % 3}", TINY_TEXTS[i % len(TINY_TEXTS)].split(". ")[0]) for i in range(400)]
    d = make_dialogue(lines)
    stream = b.stream()
    online = [stream.push(s, t) for s, t in lines]
    assert online == b.build_dialogue(d)
    assert len(stream._window) <= 48  # bounded by max_len tokens (every turn is at least one token)
