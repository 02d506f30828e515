"""``report``: accuracy vs speed, from ``metrics.json`` and the profile JSONs only."""

from __future__ import annotations

from erc_distill.atomic import sha256_file
from erc_distill.stages.base import RunContext, Stage, StageResult, stage_key

REPORT_VERSION = "report-v2"


class ReportStage(Stage):
    name = "report"
    needs = ("evaluate", "profile")

    def key(self, ctx: RunContext) -> str:
        # the very files it reads: a profile measured again under the same key must show in the report
        inputs = [ctx.out / "metrics.json", *sorted(ctx.out.glob("profile_*.json"))]
        return stage_key({p.name: sha256_file(p)[:16] for p in inputs if p.is_file()}, REPORT_VERSION)

    def run(self, ctx: RunContext) -> StageResult:
        from erc_distill.report.accuracy_speed import write_report

        artifacts = write_report(ctx.out)
        ctx.log(f"report: {artifacts['report_md']}")
        return StageResult(artifacts)
