"""Two ONNX Runtime sessions taking turns on few cores: with and without spinning threads.

    python bench/session_spin.py --bundle runs/meld-cpu/bundle --audio-bundle runs/meld-cpu/multimodal/edge/audio \
        --clips MEDIA/output_repeated_splits_test --turns 60

Per turn, as ``erc-distill stream --audio-bundle`` runs it: the speech graph on a real clip's log-mel, then
the INT8 text graph on a turn of random length (20-96 tokens); batch 1, ``--threads`` intra-op threads.
Once with ONNX Runtime's default (threads spin after a run, waiting for more work) and once with
``session.intra_op.allow_spinning = 0`` (what the stream and the fused runtime now use), and the text graph
alone both ways (where spinning is the better default). Writes ``bench/results/session_spin.{json,md}``
with the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np


def session(path: Path, threads: int, spin: bool):
    from erc_distill.export.onnx_export import ort_session

    return ort_session(path, threads, spin=spin)


def text_feed(s, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {"input_ids": rng.integers(5, 1000, (1, n)).astype(np.int64), "attention_mask": np.ones((1, n), np.int64)}
    if "mask_index" in [i.name for i in s.get_inputs()]:
        feed["mask_index"] = np.array([n - 2], np.int64)
    return feed


def measure(args: argparse.Namespace, clips: list[np.ndarray], spin: bool, with_audio: bool) -> dict[str, float]:
    from erc_distill.runtime.audio_bundle import AudioBundle

    rng = np.random.default_rng(0)
    text = session(args.bundle / args.model_file, args.threads, spin)
    audio = session(args.audio_bundle / "model.onnx", args.threads, spin) if with_audio else None
    bundle = AudioBundle.load(args.audio_bundle, verify=False) if with_audio else None
    t_text, t_audio = [], []
    for k in range(args.turns + 3):
        clip = clips[k % len(clips)]
        if audio is not None:
            features, lengths = bundle.features([clip])
            t0 = time.perf_counter()
            audio.run(None, {"features": features, "lengths": lengths.astype(np.int64)})
            t_audio.append(time.perf_counter() - t0)
        else:
            time.sleep(0.002)  # tokenizing and bookkeeping between turns
        feed = text_feed(text, int(rng.integers(20, 96)), rng)
        t0 = time.perf_counter()
        text.run(None, feed)
        t_text.append(time.perf_counter() - t0)
    ms = lambda v, q: round(1000 * float(np.percentile(v[3:], q)), 2)  # noqa: E731
    out = {"text_p50_ms": ms(t_text, 50), "text_p99_ms": ms(t_text, 99)}
    if t_audio:
        out.update(speech_p50_ms=ms(t_audio, 50), speech_p99_ms=ms(t_audio, 99))
    return out


def main() -> None:
    from erc_distill.machine import machine_info, machine_summary
    from erc_distill.media.audio import load_audio

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="a text bundle")
    p.add_argument("--model-file", default="model-int8-ort-dynamic.onnx")
    p.add_argument("--audio-bundle", type=Path, required=True, help="an audio bundle")
    p.add_argument("--clips", type=Path, required=True, help="a folder of .wav clips")
    p.add_argument("--turns", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    files = sorted(args.clips.glob("*.wav"))[: args.turns]
    if not files:
        raise SystemExit(f"no .wav clips in {args.clips}")
    clips = [load_audio(f).samples for f in files]
    rows = {f"{'text + speech' if a else 'text alone'}, {'spinning' if s else 'no spinning'}": measure(args, clips, s, a)
            for a in (True, False) for s in (True, False)}
    result = {"date": date.today().isoformat(), "machine": machine_summary(machine_info()), "threads": args.threads,
              "turns": args.turns, "bundle": str(args.bundle / args.model_file), "audio_bundle": str(args.audio_bundle),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "session_spin.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Two sessions taking turns: spinning threads ({result['date']}, {result['machine']}, "
             f"{args.threads} threads, {args.turns} turns)", "",
             "| setting | text p50 ms | text p99 ms | speech p50 ms | speech p99 ms |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['text_p50_ms']} | {r['text_p99_ms']} | {r.get('speech_p50_ms', '–')} | "
                     f"{r.get('speech_p99_ms', '–')} |")
    (args.out / "session_spin.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
