"""Prefect task `validate`: data checks through DVC. A failed check fails the flow; it is never retried."""

from __future__ import annotations

from medclf.config import Settings
from tasks.common import stage_task

validate = stage_task("validate", "Data validation (schema, leakage, quality, drift) of the ingested dataset.")


def retries(settings: Settings) -> int:
    return 0
