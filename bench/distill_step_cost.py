"""What distillation costs per training step, with the teacher cache, against CE-only training.

Times optimizer steps of the same student on the same batches with two objectives, interleaved
(so machine noise hits both alike): ``ce`` alone, and the distillation objective (default
``ce=1,dist=1,feature=0.5``) reading teacher outputs from the cache. The target: distillation
costs at most 1.2x a CE-only step (the teacher never runs during distillation).

    python bench/distill_step_cost.py --student minilm-l6 --teacher mpnet-base --dialogues 60 --steps 30

Writes ``bench/results/distill_step_cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from erc_distill.data import ContextBuilder, ContextConfig
from erc_distill.data.datamodule import ErcDataModule
from erc_distill.distill.cache import CacheKey, build_cache
from erc_distill.distill.objective import LossConfig, build_objective, parse_loss_spec
from erc_distill.modeling import load_encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="minilm-l6")
    p.add_argument("--teacher", default="mpnet-base", help="teacher whose outputs fill the cache")
    p.add_argument("--data", default="meld")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dialogues", type=int, default=60, help="first N dialogues of each split")
    p.add_argument("--loss", default="ce=1,dist=1,feature=0.5")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    torch.manual_seed(0)
    student, s_tok = load_encoder(args.student, ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"))
    teacher, t_tok = load_encoder(args.teacher, student.labels)
    context = ContextConfig(max_len=args.max_len)
    with tempfile.TemporaryDirectory() as tmp:
        t_dm = ErcDataModule(args.data, ContextBuilder(t_tok, context), args.data_dir, limit=args.dialogues)
        key = CacheKey("bench", args.data, ("train",), context.fingerprint(), args.teacher, (), args.dialogues)
        cache = build_cache(teacher.eval(), t_dm, Path(tmp) / "cache", key)
        dm = ErcDataModule(args.data, ContextBuilder(s_tok, context), args.data_dir, batch_size=args.batch_size,
                           limit=args.dialogues, teacher=cache)
        batches = [b for _, b in zip(range(args.steps), dm.train_dataloader())]
        objectives = {
            "ce": build_objective(LossConfig(), len(student.labels), student.hidden_size),
            "distill": build_objective(LossConfig(weights=parse_loss_spec(args.loss)), len(student.labels),
                                       student.hidden_size, teacher.hidden_size, student_layers=student.num_layers),
        }
        student.train()
        params = list(student.parameters()) + [q for o in objectives.values() for q in o.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-5)
        times: dict[str, list[float]] = {k: [] for k in objectives}
        for i, batch in enumerate(batches):
            for name, objective in objectives.items():
                start = time.perf_counter()
                if objective.needs_teacher:  # the cache lookup is part of the cost
                    batch.teacher = cache.lookup(batch.example_ids)
                out = student(batch.input_ids, batch.attention_mask, batch.mask_index, objective.needs_hidden)
                loss = objective(out, batch).total
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i > 0:  # the first step warms up
                    times[name].append(time.perf_counter() - start)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    result = {
        "date": date.today().isoformat(), "machine": platform.platform(), "cpus": torch.get_num_threads(),
        "student": args.student, "teacher": args.teacher, "loss": args.loss, "objective": str(objectives["distill"]),
        "batch_size": args.batch_size, "max_len": args.max_len, "steps_timed": len(times["ce"]),
        "median_ms_per_step": ms, "ratio_distill_over_ce": ms["distill"] / ms["ce"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill_step_cost.json").write_text(json.dumps(result, indent=2))
    md = (f"| objective | median ms / step |\n| --- | --- |\n| ce | {ms['ce']:.0f} |\n"
          f"| {result['objective']} | {ms['distill']:.0f} |\n\nratio {result['ratio_distill_over_ce']:.3f} "
          f"({args.student}, batch {args.batch_size}, max_len {args.max_len}, {result['machine']}, {result['date']})\n")
    (args.out / "distill_step_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
