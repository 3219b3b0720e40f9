"""The Keras callbacks of the fit loop. Imports Keras: `medclf.training.loop` imports this module lazily."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:  # pragma: no cover
    from medclf.training.state import TrainingRun

KILL_ENV = "MEDCLF_TEST_KILL_AFTER_EPOCH"
"""Tests only: hard-exit (os._exit) right after this global epoch's backup was written."""
KILL_EXIT_CODE = 17


class EpochMonitor(keras.callbacks.Callback):
    """Per epoch: pins the augmentation epoch, scores val exactly, records timing, history, best weights."""

    def __init__(self, run: TrainingRun, phase: int) -> None:
        super().__init__()
        self.run, self.phase = run, phase
        self.t0 = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.run.train_ds.set_epoch(epoch)
        self.run.train_ds.reset_timing()
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        self.run.end_epoch(epoch, self.phase, logs, time.perf_counter() - self.t0)


class FirstStep(keras.callbacks.Callback):
    """Time from calling fit() to the end of the first step (compiling included).  Only in the first
    fit of an attempt: a batch-level hook makes Keras wait for every step, which costs on a GPU."""

    def __init__(self, run: TrainingRun) -> None:
        super().__init__()
        self.run = run

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.run.first_step_s is None:
            self.run.first_step_s = time.perf_counter() - self.run.t_fit_call


class KillAfterEpoch(keras.callbacks.Callback):
    """Tests only: simulate a crash (no cleanup, no atexit) right after an epoch's backup."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.kill_epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == self.kill_epoch:
            logging.shutdown()
            os._exit(KILL_EXIT_CODE)


def kill_epoch() -> int | None:
    """The epoch after which `KILL_ENV` asks this process to die, if set."""
    value = os.environ.get(KILL_ENV)
    return None if value is None else int(value)
