"""``export``: the student as an inference bundle (float ONNX, checked against PyTorch on dev), then
ONNX Runtime's transformer fusions, held to the same parity."""

from __future__ import annotations

from dataclasses import asdict

from erc_distill.stages.base import RunContext, Stage, StageResult, stage_key

BUNDLE_VERSION = "bundle-v3"  # v3: files checksummed in bundle.json


class ExportStage(Stage):
    name = "export"
    needs = ("distill",)

    def key(self, ctx: RunContext) -> str:
        return stage_key(ctx.manifest.record("distill")["key"], BUNDLE_VERSION)

    def run(self, ctx: RunContext) -> StageResult:
        from erc_distill.export.onnx_export import check_float_parity, fuse_transformer
        from erc_distill.runtime.bundle import record_bundle_file

        record = ctx.manifest.record("distill")
        model, tok = ctx.modality.load(ctx.manifest.artifact("distill", "model"))
        model.eval()
        bundle = ctx.modality.write_bundle(ctx, model, tok, ctx.out / "bundle",
                                           provenance={"run": str(ctx.out), "distill_key": record["key"]})
        dm = ctx.modality.datamodule(ctx, model, tok, "student")
        parity = check_float_parity(model, bundle / "model.onnx", dm.eval_dataloader("dev"))
        ctx.log(f"bundle {bundle}: ONNX vs PyTorch on dev: {parity}")
        # the folder is checked for presence only (quantize adds graphs and their bundle.json entries);
        # the graphs and the tokenizer by hash
        files = {"model": bundle / "model.onnx"}
        if (bundle / "tokenizer.json").is_file():
            files["tokenizer"] = bundle / "tokenizer.json"
        result = StageResult({"bundle": bundle, **files}, {"parity": asdict(parity)}, unhashed=("bundle",))
        fused_path = bundle / "model-fused.onnx"
        fused = fuse_transformer(bundle / "model.onnx", fused_path, model)
        if fused:  # the fused kernels compute the same function: held to the same parity
            fused_parity = check_float_parity(model, fused_path, dm.eval_dataloader("dev"))
            ctx.log(f"fused graph ({', '.join(f'{v} {k}' for k, v in fused.items())}) vs PyTorch: {fused_parity}")
            record_bundle_file(bundle, fused_path.name)
            result.info.update(fused=fused, fused_parity=asdict(fused_parity))
            result.artifacts["fused"] = fused_path
        else:
            fused_path.unlink(missing_ok=True)
            if ctx.cfg.modality == "text":
                ctx.log("no transformer fusion for this encoder: the INT8 graphs start from the plain graph")
        return result
