"""Prefect task `evaluate`: metrics, threshold on validation data, gate report, plots (through DVC)."""

from __future__ import annotations

from medclf.config import Settings
from tasks.common import stage_task

evaluate = stage_task("evaluate", "Evaluate on the test split once; write metrics.json and gates.json.")


def retries(settings: Settings) -> int:
    """Evaluation logs to MLflow; one more try covers a blip of the tracking server."""
    return 1
