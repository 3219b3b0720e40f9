"""Prefect task `register`: register a gate-passing model as the challenger (through DVC).

The registry is a network service, so this task retries with backoff; a failed gate
is deterministic and is never retried (see `tasks.common.transient_only`).
"""

from __future__ import annotations

from medclf.config import Settings
from tasks.common import stage_task

register = stage_task("register", "Register the model version in MLflow and set the challenger alias.")


def retries(settings: Settings) -> int:
    return 3
