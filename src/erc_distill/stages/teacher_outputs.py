"""``erc-distill teacher-outputs --to FILE.npz``: the run's teacher (trained, or reused from the cache) labels
every example it can teach, and its logits are written as a portable file (:mod:`erc_distill.distill.outputs`)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from erc_distill.data.types import SPLITS
from erc_distill.stages.base import RunContext, params


def export_teacher_outputs(ctx: RunContext, path: str | Path) -> Path:
    """Predict train, dev, test and the run's transfer turns with the run's teacher; write ``path`` (+ .json)."""
    import torch

    from erc_distill.data import corpus_fingerprint
    from erc_distill.distill.cache import weights_hash
    from erc_distill.distill.module import predict
    from erc_distill.distill.outputs import write_teacher_outputs
    from erc_distill.report.metrics import compute_metrics

    c = ctx.cfg
    model_dir = ctx.manifest.artifact("teacher", "model")
    model, tok = ctx.modality.load(model_dir)
    dm = ctx.datamodule(tok, c.teacher_context, c.teacher_train, transfer=bool(c.transfer))
    transfer_ids = {t.example_id for t in ctx.transfer_set().turns} if c.transfer else set()
    ids: list[str] = []
    splits: list[str] = []
    logits = []
    scores = {}
    for split in SPLITS:
        split_ids, z, _, _ = predict(model, dm.eval_dataloader(split), ctx.infer_device)
        ids += split_ids
        splits += ["transfer" if i in transfer_ids else split for i in split_ids]
        logits.append(z.numpy())
        if split != "train":
            gold = {e.example_id: e.label for e in dm.examples_of(split)}
            y = torch.tensor([gold[i] for i in split_ids])
            keep = y >= 0
            scores[split] = compute_metrics(z.argmax(-1)[keep], y[keep], ctx.labels).to_dict()
            ctx.log(f"teacher {split:<5} weighted F1 {100 * scores[split]['weighted_f1']:.2f}")
    record = ctx.manifest.record("teacher")
    meta = {
        "teacher": str(c.teacher), "teacher_key": record.get("key"), "params": params(model),
        "teacher_weights": weights_hash(model_dir),  # the cache key's: a member's features must come from these
        "teacher_context": asdict(c.teacher_context), "teacher_train": asdict(c.teacher_train),
        "teacher_loss": c.teacher_loss.key(), "corpus": c.data, "labels": list(ctx.labels),
        "data_fingerprint": ctx.data_fingerprint, "limit": c.limit, "metrics": scores,
        "transfer": ({"sources": list(c.transfer), **ctx.transfer_set().report.to_dict(),
                      "data": {"emorynlp": corpus_fingerprint("emorynlp", c.data_dir)} if "emorynlp" in c.transfer
                      else {}} if c.transfer else None),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = write_teacher_outputs(path, ids, splits, np.concatenate(logits), meta)
    ctx.log(f"teacher outputs: {len(ids)} examples ({', '.join(f'{s} {splits.count(s)}' for s in dict.fromkeys(splits))}) "
            f"-> {out}")
    return out
