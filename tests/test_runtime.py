"""The inference bundle and the streaming recognizer: offline == streaming, no torch needed."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from erc_distill.cli import main
from erc_distill.data import ContextBuilder, load_corpus
from erc_distill.runtime import Bundle, StreamingRecognizer

from conftest import make_tiny_bundle

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


@pytest.fixture(params=["spcl", "telme"])
def bundle_dir(request, tmp_path):
    folder, model, tok = make_tiny_bundle(tmp_path / "bundle", request.param)
    assert ("<s1>" in tok.get_vocab()) == (request.param == "telme")
    return folder, model, tok


def test_bundle_builds_the_same_ids_as_the_training_tokenizer(bundle_dir, fixture_data):
    folder, _, tok = bundle_dir
    bundle = Bundle.load(folder)
    for d in load_corpus("meld", "train", fixture_data).dialogues:
        assert bundle.builder().build_dialogue(d) == ContextBuilder(tok, bundle.context).build_dialogue(d)


def test_stream_equals_offline_predictions(bundle_dir, fixture_data):
    folder, _, _ = bundle_dir
    bundle = Bundle.load(folder)
    recognizer = StreamingRecognizer(bundle)
    for corpus in ("meld", "emorynlp"):
        for d in load_corpus(corpus, "train", fixture_data).dialogues:
            offline = bundle.probabilities(bundle.builder().build_dialogue(d))  # one padded batch
            online = [recognizer.push(t.speaker, t.text, conversation=f"{corpus}/{d.dialogue_id}") for t in d.turns]
            assert [p.label for p in online] == [LABELS[i] for i in offline.argmax(1)]
            assert np.allclose([[p.probabilities[l] for l in LABELS] for p in online], offline, atol=1e-5)
            assert [p.turn for p in online] == list(range(len(d)))
            assert all(p.latency_ms > 0 for p in online)


def test_bundle_loads_without_torch(bundle_dir, fixture_data):
    folder, _, _ = bundle_dir
    code = f"""
import sys
import erc_distill.cli  # the `erc-distill stream` entry point must not pull torch in either
from erc_distill.runtime import Bundle, StreamingRecognizer
r = StreamingRecognizer(Bundle.load({str(folder)!r}))
print(r.push("Ross", "Hi there!").label)
heavy = sorted(m for m in ("torch", "transformers", "lightning", "torchmetrics") if m in sys.modules)
assert not heavy, heavy
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in LABELS


def test_stream_command_reads_and_writes_json_lines(bundle_dir, monkeypatch, capsys):
    folder, _, _ = bundle_dir
    lines = [
        {"conversation": "a", "speaker": "Ross", "text": "Hi!"},
        {"conversation": "b", "speaker": "Monica", "text": "Hello."},
        {"conversation": "a", "speaker": "Rachel", "text": "Oh my God!"},
    ]
    stdin = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n" + json.dumps({"speaker": "x"}) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["stream", "--bundle", str(folder)]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o.get("turn") for o in out[:3]] == [0, 0, 1]  # conversation a has two turns
    assert all(o["label"] in LABELS and abs(sum(o["probabilities"].values()) - 1) < 1e-4 for o in out[:3])
    assert out[3]["error"].startswith("line 4: not JSON") and out[4]["error"].startswith("line 5: missing 'text'")
