"""A bundle that cannot be trusted is refused with a message naming the file; the stream survives junk."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from erc_distill.errors import BundleError, DataError
from erc_distill.runtime import Bundle, StreamingRecognizer
from erc_distill.runtime.bundle import record_bundle_file
from erc_distill.runtime.stream import serve_lines

from conftest import make_tiny_bundle

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
GOOD = {"conversation": "c", "speaker": "Ross", "text": "Hi there!"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """One tiny exported bundle for the module (spcl prompt, max_len 64); tests copy it before breaking it."""
    return make_tiny_bundle(tmp_path_factory.mktemp("exported") / "bundle")[0]


@pytest.fixture
def bundle_dir(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def bundle(exported) -> Bundle:
    return Bundle.load(exported)


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "bundle.json").read_text())
    change(meta)
    (folder / "bundle.json").write_text(json.dumps(meta))


def load_error(folder: Path, **kwargs) -> str:
    with pytest.raises(BundleError) as info:
        Bundle.load(folder, **kwargs)
    return str(info.value)


# -- the bundle -------------------------------------------------------------------------------------

def test_export_records_size_and_sha256_of_each_file(exported):
    import hashlib

    meta = json.loads((exported / "bundle.json").read_text())
    assert set(meta["files"]) == {"model.onnx", "tokenizer.json"}
    for name, entry in meta["files"].items():
        data = (exported / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert sorted(p.name for p in exported.iterdir()) == ["bundle.json", "model.onnx", "tokenizer.json"]  # no temp files


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.unlink(), "missing"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
])
def test_a_missing_empty_or_truncated_model_is_refused(bundle_dir, damage, expected):
    damage(bundle_dir / "model.onnx")
    message = load_error(bundle_dir)
    assert str(bundle_dir / "model.onnx") in message and expected in message


def flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # the middle of the file is raw initializer data: still a valid graph
    path.write_bytes(bytes(data))


def test_one_flipped_weight_byte_fails_the_checksum(bundle_dir):
    flip_a_weight_byte(bundle_dir / "model.onnx")
    message = load_error(bundle_dir)
    assert message.startswith(f"{bundle_dir / 'model.onnx'}: SHA-256 ")
    assert "does not match bundle.json" in message and "erc-distill export" in message
    # the checksum is what caught it: without hashing the altered graph loads and runs
    b = Bundle.load(bundle_dir, verify=False)
    assert np.isfinite(b.probabilities([b.builder().stream().push("Ross", "Hi!")])).all()


def test_an_altered_tokenizer_fails_the_checksum(bundle_dir):
    path = bundle_dir / "tokenizer.json"
    before = path.read_text()
    path.write_text(before.replace("mask", "task", 1))  # same size: only the hash can tell
    assert path.read_text() != before
    message = load_error(bundle_dir)
    assert str(path) in message and "SHA-256" in message


def test_a_tokenizer_json_tokenizers_cannot_read_is_refused(bundle_dir):
    (bundle_dir / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    record_bundle_file(bundle_dir, "tokenizer.json")  # past the checksum, to the parser
    message = load_error(bundle_dir)
    assert message.startswith(f"{bundle_dir / 'tokenizer.json'}: not a tokenizer")


def test_a_graph_onnx_runtime_cannot_load_is_refused(bundle_dir):
    (bundle_dir / "model.onnx").write_bytes(b"this is not a protobuf" * 100)
    record_bundle_file(bundle_dir, "model.onnx")
    message = load_error(bundle_dir)
    assert message.startswith(f"{bundle_dir / 'model.onnx'}: ONNX Runtime cannot load the graph")


def test_a_label_count_that_does_not_match_the_graph_is_refused(bundle_dir):
    edit_meta(bundle_dir, lambda m: m["labels"].pop())
    message = load_error(bundle_dir)
    assert str(bundle_dir / "model.onnx") in message and "7 logits" in message and "6 labels" in message


def test_the_label_count_of_a_graph_with_a_dynamic_output_is_measured(bundle_dir, monkeypatch):
    import erc_distill.runtime.bundle as runtime_bundle

    class DynamicOutput:  # the real session, reporting its logits width as a symbolic dimension
        def __init__(self, session):
            self.session, self.runs = session, 0

        def get_inputs(self):
            return self.session.get_inputs()

        def get_outputs(self):
            return [type("Out", (), {"shape": ["batch", "labels"]})()]

        def run(self, *args):
            self.runs += 1
            return self.session.run(*args)

    open_session = runtime_bundle._open_session
    monkeypatch.setattr(runtime_bundle, "_open_session", lambda *a: DynamicOutput(open_session(*a)))
    assert Bundle.load(bundle_dir).session.runs == 1  # one dummy input measured 7 logits == 7 labels
    edit_meta(bundle_dir, lambda m: m["labels"].append("sarcasm"))
    message = load_error(bundle_dir)
    assert str(bundle_dir / "model.onnx") in message and "7 logits" in message and "8 labels" in message


def test_special_ids_outside_the_vocabulary_are_refused(bundle_dir):
    edit_meta(bundle_dir, lambda m: m["special_ids"].update(mask=10**6))
    message = load_error(bundle_dir)
    assert "special_ids.mask = 1000000" in message and str(bundle_dir / "tokenizer.json") in message


def test_no_folder_or_no_bundle_json_is_refused(bundle_dir, tmp_path):
    assert "no such bundle folder" in load_error(tmp_path / "nowhere")
    (bundle_dir / "bundle.json").unlink()
    message = load_error(bundle_dir)
    assert message.startswith(f"{bundle_dir / 'bundle.json'}: missing")


@pytest.mark.parametrize("content, expected", [
    ('{"format": 1, "labels": [', "not valid JSON"),
    ("[1, 2]", "not a JSON object (got array)"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_a_bundle_json_that_is_not_a_json_object_is_refused(bundle_dir, content, expected):
    path = bundle_dir / "bundle.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = load_error(bundle_dir)
    assert message.startswith(f"{path}: ") and expected in message


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.pop("labels"), "missing key(s) 'labels'"),
    (lambda m: m.pop("special_ids"), "missing key(s) 'special_ids'"),
    (lambda m: m.update(format=2), "bundle format 2, this erc-distill reads 1"),
    (lambda m: m.update(model="../model.onnx"), "model must be a file name inside the bundle folder"),
    (lambda m: m.update(labels="neutral"), "labels must be a non-empty list"),
    (lambda m: m["context"].update(max_len=2), "context: max_len must be at least 4"),
    (lambda m: m["context"].update(colour="red"), "context:"),
    (lambda m: m["special_ids"].update(cls=None), "special_ids.cls must be a token id"),
    (lambda m: m["files"].update({"model.onnx": "abc"}), "files.model.onnx must be"),
])
def test_a_bundle_json_with_missing_or_bad_keys_is_refused(bundle_dir, change, expected):
    edit_meta(bundle_dir, change)
    message = load_error(bundle_dir)
    assert message.startswith(f"{bundle_dir / 'bundle.json'}: ") and expected in message


def test_an_old_bundle_without_checksums_still_loads(bundle_dir, bundle):
    edit_meta(bundle_dir, lambda m: m.pop("files"))
    old = Bundle.load(bundle_dir)
    x = old.builder().stream().push("Ross", "Oh my God!")
    assert np.allclose(old.probabilities([x]), bundle.probabilities([x]), atol=1e-6)
    (bundle_dir / "model.onnx").write_bytes(b"")  # the checks that need no record still run
    assert "empty" in load_error(bundle_dir)


def test_extra_graphs_recorded_after_export_are_verified(bundle_dir):
    shutil.copyfile(bundle_dir / "model.onnx", bundle_dir / "model-fused.onnx")
    entry = record_bundle_file(bundle_dir, "model-fused.onnx")
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["files"]["model-fused.onnx"] == entry == meta["files"]["model.onnx"]
    assert Bundle.load(bundle_dir, model_file="model-fused.onnx").model_file == "model-fused.onnx"
    flip_a_weight_byte(bundle_dir / "model-fused.onnx")
    assert load_error(bundle_dir, model_file="model-fused.onnx").startswith(
        f"{bundle_dir / 'model-fused.onnx'}: SHA-256 ")
    Bundle.load(bundle_dir)  # the float graph is untouched
    with pytest.raises(BundleError, match="file name inside the bundle folder"):
        record_bundle_file(bundle_dir, "../bundle.json")
    with pytest.raises(BundleError, match="no such file"):
        record_bundle_file(bundle_dir, "model-int8-nope.onnx")


# -- the recognizer ---------------------------------------------------------------------------------

def test_a_text_over_the_cap_is_rejected_before_any_work(bundle):
    recognizer = StreamingRecognizer(bundle, max_text_chars=100)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        recognizer.push("Ross", "a" * 4_000_000, "c")
    assert time.perf_counter() - start < 0.1
    assert info.value.field == "text" and "4000000 characters, over the limit of 100" in str(info.value)
    assert "c" not in recognizer.conversations
    assert recognizer.push("Ross", "a" * 100, "c").turn == 0  # at the cap is fine


@pytest.mark.parametrize("speaker, text, conversation, field", [
    (None, "Hi", "c", "speaker"),
    ("Ross", None, "c", "text"),
    ("Ross", 42, "c", "text"),
    ("Ross", "Hi", True, "conversation"),
    ("Ross", "Hi", 1.5, "conversation"),
    ("Ross", "bad \ud800 text", "c", "text"),
    ("x" * 201, "Hi", "c", "speaker"),
    ("Ross", "Hi", "c" * 201, "conversation"),
])
def test_push_rejects_what_is_not_a_turn(bundle, speaker, text, conversation, field):
    recognizer = StreamingRecognizer(bundle)
    with pytest.raises(DataError) as info:
        recognizer.push(speaker, text, conversation)
    assert info.value.field == field
    assert not recognizer.conversations


def test_a_turn_that_cannot_be_built_leaves_its_conversation_unchanged(bundle):
    turns = [("Ross" if i % 2 else "Rachel", f"turn {i} is a duck") for i in range(11)]  # window (k=8) full
    reference = StreamingRecognizer(bundle)
    expected = [reference.push(s, t, "c") for s, t in turns]
    recognizer = StreamingRecognizer(bundle)
    for s, t in turns[:-1]:
        recognizer.push(s, t, "c")
    for speaker in (" ".join("x" * 99), "{mask}"):  # a prompt over max_len=64 tokens; a second mask
        with pytest.raises(DataError, match="cannot build this turn's input"):
            recognizer.push(speaker, "Hi", "c")
    last = recognizer.push(*turns[-1], "c")
    assert last.turn == expected[-1].turn == 10
    assert last.probabilities == pytest.approx(expected[-1].probabilities, abs=1e-6)


def test_conversations_are_bounded_least_recently_used_first(bundle):
    recognizer = StreamingRecognizer(bundle, max_conversations=3)
    for c in "abc":
        recognizer.push("Ross", "Hi", c)
    assert recognizer.push("Ross", "Again", "a").turn == 1  # a is now the most recent
    recognizer.push("Ross", "Hi", "d")  # evicts b, the least recently used
    assert list(recognizer.conversations) == ["c", "a", "d"] and recognizer.evicted == 1
    for c in "efg":
        recognizer.push("Ross", "Hi", c)
    assert len(recognizer.conversations) == 3 and recognizer.evicted == 4
    assert recognizer.push("Ross", "Back", "a").turn == 0  # its context was evicted: a new conversation


def test_idle_conversations_expire(bundle):
    now = [0.0]
    recognizer = StreamingRecognizer(bundle, idle_ttl_s=10.0, clock=lambda: now[0])
    recognizer.push("Ross", "Hi", "a")
    now[0] = 5.0
    recognizer.push("Ross", "Hi", "b")
    now[0] = 10.0
    assert recognizer.push("Ross", "Still here", "a").turn == 1  # idle exactly the ttl: kept
    now[0] = 15.5
    assert recognizer.push("Monica", "Hello", "a").turn == 2  # a: 5.5 s idle; b: 10.5 s, expired
    assert "b" not in recognizer.conversations and recognizer.expired == 1
    now[0] = 100.0
    assert recognizer.push("Ross", "Hi", "b").turn == 0 and recognizer.expired == 2
    assert recognizer.stats() == {"open": 1, "evicted": 0, "expired": 2, "ended": 0}


# -- the stream protocol ----------------------------------------------------------------------------

def serve(recognizer: StreamingRecognizer, lines, **kwargs) -> tuple[list[dict], dict]:
    out: list[str] = []
    summary = serve_lines(recognizer, lines, out.append, **kwargs)
    return [json.loads(x) for x in out], summary


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


JUNK = [
    (b"\xff\xfe not utf-8\n", "not UTF-8"),
    (b"not json\n", "not JSON"),
    (b'{"speaker": "Ross", "text": "Hi"\n', "not JSON"),
    (b"[1, 2, 3]\n", "not a JSON object (got array)"),
    (b'"just a string"\n', "not a JSON object (got string)"),
    (b"[" * 100_000 + b"\n", "line of 100001 bytes, over the limit"),
    (b"[" * 10_000 + b"]" * 10_000 + b"\n", "nested too deeply"),
    (b'{"conversation": ' + b"9" * 5000 + b"}\n", "not JSON"),
    (b'{"speaker": "Ross", "text": "\\ud800"}\n', "field 'text': contains a lone surrogate (U+D800"),
    (b'{"speaker": "\\udfff", "text": "Hi"}\n', "field 'speaker': contains a lone surrogate"),
    (line({"speaker": "Ross"}), "missing 'text'"),
    (line({"text": "Hi"}), "missing 'speaker'"),
    (line({"speaker": "Ross", "text": None}), "field 'text': must be a string, got null"),
    (line({"speaker": None, "text": "Hi"}), "field 'speaker': must be a string, got null"),
    (line({"speaker": "Ross", "text": ["Hi"]}), "field 'text': must be a string, got array"),
    (line({"speaker": 7, "text": "Hi"}), "field 'speaker': must be a string, got number"),
    (line({"conversation": None, "speaker": "Ross", "text": "Hi"}), "field 'conversation': must be a string or"),
    (line({"conversation": {"id": 1}, "speaker": "Ross", "text": "Hi"}), "field 'conversation'"),
    (line({"conversation": False, "speaker": "Ross", "text": "Hi"}), "got boolean"),
    (line({"speaker": "Ross", "text": "x" * 2001}), "field 'text': 2001 characters, over the limit of 2000"),
    (line({"speaker": "{mask}", "text": "Hi"}), "cannot build this turn's input"),
    (line({"speaker": "Ross", "text": "Hi", "end": "yes"}), "field 'end': must be true or false"),
]


@pytest.mark.parametrize("bad, expected", JUNK, ids=[f"junk{i}" for i in range(len(JUNK))])
def test_a_bad_line_gets_an_error_line_and_the_stream_goes_on(bundle, bad, expected):
    recognizer = StreamingRecognizer(bundle)
    start = time.perf_counter()
    out, summary = serve(recognizer, [line(GOOD), bad, line(GOOD)])
    assert time.perf_counter() - start < 2
    assert len(out) == 3
    assert out[1] == {"error": out[1]["error"], "line": 2}
    assert out[1]["error"].startswith("line 2: ") and expected in out[1]["error"], out[1]["error"]
    assert "None" not in out[1]["error"]
    assert [o.get("turn") for o in (out[0], out[2])] == [0, 1]  # the bad line did not touch conversation c
    assert out[2]["label"] in LABELS
    assert summary["predictions"] == 2 and summary["errors"] == 1 and summary["lines"] == 3


def test_text_lines_and_the_cli_messages(bundle):
    lines = [json.dumps({"conversation": "a", "speaker": "Ross", "text": "Hi!"}), "", "not json",
             json.dumps({"speaker": "x"}), json.dumps({"conversation": 7, "speaker": "Ross", "text": ""})]
    out, summary = serve(StreamingRecognizer(bundle), lines)
    assert out[0]["turn"] == 0 and abs(sum(out[0]["probabilities"].values()) - 1) < 1e-4
    assert set(out[0]) == {"conversation", "turn", "speaker", "label", "probabilities", "latency_ms"}
    assert out[1]["error"].startswith("line 3: not JSON")  # line numbers count the skipped blank line
    assert out[2]["error"].startswith("line 4: missing 'text'")
    assert out[3]["conversation"] == "7" and out[3]["label"] in LABELS  # an int id; empty text is a turn
    assert summary == {"lines": 5, "blank": 1, "predictions": 2, "errors": 2, "ended": 0, "evicted": 0,
                       "expired": 0, "open": 2}


def test_a_4_mb_line_from_a_file_is_skipped_unparsed(bundle):
    stdin = io.BytesIO(line(GOOD) + line({"speaker": "Ross", "text": "x" * 4_000_000}) + line(GOOD))
    start = time.perf_counter()
    out, summary = serve(StreamingRecognizer(bundle), stdin)
    assert time.perf_counter() - start < 1
    assert out[1]["line"] == 2 and "over the limit of 28096 (not parsed)" in out[1]["error"]
    assert [o.get("turn") for o in (out[0], out[2])] == [0, 1] and summary["errors"] == 1


def test_end_closes_a_conversation(bundle):
    lines = [line(GOOD), line({**GOOD, "end": True}), line(GOOD), line({"conversation": "c", "end": True}),
             line({"conversation": "c", "end": True}), line(GOOD)]
    out, summary = serve(StreamingRecognizer(bundle), lines)
    assert [o.get("turn") for o in out] == [0, 1, 0, None, None, 0]
    assert out[1]["ended"] is True and out[3] == {"conversation": "c", "ended": True}
    assert out[4] == {"conversation": "c", "ended": False}  # already closed
    assert summary["ended"] == 2 and summary["predictions"] == 4 and summary["open"] == 1


def test_the_summary_counts_evictions_and_expiries(bundle):
    now = [0.0]
    recognizer = StreamingRecognizer(bundle, max_conversations=2, idle_ttl_s=60, clock=lambda: now[0])
    out, summary = serve(recognizer, [line({**GOOD, "conversation": c}) for c in "abc"])
    assert summary["evicted"] == 1 and summary["open"] == 2
    now[0] = 1000.0
    out, summary = serve(recognizer, [line({**GOOD, "conversation": "d"})])
    assert summary["expired"] == 2 and summary["evicted"] == 0 and summary["open"] == 1


def test_a_tokenizer_saved_with_padding_does_not_pad_turns(tmp_path):
    """MiniLM's tokenizer.json ships with padding and truncation to 128 switched on; the builder pads
    and cuts itself, so the bundle must not pad every segment."""
    from tokenizers import Tokenizer

    folder = make_tiny_bundle(tmp_path / "bundle")[0]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.padding is None and tok.truncation is None  # written without them
    tok.enable_padding(length=128)
    tok.enable_truncation(128)
    tok.save(str(folder / "tokenizer.json"))
    record_bundle_file(folder, "tokenizer.json")
    bundle = Bundle.load(folder)
    assert len(bundle.tokenizer(["hello there"])["input_ids"][0]) < 10
