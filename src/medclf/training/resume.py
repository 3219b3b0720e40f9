"""What a killed run leaves for its retry, in `paths.cache_dir` (outside model_dir, which DVC deletes first).

Keras' BackupAndRestore per phase, the weights at the end of each phase and of the best epoch, one
history row per finished epoch, and a state file (attempt, phases done, best epoch, MLflow run id).
Every file is a `medclf.infra.catalog` entry (`TRAIN_BACKUP` and the `TRAIN_*` entries under it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medclf.config import Paths
from medclf.infra import catalog
from medclf.infra.io import atomic_file

log = logging.getLogger(__name__)


class Backup:
    """Keyed by a fingerprint of the params and data: a backup from a different configuration is
    discarded (resuming it would silently mix two experiments)."""

    def __init__(self, paths: Paths, fingerprint: str) -> None:
        self.paths = paths
        self.root = catalog.TRAIN_BACKUP.path(paths)
        state_path = catalog.TRAIN_STATE.path(paths)
        state = catalog.TRAIN_STATE.load(paths) if state_path.exists() else {}
        if state.get("fingerprint") != fingerprint:
            if self.root.exists():
                log.info("train: discarding a backup from another configuration (%s)", self.root)
            shutil.rmtree(self.root, ignore_errors=True)
            state = {"fingerprint": fingerprint, "attempt": 0}
        state["attempt"] = int(state.get("attempt", 0)) + 1
        self.state: dict[str, Any] = state
        self.save()

    def save(self) -> None:
        catalog.TRAIN_STATE.save(self.paths, self.state)

    def phase_dir(self, phase: int) -> Path:
        return catalog.TRAIN_PHASE_BACKUP.path(self.paths, phase=str(phase))

    def history(self) -> list[dict[str, Any]]:
        path = catalog.TRAIN_EPOCHS.path(self.paths)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        return list({r["epoch"]: r for r in rows}.values())  # a re-run epoch replaces its earlier row

    def append(self, row: dict[str, Any]) -> None:
        with open(catalog.TRAIN_EPOCHS.path(self.paths), "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_weights(self, name: str, model: Any) -> None:
        with atomic_file(catalog.TRAIN_WEIGHTS.path(self.paths, name=name), "wb") as fh:
            np.savez(fh, *model.get_weights())

    def load_weights(self, name: str, model: Any) -> bool:
        path = catalog.TRAIN_WEIGHTS.path(self.paths, name=name)
        if not path.exists():
            return False
        with np.load(path) as z:
            model.set_weights([z[f"arr_{i}"] for i in range(len(z.files))])
        return True

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
