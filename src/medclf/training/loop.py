"""The fit loop: two phases, per-epoch bookkeeping, the best epoch, the export and its reload check.

* Phase 1 trains the head with the backbone frozen; phase 2 unfreezes the top `unfreeze_top`
  backbone layers (BatchNorm stays frozen) and recompiles with `finetune_lr`. From scratch
  (weights=none) one phase trains everything.
* Each phase resumes from its own Keras backup (`medclf.training.resume`); finished phases are skipped.
* The best epoch is the one with the highest exact val AUC (`medclf.training.data.val_scores`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medclf.config import Paths, Train
from medclf.infra import catalog
from medclf.infra.io import atomic_dir, atomic_file
from medclf.training import TrainError
from medclf.training.data import Data
from medclf.training.resume import Backup
from medclf.training.runtime import Runtime
from medclf.training.state import TrainingRun
from medclf.training.tracker import Tracker

log = logging.getLogger(__name__)

HISTORY_COLUMNS = [
    "epoch",
    "loss",
    "val_loss",
    "auc",
    "val_auc",
    "phase",
    "lr",
    "data_wait_fraction",
    "seconds",
    "images_per_second",
]


def prepare_fit(
    cfg: Train, data: Data, paths: Paths, rt: Runtime, backup: Backup, tracker: Tracker, policy: Any
) -> tuple[TrainingRun, dict[str, Any], Callable[..., Any]]:
    """The model (built in the runtime's scope) and its batches, as one `TrainingRun`; also the model's
    info and the builder (`export_model` rebuilds with it). The final fit and every tuning trial start here;
    the caller closes the run's batch threads (`TrainingRun.close`)."""
    from medclf.imaging.augmentation import AugmentedBatches
    from medclf.modeling import network as modeling
    from medclf.training.data import class_weights, positive_weights

    def build(weights: str = cfg.weights) -> Any:
        return modeling.build_model(
            cfg.backbone,
            len(data.classes),
            data.image_size,
            data.channels,
            input_size=cfg.input_size,
            width=cfg.width,
            dropout=cfg.dropout,
            weights=weights,
            preprocessing=cfg.preprocessing,
            cache_dir=paths.cache_dir,
            head="sigmoid" if data.multilabel else "softmax",
        )

    with rt.scope():
        model, info = build()
    k = len(data.classes)
    if data.multilabel:  # each finding's imbalance is its positive weight in the loss, not a per-image weight
        cw = None
        info["pos_weight"] = dict(zip(data.classes, map(float, positive_weights(data.y_train).round(3)), strict=True))
    else:
        cw = class_weights(data.y_train, k) if cfg.class_weights else None
    train_ds = AugmentedBatches(
        data.x_train,
        data.y_train,
        k,
        cfg.batch_size,
        policy=policy if cfg.online_augment else None,
        shuffle=True,
        seed=cfg.seed,
        class_weight=cw,
        workers=cfg.augment_workers,
    )
    val_ds = (
        AugmentedBatches(data.x_val, data.y_val, k, cfg.batch_size, shuffle=False, workers=0)
        if len(data.y_val)
        else None
    )
    info["class_weights"] = cw
    return TrainingRun(cfg, data, model, rt, backup, tracker, train_ds, val_ds, info["from_scratch"]), info, build


def phase_plan(cfg: Train, from_scratch: bool = False) -> list[tuple[int, int, int, float]]:
    """(phase, first epoch, end epoch, lr); epochs are numbered globally across both phases.

    From scratch (weights=none) there is nothing to protect by freezing: one phase trains everything
    for head_epochs + finetune_epochs at head_lr (cosine-decayed), and costs one compile instead of two.
    """
    if from_scratch and cfg.head_epochs + cfg.finetune_epochs:
        return [(1, 0, cfg.head_epochs + cfg.finetune_epochs, cfg.head_lr)]
    plan = []
    if cfg.head_epochs:
        plan.append((1, 0, cfg.head_epochs, cfg.head_lr))
    if cfg.finetune_epochs:
        plan.append((2, cfg.head_epochs, cfg.head_epochs + cfg.finetune_epochs, cfg.finetune_lr))
    if not plan:
        raise TrainError("train.head_epochs and train.finetune_epochs are both 0: nothing to train")
    return plan


def fit_phases(run: TrainingRun) -> None:
    """Run the phases not finished by an earlier attempt; each resumes from its own Keras backup."""
    import keras

    from medclf.modeling.network import compile_model, freeze_backbone, unfreeze_top
    from medclf.training.callbacks import EpochMonitor, FirstStep, KillAfterEpoch, kill_epoch
    from medclf.training.data import positive_weights

    cfg, model, backup = run.cfg, run.model, run.backup
    done: list[int] = backup.state.setdefault("phases_done", [])
    pending: str | None = None
    kill = kill_epoch()
    for phase, start, stop, lr in phase_plan(cfg, run.from_scratch):
        if phase in done:
            pending = f"phase{phase}_end"
            continue
        if pending:
            backup.load_weights(pending, model)
            pending = None
        if run.from_scratch:
            model.get_layer("backbone").trainable = True
        elif phase == 1:
            freeze_backbone(model)
        else:
            log.info("train: phase 2 unfreezes %s", unfreeze_top(model, cfg.unfreeze_top))
        with run.rt.scope():
            compile_model(
                model, cfg, lr, len(run.train_ds), stop - start, len(run.data.classes), run.rt.jit_compile,
                pos_weight=positive_weights(run.data.y_train) if run.data.multilabel else None,
            )  # fmt: skip
        callbacks = [EpochMonitor(run, phase)] + ([FirstStep(run)] if run.first_step_s is None else [])
        if run.val_ds is not None and cfg.early_stopping_patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_auc", mode="max", verbose=0, patience=cfg.early_stopping_patience
                )
            )
        callbacks.append(
            keras.callbacks.BackupAndRestore(
                str(backup.phase_dir(phase)), double_checkpoint=True, delete_checkpoint=False
            )
        )
        if kill is not None:
            callbacks.append(KillAfterEpoch(kill))
        model._initial_epoch = None  # Keras keeps a restored epoch on the model across fit() calls
        run.t_fit_call = time.perf_counter()
        model.fit(run.train_ds, initial_epoch=start, epochs=stop, callbacks=callbacks, verbose=0)
        backup.save_weights(f"phase{phase}_end", model)
        done.append(phase)
        backup.save()
        shutil.rmtree(backup.phase_dir(phase), ignore_errors=True)
    if pending:
        backup.load_weights(pending, model)


