"""One training attempt's shared state (`TrainingRun`): the model, its batches, the backup, the tracker and
the per-epoch bookkeeping. Its own module so that both the fit loop (`loop`) and the Keras callbacks
(`callbacks`) that call back into it import it from below, not from each other."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from medclf.config import Train
from medclf.training.data import Data, val_scores
from medclf.training.resume import Backup
from medclf.training.runtime import Runtime
from medclf.training.tracker import Tracker, epoch_metrics

log = logging.getLogger("medclf.training.loop")  # the records keep the logger name they always had


class TrainingRun:
    """State shared by the phases of one training attempt."""

    def __init__(
        self,
        cfg: Train,
        data: Data,
        model: Any,
        rt: Runtime,
        backup: Backup,
        tracker: Tracker,
        train_ds: Any,
        val_ds: Any,
        from_scratch: bool = False,
    ) -> None:
        self.cfg, self.data, self.model, self.rt = cfg, data, model, rt
        self.backup, self.tracker, self.train_ds, self.val_ds = backup, tracker, train_ds, val_ds
        self.t_fit_call = time.perf_counter()
        self.first_step_s: float | None = None
        self.epochs_executed: list[int] = []
        self.best: dict[str, Any] = backup.state.get("best", {})
        self.from_scratch = from_scratch
        self.on_epoch: Callable[[int, float | None], None] | None = None
        """Called last in every epoch with (epoch, val_auc): a tuning trial reports to its pruner here."""

    def end_epoch(self, epoch: int, phase: int, logs: dict[str, Any], seconds: float) -> None:
        wait, batches = self.train_ds.reset_timing()
        if self.val_ds is not None:
            proba = self.model.predict(self.val_ds, verbose=0)[: len(self.data.y_val)]
            logs.update(val_scores(self.data.y_val, proba))
        lr = self.model.optimizer.learning_rate
        row = {
            "epoch": epoch,
            "phase": phase,
            "loss": _f(logs.get("loss")),
            "auc": _f(logs.get("auc")),
            "val_loss": _f(logs.get("val_loss")),
            "val_auc": _f(logs.get("val_auc")),
            "lr": _f(np.asarray(lr)),
            "data_wait_fraction": round(wait / seconds, 4) if seconds else None,
            "seconds": round(seconds, 3),
            "images_per_second": round(batches * self.train_ds.batch_size / seconds, 1) if seconds else None,
            "attempt": self.backup.state["attempt"],
        }
        score = row["val_auc"] if self.val_ds is not None else float(epoch)
        if score is not None and np.isfinite(score) and score > self.best.get("score", -np.inf):
            self.backup.save_weights("best", self.model)
            self.best = {"score": score, "epoch": epoch, "val_auc": row["val_auc"]}
            self.backup.state["best"] = self.best
            self.backup.save()
        self.backup.append(row)
        self.epochs_executed.append(epoch)
        self.tracker.metrics(epoch_metrics(row), step=epoch)  # train/loss, val/auc, system/epoch_seconds ...
        log.info(
            "train: epoch %d (phase %d) loss %.4f auc %s val_auc %s val_loss %s | %.1fs, %s img/s, data wait %s",
            epoch,
            phase,
            row["loss"] or float("nan"),
            row["auc"],
            row["val_auc"],
            row["val_loss"],
            seconds,
            row["images_per_second"],
            row["data_wait_fraction"],
        )
        if self.on_epoch is not None:
            self.on_epoch(epoch, row["val_auc"])

    def close(self) -> None:
        for ds in (self.train_ds, self.val_ds):
            if ds is not None:
                ds.close()


def _f(v: Any) -> float | None:
    if v is None:
        return None
    v = float(np.asarray(v))
    return round(v, 6) if np.isfinite(v) else None
