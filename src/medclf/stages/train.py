"""train: two-phase fine-tuning of a keras.applications backbone, resumable, tracked, on TF or JAX.

Reads the balanced train set (`paths.augment_dir`) and the ingest val split; writes, atomically,
`paths.model_dir/{model.keras, train_run.json}` and `reports/train/history.csv` (a DVC plot).

* Phase 1 trains the head with the backbone frozen; phase 2 unfreezes the top `unfreeze_top`
  backbone layers (BatchNorm stays frozen) and recompiles with `finetune_lr`.
* Online augmentation runs on CPU worker threads (`medclf.augmentation`); the time the fit loop
  waits for batches is measured and reported as `data_wait_fraction`.
* A killed or retried run resumes from its last finished epoch: Keras' BackupAndRestore plus a small
  state file live in `paths.cache_dir/train_backup` (outside model_dir, which DVC deletes before a rerun).
* Validation AUC/loss are exact (all val images, padding excluded) and pick the best epoch.
* The import chain is kept small for GPU boxes that have only keras + jax + numpy: TensorFlow and
  MLflow are imported only when used, and tracking is skipped when MLflow is not installed.

Longer than most modules on purpose: the stage's two edges (resume state, optional MLflow) sit next
to the epoch loop they serve; the model itself lives in `medclf.modeling`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclf.config import Settings, Train
from medclf.io import atomic_dir, atomic_file, write_json

log = logging.getLogger(__name__)

KILL_ENV = "MEDCLF_TEST_KILL_AFTER_EPOCH"
"""Tests only: hard-exit (os._exit) right after this global epoch's backup was written."""
HISTORY_COLUMNS = ["epoch", "loss", "val_loss", "auc", "val_auc", "phase", "lr", "data_wait_fraction", "seconds",
                   "images_per_second"]


class TrainError(RuntimeError):
    """Training cannot start or produced no usable model; the message says why."""


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    classes: list[str]
    positive_class: str
    image_size: int
    channels: int
    n_synthetic: int


def load_data(ingest_dir: Path, augment_dir: Path) -> Data:
    """Memory-mapped arrays: the balanced train set from augment, val from ingest (never augmented)."""
    need = [ingest_dir / "classes.json", ingest_dir / "val_images.npy", ingest_dir / "val_labels.npy",
            augment_dir / "train_images.npy", augment_dir / "train_labels.npy"]
    for p in need:
        if not p.exists():
            stage = "augment" if p.parent == augment_dir else "ingest"
            raise TrainError(f"{p}: missing; run `medclf {stage}` first")
    meta = json.loads((ingest_dir / "classes.json").read_text())
    x, y = np.load(augment_dir / "train_images.npy", mmap_mode="r"), np.load(augment_dir / "train_labels.npy")
    xv, yv = np.load(ingest_dir / "val_images.npy", mmap_mode="r"), np.load(ingest_dir / "val_labels.npy")
    if x.shape[1:] != xv.shape[1:] or len(x) != len(y) or len(xv) != len(yv):
        raise TrainError(f"{augment_dir} ({x.shape}) does not match {ingest_dir} ({xv.shape}); rerun `medclf augment`")
    syn = augment_dir / "train_is_synthetic.npy"
    return Data(x, y, xv, yv, list(meta["classes"]), meta.get("positive_class") or meta["classes"][-1],
                int(x.shape[1]), int(x.shape[3]), int(np.load(syn).sum()) if syn.exists() else 0)