def export_model(model: Any, info: dict[str, Any], rt: Runtime, build: Any) -> Any:
    """An uncompiled float32 copy for serving: no optimizer state, loads anywhere with safe_mode=True."""
    import keras

    if rt.policy == "float32":
        return keras.Model(model.inputs, model.outputs, name=model.name)
    prev = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        export, _ = build(weights="none")
    finally:
        keras.mixed_precision.set_global_policy(prev)
    export.set_weights(model.get_weights())
    if info.get("weights") == "torch":  # epsilon is layer config, not a weight: carry it over
        from medclf.modeling.weights import set_bn_epsilon

        set_bn_epsilon(export, 1e-5)
    return export


def calibrate_export(run: TrainingRun, export: Any) -> dict[str, Any]:
    """train.calibration=temperature: fit T on the val predictions of the restored best epoch and fold it
    into the export's classifier (`medclf.evaluation.calibration`),
    so the saved model outputs calibrated probabilities."""
    from medclf.evaluation.calibration import calibrate, fold_into_classifier

    if run.cfg.calibration == "none" or run.val_ds is None:
        return {
            "method": "none",
            "temperature": 1.0,
            "note": "train.calibration: none" if run.cfg.calibration == "none" else "no validation split",
        }
    y_val = run.data.y_val
    proba = np.asarray(run.model.predict(run.val_ds, verbose=0)[: len(y_val)], dtype=np.float64)
    if run.data.multilabel:
        return _calibrate_findings(run, export, y_val, proba)
    record = calibrate(y_val, proba)
    fold_into_classifier(export, record["temperature"])
    log.info(
        "train: temperature scaling T=%.4f on %d val images: NLL %.4f -> %.4f, ECE %.4f -> %.4f",
        record["temperature"],
        len(y_val),
        record["val_before"]["nll"],
        record["val_after"]["nll"],
        record["val_before"]["ece"],
        record["val_after"]["ece"],
    )
    return record


