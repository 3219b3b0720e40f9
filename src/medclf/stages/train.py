"""train: two-phase fine-tuning of a keras.applications backbone, resumable, tracked, on TF or JAX.

Reads the balanced train set (`catalog.TRAIN_IMAGES`) and the ingest val split; writes, atomically,
`catalog.MODEL` and `catalog.TRAIN_RUN` (paths.model_dir), and `catalog.HISTORY` (a DVC plot).
This module only wires the parts in `medclf.training` (data, runtime, resume, tracker, loop) and the
model of `medclf.modeling.network`:

* online augmentation runs on CPU worker threads (`medclf.imaging.augmentation`); the time the fit loop waits
  for batches is measured and reported as `data_wait_fraction`;
* a killed or retried run resumes from its last finished epoch (`medclf.training.resume`);
* the import chain is kept small for GPU boxes that have only keras + jax + numpy: TensorFlow and
  MLflow are imported only when used, and tracking is skipped when MLflow is not installed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from medclf.config import Settings
from medclf.infra import catalog
from medclf.pipeline import declared
from medclf.training import TrainError
from medclf.training.data import load_data, split_counts
from medclf.training.loop import (
    calibrate_export,
    export_model,
    fit_phases,
    prepare_fit,
    save_model,
    summarise,
    write_history,
)
from medclf.training.resume import Backup
from medclf.training.runtime import setup_runtime
from medclf.training.tracker import Tracker, run_name, summary_metrics

log = logging.getLogger(__name__)

__all__ = ["Tracker", "TrainError", "run", "run_name", "split_counts"]


@declared
def run(settings: Settings) -> dict[str, Any]:
    import keras

    from medclf.infra.tracking import data_version, git_commit, params_hash, raw_data_version

    cfg, paths = settings.train, settings.paths
    t_start = time.perf_counter()
    data = load_data(paths)
    versions = {"ingest": data_version(paths.ingest_dir), "augment": data_version(paths.augment_dir)}
    raw = raw_data_version(paths.raw_data)  # the raw images this ingest output was made from (dvc.lock)
    fingerprint = params_hash(cfg, settings.augment) + "-" + "-".join(v["data_digest"][:12] for v in versions.values())
    backup = Backup(paths, fingerprint)
    rt = setup_runtime(cfg, paths)
    prev_policy, prev_dist = keras.mixed_precision.global_policy(), keras.distribution.distribution()
    policy = settings.augment.policy()
    tracker = Tracker.start(settings, backup.state.get("run_id"), run_name=run_name(cfg.backbone, raw))
    backup.state["run_id"] = tracker.run_id
    backup.save()
    trun = None
    try:
        keras.mixed_precision.set_global_policy(rt.policy)
        tune = None
        if cfg.tune.enabled:  # the search first; the final fit below uses its values (medclf.training.tuning)
            from medclf.training.tuning import search, with_values

            tune = search(
                cfg, settings.augment, data, paths, rt, tracker, [v["data_digest"] for v in versions.values()]
            )
            cfg = with_values(cfg, tune["params"])
            tracker.params({f"tuned.{k}": v for k, v in tune["params"].items()})
        keras.utils.set_random_seed(cfg.seed)
        trun, info, build = prepare_fit(cfg, data, paths, rt, backup, tracker, policy)
        model, cw = trun.model, info["class_weights"]
        if trun.val_ds is None:
            log.warning("train: no validation split; no early stopping, the last epoch is kept")
        commit = git_commit()
        tracker.inputs(settings, data, rt, info, versions, raw, commit, cfg=cfg)
        if trun.from_scratch:
            log.info(
                "train: weights=none -> one phase training the whole backbone from scratch (BatchNorm "
                "learns batch statistics) for head_epochs + finetune_epochs at head_lr"
            )
        attempt = backup.state["attempt"]
        fit_phases(trun)
        if backup.load_weights("best", model):
            log.info("train: restored the best epoch %s (val_auc %s)", trun.best.get("epoch"), trun.best.get("val_auc"))
        history = sorted(backup.history(), key=lambda r: r["epoch"])
        export = export_model(model, info, rt, build)
        calibration = calibrate_export(trun, export)  # T folded into the export; evaluate/predict/serve apply it
        stats = summarise(history)
        result = {
            "run_id": tracker.run_id,
            "experiment_id": tracker.experiment_id,
            "tracking_uri": tracker.uri,
            "backbone": cfg.backbone,
            "weights": info["weights"],
            "weights_source": info["weights_source"],
            "preprocessing": info["preprocessing"],
            "classes": data.classes,
            "positive_class": None if data.multilabel else data.positive_class,
            "image_size": data.image_size,
            "input_size": info["input_size"],
            "channels": data.channels,
            "data_version": versions,
            "raw_data": raw,
            "params_hash": params_hash(cfg, settings.augment),
            "git_commit": commit,
            "epochs_run": len(history),
            "epochs_executed_this_attempt": trun.epochs_executed,
            "attempt": attempt,
            "resumed_from_epoch": trun.epochs_executed[0] if attempt > 1 and trun.epochs_executed else None,
            "best_epoch": trun.best.get("epoch"),
            "best_val_auc": trun.best.get("val_auc"),
            **stats,
            "time_to_first_step_s": None if trun.first_step_s is None else round(trun.first_step_s, 2),
            "backend": rt.backend,
            "devices": rt.devices,
            "mixed_precision": rt.policy,
            "jit_compile": rt.jit_compile,
            "n_train": len(data.y_train) - data.n_synthetic,  # the real training images (the ingest train split)
            "n_train_augmented": len(data.y_train),  # augment's balanced rows the fit ran on
            "n_synthetic": data.n_synthetic,
            "n_val": len(data.y_val),
            "class_weights": cw,
            **({"task": "multilabel", "pos_weight": info["pos_weight"]} if data.multilabel else {}),
            "params": info["params"],
            "calibration": calibration,
            "tune": tune,
        }
        if tune is not None:  # does the final fit reproduce the chosen trial? (within noise: same values, seed)
            tune["final_val_auc"] = result["best_val_auc"]
        src = data.x_val if len(data.y_val) else data.x_train
        probe = np.asarray(src[np.arange(cfg.batch_size) % len(src)])  # one full batch: the compiled shape
        save_model(paths, export, model if rt.policy == "float32" else export, probe, result, t_start)
        # after the model: a run whose model save fails (disk full) keeps the previous model's history
        hist_path = write_history(paths, history)
        tracker.metrics(summary_metrics(result, calibration))  # val/best_auc, system/images_per_second ...
        tracker.artifact(hist_path, "train")
        tracker.artifact(catalog.TRAIN_RUN.path(paths), "train")
        tracker.artifact(catalog.AUGMENT_PREVIEW.path(paths), "augment")
        tracker.artifact(catalog.AUGMENT_SUMMARY.path(paths), "augment")
        tracker.end()
        backup.clear()
        log.info(
            "train: %s, best val_auc %s at epoch %s, data wait %s, %.1f s",
            cfg.backbone,
            result["best_val_auc"],
            result["best_epoch"],
            stats["data_wait_fraction"],
            result["seconds"],
        )
        return result
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        if trun is not None:
            trun.close()
        keras.mixed_precision.set_global_policy(prev_policy)
        if rt.backend == "jax":
            keras.distribution.set_distribution(prev_dist)