def class_weights(labels: np.ndarray, k: int) -> dict[int, float]:
    """'balanced' weights n / (k * n_c): each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=k).astype(float)
    return {c: float(len(labels) / (k * counts[c])) if counts[c] else 0.0 for c in range(k)}


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Exact binary ROC AUC (Mann-Whitney, ties count one half); NaN if one class is absent."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s))
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[a:b] = (a + b + 1) / 2  # average 1-based rank of a tie group
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def val_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """val_auc (binary: of the positive = last class; K>2: macro one-vs-rest) and mean cross-entropy."""
    k = proba.shape[1]
    auc = roc_auc(y == k - 1, proba[:, -1]) if k == 2 else float(np.nanmean(
        [roc_auc(y == c, proba[:, c]) for c in range(k)]))
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0))))
    return {"val_auc": auc, "val_loss": loss}


# --------------------------------------------------------------------------- runtime (backend, devices, precision)
@dataclass
class Runtime:
    backend: str
    devices: list[str]
    policy: str
    jit_compile: bool
    strategy: Any = None

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with self.strategy.scope() if self.strategy is not None else contextlib.nullcontext():
            yield


def _has_gpu(backend: str) -> bool:
    if backend == "jax":
        import jax

        return jax.default_backend() in ("gpu", "cuda", "rocm")
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return False


def setup_runtime(cfg: Train, cache_dir: Path, batch_size: int) -> Runtime:
    """Pick precision, jit and data parallelism for the installed backend; >1 device -> data parallel."""
    import keras

    backend = keras.backend.backend()
    gpu = _has_gpu(backend)
    policy = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}.get(
        cfg.mixed_precision, "mixed_bfloat16" if gpu else "float32")
    strategy, devices = None, []
    if backend == "jax":
        import jax

        if cfg.compile_cache:
            jax.config.update("jax_compilation_cache_dir", str((cache_dir / "jax").resolve()))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        devs = jax.devices()
        devices = [str(d) for d in devs]
        if len(devs) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devs))
    elif backend == "tensorflow":
        import tensorflow as tf

        logical = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        devices = [d.name for d in logical]
        if len(logical) > 1:
            strategy = tf.distribute.MirroredStrategy([d.name for d in logical])
    else:
        raise TrainError(f"KERAS_BACKEND={backend} is not supported for training (use tensorflow or jax)")
    if len(devices) > 1 and batch_size % len(devices):
        raise TrainError(f"train.batch_size={batch_size} must be a multiple of the {len(devices)} devices")
    # XLA on a CPU-only TF build compiles slowly for little gain on small models; JAX is always jitted.
    jit = cfg.jit_compile if cfg.jit_compile != "auto" else (backend == "jax" or gpu)
    return Runtime(backend, devices, policy, bool(jit), strategy)


# --------------------------------------------------------------------------- resume state
class Backup:
    """What a killed run leaves for its retry: Keras backups per phase, phase-1 weights, history, run id.

    Keyed by a fingerprint of the params and data: a backup from a different configuration is
    discarded (resuming it would silently mix two experiments).
    """

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = root
        state_path = root / "state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state.get("fingerprint") != fingerprint:
            if root.exists():
                log.info("train: discarding a backup from another configuration (%s)", root)
            shutil.rmtree(root, ignore_errors=True)
            state = {"fingerprint": fingerprint, "attempt": 0}
        state["attempt"] = int(state.get("attempt", 0)) + 1
        self.state = state
        self.save()

    def save(self) -> None:
        write_json(self.root / "state.json", self.state)

    def phase_dir(self, phase: int) -> Path:
        return self.root / f"phase{phase}"

    def history(self) -> list[dict[str, Any]]:
        path = self.root / "history.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        return list({r["epoch"]: r for r in rows}.values())  # a re-run epoch replaces its earlier row

    def append(self, row: dict[str, Any]) -> None:
        with open(self.root / "history.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_weights(self, name: str, model: Any) -> None:
        with atomic_file(self.root / f"{name}.npz", "wb") as fh:
            np.savez(fh, *model.get_weights())

    def load_weights(self, name: str, model: Any) -> bool:
        path = self.root / f"{name}.npz"
        if not path.exists():
            return False
        with np.load(path) as z:
            model.set_weights([z[f"arr_{i}"] for i in range(len(z.files))])
        return True

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- MLflow (optional)
class Tracker:
    """MLflow logging when mlflow is installed and a tracking URI is set ('off'/'' disables it)."""

    def __init__(self) -> None:
        self.mlflow: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None

    @classmethod
    def start(cls, settings: Settings, resume_run_id: str | None, run_name: str) -> Tracker:
        self = cls()
        uri = settings.mlflow.resolved_uri()
        if uri.strip().lower() in ("", "off", "none", "disabled"):
            log.info("train: MLflow tracking disabled (tracking_uri=%r)", uri)
            return self
        try:
            import mlflow
        except ImportError:
            log.warning("train: mlflow is not installed; this run is not tracked")
            return self
        from medclf.tracking import configure

        self.experiment_id = configure(uri, settings.registry.experiment)
        self.mlflow, self.uri = mlflow, uri
        run = None
        if resume_run_id:
            with contextlib.suppress(Exception):  # the old run may be gone (another server): start afresh
                run = mlflow.start_run(run_id=resume_run_id)
        run = run or mlflow.start_run(run_name=run_name, experiment_id=self.experiment_id)
        self.run_id = run.info.run_id
        return self

    def __bool__(self) -> bool:
        return self.mlflow is not None

    def params(self, params: dict[str, Any]) -> None:
        if self:
            items = list(params.items())
            for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
                self.mlflow.log_params(dict(items[i: i + 90]))

    def tags(self, tags: dict[str, Any]) -> None:
        if self:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self:
            finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
            self.mlflow.log_metrics(finite, step=step)

    def datasets(self, ingest_dir: Path, version: dict[str, str], counts: dict[str, int]) -> None:
        """The splits as MLflow dataset inputs: the DVC-tracked file is the source, DVC's md5 the digest.

        Nothing is uploaded (a MetaDataset carries only the reference); the runs table's Dataset
        column then names the data a run learned from and which version of it.
        """
        if not self:
            return
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # made at import

        digest = (version.get("dvc_md5") or version["data_digest"]).removesuffix(".dir")[:32]
        for split, n in counts.items():
            context = {"train": "training", "val": "validation", "test": "testing"}[split]
            source = LocalArtifactDatasetSource(f"{ingest_dir}/{split}_images.npy")
            ds = MetaDataset(source, name=f"{ingest_dir.name}/{split} ({n} images)",  # type: ignore[abstract]
                             digest=digest)
            self.mlflow.log_input(ds, context=context)

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if self and path.exists():
            self.mlflow.log_artifact(str(path), artifact_path=subdir)

    def end(self, status: str = "FINISHED") -> None:
        if self:
            self.mlflow.end_run(status=status)


# --------------------------------------------------------------------------- callbacks
def _callbacks_module() -> Any:
    import keras

    class EpochMonitor(keras.callbacks.Callback):
        """Per epoch: pins the augmentation epoch, scores val exactly, records timing, history, best weights."""

        def __init__(self, run: TrainingRun, phase: int) -> None:
            super().__init__()
            self.run, self.phase = run, phase

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
                os._exit(17)

    return EpochMonitor, FirstStep, KillAfterEpoch


# --------------------------------------------------------------------------- the training run
class TrainingRun:
    """State shared by the phases of one training attempt."""

    def __init__(self, cfg: Train, data: Data, model: Any, rt: Runtime, backup: Backup, tracker: Tracker,
                 train_ds: Any, val_ds: Any) -> None:
        self.cfg, self.data, self.model, self.rt = cfg, data, model, rt
        self.backup, self.tracker, self.train_ds, self.val_ds = backup, tracker, train_ds, val_ds
        self.t_fit_call = time.perf_counter()
        self.first_step_s: float | None = None
        self.epochs_executed: list[int] = []
        self.best = backup.state.get("best", {})
        self.from_scratch = False

    def end_epoch(self, epoch: int, phase: int, logs: dict[str, Any], seconds: float) -> None:
        wait, batches = self.train_ds.reset_timing()
        if self.val_ds is not None:
            proba = self.model.predict(self.val_ds, verbose=0)[: len(self.data.y_val)]
            logs.update(val_scores(self.data.y_val, proba))
        lr = self.model.optimizer.learning_rate
        row = {"epoch": epoch, "phase": phase, "loss": _f(logs.get("loss")), "auc": _f(logs.get("auc")),
               "val_loss": _f(logs.get("val_loss")), "val_auc": _f(logs.get("val_auc")),
               "lr": _f(np.asarray(lr)), "data_wait_fraction": round(wait / seconds, 4) if seconds else None,
               "seconds": round(seconds, 3),
               "images_per_second": round(batches * self.train_ds.batch_size / seconds, 1) if seconds else None,
               "attempt": self.backup.state["attempt"]}
        score = row["val_auc"] if self.val_ds is not None else float(epoch)
        if score is not None and np.isfinite(score) and score > self.best.get("score", -np.inf):
            self.backup.save_weights("best", self.model)
            self.best = {"score": score, "epoch": epoch, "val_auc": row["val_auc"]}
            self.backup.state["best"] = self.best
            self.backup.save()
        self.backup.append(row)
        self.epochs_executed.append(epoch)
        self.tracker.metrics({k: row[k] for k in ("loss", "auc", "val_loss", "val_auc", "lr") if row[k] is not None}
                             | {"epoch_seconds": row["seconds"], "data_wait_fraction_epoch": row["data_wait_fraction"],
                                "images_per_second_epoch": row["images_per_second"]}, step=epoch)
        log.info("train: epoch %d (phase %d) loss %.4f auc %s val_auc %s val_loss %s | %.1fs, %s img/s, data wait %s",
                 epoch, phase, row["loss"] or float("nan"), row["auc"], row["val_auc"], row["val_loss"], seconds,
                 row["images_per_second"], row["data_wait_fraction"])


def _f(v: Any) -> float | None:
    if v is None:
        return None
    v = float(np.asarray(v))
    return round(v, 6) if np.isfinite(v) else None


# --------------------------------------------------------------------------- compile + phases
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

    from medclf.modeling import compile_model, freeze_backbone, unfreeze_top

    cfg, model, backup = run.cfg, run.model, run.backup
    EpochMonitor, FirstStep, KillAfterEpoch = _callbacks_module()
    done: list[int] = backup.state.setdefault("phases_done", [])
    pending: str | None = None
    kill = os.environ.get(KILL_ENV)
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
            compile_model(model, cfg, lr, len(run.train_ds), stop - start, len(run.data.classes), run.rt.jit_compile)
        callbacks = [EpochMonitor(run, phase)] + ([FirstStep(run)] if run.first_step_s is None else [])
        if run.val_ds is not None and cfg.early_stopping_patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", verbose=0,
                                                           patience=cfg.early_stopping_patience))
        callbacks.append(keras.callbacks.BackupAndRestore(str(backup.phase_dir(phase)), double_checkpoint=True,
                                                          delete_checkpoint=False))
        if kill is not None:
            callbacks.append(KillAfterEpoch(int(kill)))
        model._initial_epoch = None  # Keras keeps a restored epoch on the model across fit() calls
        run.t_fit_call = time.perf_counter()
        model.fit(run.train_ds, initial_epoch=start, epochs=stop, callbacks=callbacks, verbose=0)
        backup.save_weights(f"phase{phase}_end", model)
        done.append(phase)
        backup.save()
        shutil.rmtree(backup.phase_dir(phase), ignore_errors=True)
    if pending:
        backup.load_weights(pending, model)


# --------------------------------------------------------------------------- export
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
        from medclf.weights import set_bn_epsilon

        set_bn_epsilon(export, 1e-5)
    return export


def _verify_reload(reference: Any, path: Path, x: np.ndarray) -> float:
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


def summarise(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Data-wait share and throughput: steady state excludes each (attempt, phase)'s first epoch (compiling)."""
    first: dict[tuple[Any, Any], Any] = {}
    for r in history:
        first.setdefault((r.get("attempt"), r["phase"]), r["epoch"])
    steady = [r for r in history if first[(r.get("attempt"), r["phase"])] != r["epoch"]] or history

    def share(rows: list[dict[str, Any]]) -> float | None:
        sec = sum(r["seconds"] for r in rows if r["data_wait_fraction"] is not None)
        return round(sum(r["data_wait_fraction"] * r["seconds"] for r in rows
                         if r["data_wait_fraction"] is not None) / sec, 4) if sec else None

    ips = [r["images_per_second"] for r in steady if r["images_per_second"]]
    return {"data_wait_fraction": share(steady), "data_wait_fraction_all_epochs": share(history),
            "images_per_second": round(float(np.median(ips)), 1) if ips else None,
            "train_seconds": round(sum(r["seconds"] for r in history), 2)}


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    import csv

    with atomic_file(path) as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(history, key=lambda r: r["epoch"]):
            w.writerow({k: "" if r.get(k) is None else r[k] for k in HISTORY_COLUMNS})