def _calibrate_findings(run: TrainingRun, export: Any, y_val: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Multi-label: one temperature per finding, each fitted on validation (binary NLL of sigmoid(logit p / T)),
    folded into the export's sigmoid classifier column by column."""
    from medclf.evaluation import multilabel
    from medclf.evaluation.calibration import fold_per_finding

    temps = multilabel.fit_temperatures(y_val, proba)
    fold_per_finding(export, temps)
    after = multilabel.apply_temperatures(proba, temps)
    record: dict[str, Any] = {
        "method": "temperature_per_finding",
        "temperatures": {c: round(float(t), 4) for c, t in zip(run.data.classes, temps, strict=True)},
        "temperature": 1.0,  # no single T: the per-finding ones are folded in
        "n_val": len(y_val),
        "val_before": {"ece": multilabel.mean_ece(y_val, proba)},
        "val_after": {"ece": multilabel.mean_ece(y_val, after)},
    }
    log.info(
        "train: per-finding temperature scaling on %d val images (%s): mean ECE %.4f -> %.4f",
        len(y_val),
        ", ".join(f"{c} T={t}" for c, t in record["temperatures"].items()),
        record["val_before"]["ece"],
        record["val_after"]["ece"],
    )
    return record


def verify_reload(reference: Any, path: Path, x: np.ndarray) -> float:
    """Reload the saved file with safe_mode=True and check it predicts what the in-memory model does.

    `reference` is the trained model itself when it ran in float32 (its predict function is already
    compiled), else the float32 export.
    """
    import keras

    reloaded = keras.saving.load_model(str(path), safe_mode=True, compile=False)
    # predict(), not predict_on_batch(): under a tf.distribute strategy the latter returns one copy per replica
    a = np.asarray(reference.predict(x, batch_size=len(x), verbose=0))
    b = np.asarray(reloaded.predict(x, batch_size=len(x), verbose=0))
    diff = float(np.abs(a - b).max())
    if diff > 1e-4:
        raise TrainError(f"{path}: the reloaded model predicts differently (max |diff| {diff:.2e})")
    return diff


def save_model(
    paths: Paths, export: Any, reference: Any, probe: np.ndarray, result: dict[str, Any], t_start: float
) -> None:
    """model.keras and train_run.json, atomically together, after the reload check passed."""
    with atomic_dir(paths.model_dir) as tmp:
        model_file = catalog.MODEL.under(tmp)
        export.save(model_file)
        verify_reload(reference, model_file, probe)
        result["seconds"] = round(time.perf_counter() - t_start, 2)
        catalog.TRAIN_RUN.save(tmp, result)


def summarise(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Data-wait share and throughput: steady state excludes each (attempt, phase)'s first epoch (compiling)."""
    first: dict[tuple[Any, Any], Any] = {}
    for r in history:
        first.setdefault((r.get("attempt"), r["phase"]), r["epoch"])
    steady = [r for r in history if first[(r.get("attempt"), r["phase"])] != r["epoch"]] or history

    def share(rows: list[dict[str, Any]]) -> float | None:
        sec = sum(r["seconds"] for r in rows if r["data_wait_fraction"] is not None)
        return (
            round(
                sum(r["data_wait_fraction"] * r["seconds"] for r in rows if r["data_wait_fraction"] is not None) / sec,
                4,
            )
            if sec
            else None
        )

    ips = [r["images_per_second"] for r in steady if r["images_per_second"]]
    return {
        "data_wait_fraction": share(steady),
        "data_wait_fraction_all_epochs": share(history),
        "images_per_second": round(float(np.median(ips)), 1) if ips else None,
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
    }


def write_history(paths: Paths, history: list[dict[str, Any]]) -> Path:
    """reports/train/history.csv (a DVC plot), one row per epoch."""
    import csv

    path = catalog.HISTORY.path(paths)
    with atomic_file(path) as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(history, key=lambda r: r["epoch"]):
            w.writerow({k: "" if r.get(k) is None else r[k] for k in HISTORY_COLUMNS})
    return path
