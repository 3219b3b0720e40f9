"""One Prefect task per pipeline stage; each runs its stage through DVC (see `tasks.common`).

`TASKS[stage]` is the task, `RETRIES[stage](settings)` how many retries that stage deserves
under a given configuration (only transient failures are ever retried).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medclf import STAGES
from medclf.config import Settings
from tasks import augment, evaluate, ingest, register, train, validate

_MODULES = {
    "ingest": ingest,
    "validate": validate,
    "augment": augment,
    "train": train,
    "evaluate": evaluate,
    "register": register,
}
TASKS: dict[str, Any] = {s: getattr(_MODULES[s], s) for s in STAGES}
RETRIES: dict[str, Callable[[Settings], int]] = {s: _MODULES[s].retries for s in STAGES}

__all__ = ["RETRIES", "TASKS"]