def split_counts(ingest_dir: Path) -> dict[str, int]:
    """Images per split, read from the label files' headers (nothing is loaded)."""
    out = {}
    for split in ("train", "val", "test"):
        f = ingest_dir / f"{split}_labels.npy"
        if f.exists():
            out[split] = int(np.load(f, mmap_mode="r").shape[0])
    return out


def run_name(backbone: str, raw: dict[str, Any], when: float | None = None) -> str:
    """`train-mobilenet_v2-b19e20b2-1130-0722`: backbone, raw-data hash and time, so runs in the MLflow list
    can be told apart (every run used to be `train-mobilenet_v2`)."""
    md5 = str(raw.get("md5") or "")[:8] or "nodvc"
    return f"train-{backbone}-{md5}-{time.strftime('%m%d-%H%M', time.localtime(when))}"


# --------------------------------------------------------------------------- the stage
def run(settings: Settings) -> dict[str, Any]:
    import keras

    from medclf import modeling
    from medclf.augmentation import AugmentedBatches
    from medclf.tracking import data_version, flat_params, git_commit, params_hash, raw_data_version

    cfg, paths = settings.train, settings.paths
    t_start = time.perf_counter()
    data = load_data(paths.ingest_dir, paths.augment_dir)
    versions = {"ingest": data_version(paths.ingest_dir), "augment": data_version(paths.augment_dir)}
    raw = raw_data_version(paths.raw_data)  # the raw images this ingest output was made from (dvc.lock)
    fingerprint = params_hash(cfg, settings.augment) + "-" + "-".join(v["data_digest"][:12] for v in versions.values())
    backup = Backup(paths.cache_dir / "train_backup", fingerprint)
    rt = setup_runtime(cfg, paths.cache_dir, cfg.batch_size)
    prev_policy, prev_dist = keras.mixed_precision.global_policy(), keras.distribution.distribution()
    k, policy = len(data.classes), settings.augment.policy()
    tracker = Tracker.start(settings, backup.state.get("run_id"), run_name=run_name(cfg.backbone, raw))
    backup.state["run_id"] = tracker.run_id
    backup.save()
    train_ds = val_ds = None
    try:
        keras.mixed_precision.set_global_policy(rt.policy)
        keras.utils.set_random_seed(cfg.seed)

        def build(weights: str = cfg.weights) -> Any:
            return modeling.build_model(cfg.backbone, k, data.image_size, data.channels, input_size=cfg.input_size,
                                        width=cfg.width, dropout=cfg.dropout, weights=weights,
                                        preprocessing=cfg.preprocessing, cache_dir=paths.cache_dir)

        with rt.scope():
            model, info = build()
        cw = class_weights(data.y_train, k) if cfg.class_weights else None
        train_ds = AugmentedBatches(data.x_train, data.y_train, k, cfg.batch_size,
                                    policy=policy if cfg.online_augment else None, shuffle=True, seed=cfg.seed,
                                    class_weight=cw, workers=cfg.augment_workers)
        val_ds = (AugmentedBatches(data.x_val, data.y_val, k, cfg.batch_size, shuffle=False, workers=0)
                  if len(data.y_val) else None)
        if val_ds is None:
            log.warning("train: no validation split; no early stopping, the last epoch is kept")
        commit = git_commit()
        tracker.params(flat_params(cfg, "train.") | flat_params(settings.augment, "augment.")
                       | {f"augment.policy.{kk}": v for kk, v in policy.model_dump().items()}
                       | {"data.n_train": len(data.y_train), "data.n_synthetic": data.n_synthetic,
                          "data.n_val": len(data.y_val), "data.classes": ",".join(data.classes),
                          "data.image_size": data.image_size, "data.channels": data.channels,
                          "data.ingest_digest": versions["ingest"]["data_digest"],
                          "data.augment_digest": versions["augment"]["data_digest"]})
        tracker.tags({"stage": "train", "backbone": cfg.backbone, "backend": rt.backend, "devices": len(rt.devices),
                      "git_commit": commit, "mlflow.source.git.commit": commit, "weights": info["weights"],
                      "preprocessing": info["preprocessing"], "mixed_precision": rt.policy,
                      "data.ingest.dvc_md5": versions["ingest"].get("dvc_md5"),
                      "data.augment.dvc_md5": versions["augment"].get("dvc_md5"),
                      "data.raw.md5": raw.get("md5"), "data.raw.nfiles": raw.get("nfiles"),
                      "data.raw.path": raw.get("path")})
        tracker.datasets(paths.ingest_dir, versions["ingest"], split_counts(paths.ingest_dir))
        trun = TrainingRun(cfg, data, model, rt, backup, tracker, train_ds, val_ds)
        trun.from_scratch = info["from_scratch"]
        if trun.from_scratch:
            log.info("train: weights=none -> one phase training the whole backbone from scratch (BatchNorm "
                     "learns batch statistics) for head_epochs + finetune_epochs at head_lr")
        attempt = backup.state["attempt"]
        fit_phases(trun)
        if backup.load_weights("best", model):
            log.info("train: restored the best epoch %s (val_auc %s)", trun.best.get("epoch"), trun.best.get("val_auc"))
        history = sorted(backup.history(), key=lambda r: r["epoch"])
        export = export_model(model, info, rt, build)
        stats = summarise(history)
        result = {
            "run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "tracking_uri": tracker.uri,
            "backbone": cfg.backbone, "weights": info["weights"], "weights_source": info["weights_source"],
            "preprocessing": info["preprocessing"], "classes": data.classes, "positive_class": data.positive_class,
            "image_size": data.image_size, "input_size": info["input_size"], "channels": data.channels,
            "data_version": versions, "raw_data": raw, "params_hash": params_hash(cfg, settings.augment), "git_commit": commit,
            "epochs_run": len(history), "epochs_executed_this_attempt": trun.epochs_executed, "attempt": attempt,
            "resumed_from_epoch": trun.epochs_executed[0] if attempt > 1 and trun.epochs_executed else None,
            "best_epoch": trun.best.get("epoch"), "best_val_auc": trun.best.get("val_auc"),
            **stats, "time_to_first_step_s": None if trun.first_step_s is None else round(trun.first_step_s, 2),
            "backend": rt.backend, "devices": rt.devices, "mixed_precision": rt.policy, "jit_compile": rt.jit_compile,
            "n_train": len(data.y_train), "n_synthetic": data.n_synthetic, "n_val": len(data.y_val),
            "class_weights": cw, "params": info["params"],
        }
        with atomic_dir(paths.model_dir) as tmp:
            export.save(tmp / "model.keras")
            src = data.x_val if len(data.y_val) else data.x_train
            probe = np.asarray(src[np.arange(cfg.batch_size) % len(src)])  # one full batch: the compiled shape
            _verify_reload(model if rt.policy == "float32" else export, tmp / "model.keras", probe)
            result["seconds"] = round(time.perf_counter() - t_start, 2)
            write_json(tmp / "train_run.json", result)
        # after the model: a run whose model save fails (disk full) keeps the previous model's history
        hist_path = paths.reports_dir / "train" / "history.csv"
        write_history(hist_path, history)
        tracker.metrics({"best_val_auc": result["best_val_auc"], "data_wait_fraction": stats["data_wait_fraction"],
                         "images_per_second": stats["images_per_second"], "epochs_run": len(history),
                         "time_to_first_step_s": result["time_to_first_step_s"], "train_seconds": result["seconds"]})
        tracker.artifact(hist_path, "train")
        tracker.artifact(paths.model_dir / "train_run.json", "train")
        tracker.artifact(paths.reports_dir / "augment" / "preview.png", "augment")
        tracker.artifact(paths.augment_dir / "augment.json", "augment")
        tracker.end()
        backup.clear()
        log.info("train: %s, best val_auc %s at epoch %s, data wait %s, %.1f s", cfg.backbone, result["best_val_auc"],
                 result["best_epoch"], stats["data_wait_fraction"], result["seconds"])
        return result
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        for ds in (train_ds, val_ds):
            if ds is not None:
                ds.close()
        keras.mixed_precision.set_global_policy(prev_policy)
        if rt.backend == "jax":
            keras.distribution.set_distribution(prev_dist)
