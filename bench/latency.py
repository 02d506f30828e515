"""Per-turn latency and test accuracy of every variant of a run, at batch 1 and fixed lengths.

    python bench/latency.py --run runs/meld-mpnet-base-minilm-l6 --seq 128 256 --iters 200 --rounds 3

Times, on real MELD tokens cut to exactly ``seq`` tokens (mask near the end), batch 1:

- teacher fp32 (PyTorch), student fp32 (PyTorch), student fp32 (ONNX Runtime, the bundle),
- the student INT8 graphs of the run's quantize stage (``bundle/model-int8-*.onnx``),
- the peer row, the plain route a user takes without this project: ``torch.onnx.export`` with its
  defaults, then ``onnxruntime.quantization.quantize_dynamic`` with its defaults, default session,
- the machine's INT8 GEMM ceiling: one ONNX Runtime ``MatMulInteger`` of the student's FFN shape,
  and the fraction of it the best INT8 student reaches (student GOPS / ceiling GOPS).

Accuracy: test metrics from the run's ``metrics.json``; the plain route is scored here on the test
split. Writes ``bench/results/latency.json`` and ``latency.md``, both naming the machine (CPU model,
cores, ISA: the same bench gives teacher / best INT8 19.3x on an AVX-512 VNNI host and 12.2x on an
AVX2-only one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch


def timed(fn, iters: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - start))
    a = np.array(samples)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def fixed_length_input(tokenizer, data, seq: int) -> dict[str, np.ndarray]:
    """Real test-turn tokens, cut to exactly ``seq``: [CLS] ... [SEP] <prompt words> [MASK] [SEP]."""
    ids = [i for t in data.turns[:400] for i in tokenizer(f"{t.speaker}:{t.text}", add_special_tokens=False)["input_ids"]]
    body = ids[: seq - 4]
    x = [tokenizer.cls_token_id, *body, tokenizer.sep_token_id, tokenizer.mask_token_id, tokenizer.sep_token_id]
    return {"input_ids": np.array([x], dtype=np.int64), "attention_mask": np.ones((1, len(x)), dtype=np.int64),
            "mask_index": np.array([len(x) - 2], dtype=np.int64)}


def time_graph(path: Path, inputs: Path, threads: int, iters: int, warmup: int) -> dict[str, float]:
    """Child mode: one session on ``path`` (``threads`` 0: ONNX Runtime's defaults), timed on ``inputs`` (.npz)."""
    import onnxruntime as ort

    from erc_distill.export.onnx_export import ort_session

    feeds = dict(np.load(inputs))
    if threads:
        session = ort_session(path, threads)
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return timed(lambda: session.run(None, feeds), iters, warmup)


def time_alone(path: Path, feeds: dict[str, np.ndarray], threads: int, iters: int, warmup: int) -> dict[str, float]:
    """Time a graph in a fresh process: in-process, idle sessions' pool threads spinning on the same
    2 cores slowed the next session's timings by a third and made them depend on the order."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "inputs.npz", **feeds)
        done = subprocess.run([sys.executable, __file__, "--time-graph", str(path), "--inputs", str(Path(tmp) / "inputs.npz"),
                               "--threads", str(threads), "--iters", str(iters), "--warmup", str(warmup), "--run", "-"],
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def gemm_ceiling(m: int, k: int, n: int, threads: int, iters: int) -> float:
    """GOPS of one INT8 MatMulInteger [m, k] x [k, n] in ONNX Runtime (2·m·k·n ops a run)."""
    import onnx
    from onnx import TensorProto, helper

    from erc_distill.export.onnx_export import ort_session

    rng = np.random.default_rng(0)
    b = rng.integers(-127, 127, size=(k, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        [helper.make_tensor("B", TensorProto.INT8, [k, n], b.flatten().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(model, str(path))
        session = ort_session(path, threads)
        a = rng.integers(0, 255, size=(m, k), dtype=np.uint8)
        t = timed(lambda: session.run(None, {"A": a}), iters, 10)
    return 2 * m * k * n / (t["p50_ms"] / 1000) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder that went through quantize")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seq", type=int, nargs="+", default=[128, 256])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds of the ONNX graphs (each in a fresh process); medians reported")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--time-graph", type=Path, default=None, help=argparse.SUPPRESS)  # child mode, see time_alone
    p.add_argument("--inputs", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.time_graph is not None:
        print(json.dumps(time_graph(args.time_graph, args.inputs, args.threads, args.iters, args.warmup)))
        return

    from transformers import AutoTokenizer

    from erc_distill.data import ContextBuilder, load_corpus
    from erc_distill.data.datamodule import ErcDataModule
    from erc_distill.modeling import PromptedClassifier
    from erc_distill.report.metrics import compute_metrics

    torch.set_num_threads(args.threads)
    manifest = json.loads((args.run / "manifest.json").read_text())
    metrics = json.loads((args.run / "metrics.json").read_text())
    stages = manifest["stages"]
    student_dir = Path(stages["distill"]["artifacts"]["model"])
    student = PromptedClassifier.load(student_dir).eval()
    tok = AutoTokenizer.from_pretrained(student_dir / "tokenizer")
    teacher = teacher_tok = None
    if "teacher" in stages:
        teacher_dir = Path(stages["teacher"]["artifacts"]["model"])
        teacher_weights = PromptedClassifier.has_weights(teacher_dir)  # absent when trained on another machine:
        teacher = PromptedClassifier.load(teacher_dir, weights=teacher_weights).eval()  # time its architecture
        teacher_tok = AutoTokenizer.from_pretrained(teacher_dir / "tokenizer")
    bundle = Path(stages["export"]["artifacts"]["bundle"])
    data_name = manifest["config"]["data"]
    test = load_corpus(data_name, "test", args.data_dir)

    # the plain route: default export, default dynamic quantization, default session
    from onnxruntime.quantization import quantize_dynamic

    from erc_distill.export.onnx_export import _LogitsOnly

    tmp = Path(tempfile.mkdtemp())
    example = fixed_length_input(tok, test, 32)
    torch.onnx.export(_LogitsOnly(student).eval(), tuple(torch.from_numpy(v) for v in example.values()),
                      str(tmp / "plain.onnx"), input_names=list(example), output_names=["logits"],
                      dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}, dynamo=False)
    student.eval()
    quantize_dynamic(str(tmp / "plain.onnx"), str(tmp / "plain-int8.onnx"))
    import onnxruntime as ort

    plain = ort.InferenceSession(str(tmp / "plain-int8.onnx"), providers=["CPUExecutionProvider"])
    dm = ErcDataModule(data_name, ContextBuilder(tok, student_context(manifest)), args.data_dir, eval_batch_size=1)
    pred, gold = [], []
    for b in dm.eval_dataloader("test"):
        feeds = {"input_ids": b.input_ids.numpy(), "attention_mask": b.attention_mask.numpy(), "mask_index": b.mask_index.numpy()}
        pred.append(int(plain.run(None, feeds)[0].argmax()))
        gold.append(int(b.labels[0]))
    plain_metrics = compute_metrics(pred, gold, student.labels).to_dict()

    del plain
    # each graph is timed alone, in a fresh process (time_alone)
    graphs = {"student-fp32-ort": (bundle / "model.onnx", args.threads)}
    if (bundle / "model-fused.onnx").is_file():
        graphs["student-fp32-ort-fused"] = (bundle / "model-fused.onnx", args.threads)
    for f in sorted(bundle.glob("model-int8-*.onnx")):
        graphs[f"student-int8-{f.stem.removeprefix('model-int8-')}"] = (f, args.threads)
    graphs["plain-route-int8"] = (tmp / "plain-int8.onnx", None)  # the plain route: a default session

    rows = []
    for seq in args.seq:
        x = fixed_length_input(tok, test, seq)
        tensors = {k: torch.from_numpy(v) for k, v in x.items()}
        results = {}
        with torch.no_grad():
            if teacher is not None:
                tx = {k: torch.from_numpy(v) for k, v in fixed_length_input(teacher_tok, test, seq).items()}
                results["teacher-fp32-torch"] = timed(lambda: teacher(**tx), args.iters, args.warmup)
            results["student-fp32-torch"] = timed(lambda: student(**tensors), args.iters, args.warmup)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in graphs}
        for _ in range(args.rounds):  # interleaved, so a slow spell of this shared machine hits every graph
            for name, (path, threads) in graphs.items():
                rounds[name].append(time_alone(path, x, threads or 0, args.iters, args.warmup))
        for name, runs in rounds.items():
            results[name] = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            results[name]["round_p50_ms"] = [round(r["p50_ms"], 2) for r in runs]
        for name, r in results.items():
            rows.append({"variant": name, "seq": seq, **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}})

    def f1(name: str) -> float | None:
        key = {"teacher-fp32-torch": "teacher", "student-fp32-torch": "student", "student-fp32-ort": "student",
               "student-fp32-ort-fused": "student"}.get(name, name)
        if name == "plain-route-int8":
            return plain_metrics["weighted_f1"]
        return metrics[key]["test"]["weighted_f1"] if key in metrics else None

    for r in rows:
        r["test_weighted_f1"] = f1(r["variant"])
    hidden = student.hidden_size
    ceiling = {seq: max(gemm_ceiling(seq, hidden, 4 * hidden, args.threads, args.iters) for _ in range(args.rounds))
               for seq in args.seq}
    def dense_params(model) -> int:
        return sum(p.numel() for n, p in model.encoder.named_parameters() if "embeddings" not in n)

    encoder_params = {"student": dense_params(student), "teacher": dense_params(teacher) if teacher is not None else 0}
    for r in rows:
        # dense ops a turn, attention scores aside
        ops = 2 * encoder_params["teacher" if r["variant"].startswith("teacher") else "student"] * r["seq"]
        r["gops"] = round(ops / (r["p50_ms"] / 1000) / 1e9, 1)
        r["fraction_of_int8_gemm_ceiling"] = round(r["gops"] / ceiling[r["seq"]], 3)
    from erc_distill.atomic import write_json, write_text
    from erc_distill.machine import machine_info, machine_summary

    machine = machine_info()
    speedup = {}  # the headline number, which depends on the machine's ISA (VNNI / AMX vs AVX2 only)
    for seq in args.seq:
        by = {r["variant"]: r for r in rows if r["seq"] == seq}
        int8 = [r for name, r in by.items() if name.startswith("student-int8-")]
        if "teacher-fp32-torch" in by and int8:
            best = min(int8, key=lambda r: r["p50_ms"])
            speedup[str(seq)] = {"best_int8": best["variant"],
                                 "x": round(by["teacher-fp32-torch"]["p50_ms"] / best["p50_ms"], 1)}
    result = {"date": date.today().isoformat(), "machine": machine, "teacher_over_best_int8_p50": speedup,
              "threads": args.threads, "run": str(args.run), "iters": args.iters, "rounds": args.rounds,
              "teacher_weights": None if teacher is None else ("trained" if teacher_weights else
                                                               "random: the trained weights are on another machine; "
                                                               "the same architecture is timed"),
              "int8_gemm_ceiling_gops": {str(k): round(v, 1) for k, v in ceiling.items()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "latency.json", result)
    lines = [f"Machine: {machine_summary(machine)}.", "",
             "| variant | seq | p50 ms | p99 ms | test wF1 | GOPS | of INT8 GEMM ceiling |", "|" + " --- |" * 7]
    for r in rows:
        wf1 = f"{100 * r['test_weighted_f1']:.2f}" if r["test_weighted_f1"] is not None else "–"
        lines.append(f"| {r['variant']} | {r['seq']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {wf1} | {r['gops']} | "
                     f"{100 * r['fraction_of_int8_gemm_ceiling']:.0f}% |")
    lines.append(f"\nINT8 GEMM ceiling (MatMulInteger {hidden}x{4 * hidden}): "
                 + ", ".join(f"seq {k}: {v} GOPS" for k, v in result["int8_gemm_ceiling_gops"].items())
                 + f". {args.threads} threads, {result['date']}.")
    if speedup:
        lines.append("\nteacher ÷ best INT8 (p50): " + ", ".join(
            f"seq {k}: {v['x']}x ({v['best_int8']})" for k, v in speedup.items()) + f", on {machine['cpu']['summary']}.")
    write_text(args.out / "latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def student_context(manifest: dict):
    from erc_distill.data import ContextConfig

    return ContextConfig(**manifest["config"]["student_context"])


if __name__ == "__main__":
    main()
