"""Metrics and reports."""

from erc_distill.report.metrics import ClassificationMetrics, compute_metrics

__all__ = ["ClassificationMetrics", "compute_metrics"]
