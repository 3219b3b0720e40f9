"""Prefect task `augment`: offline augmentation / class balancing through DVC."""

from __future__ import annotations

from medclf.config import Settings
from tasks.common import stage_task

augment = stage_task("augment", "Offline augmentation and class balancing, plus the preview grid.")


def retries(settings: Settings) -> int:
    return 0
