"""The training run's MLflow record: optional, so that a GPU box with only keras + jax + numpy trains.

MLflow is imported only when a tracking URI is set ('off'/'' disables it), and a missing mlflow
package only logs a warning. A retried run continues the MLflow run its first attempt started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medclf.config import Settings, Train
from medclf.infra import catalog
from medclf.training.data import Data, split_counts

if TYPE_CHECKING:  # pragma: no cover
    from medclf.training.runtime import Runtime

log = logging.getLogger(__name__)

CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
"""Split -> MLflow dataset-input context."""


def run_name(backbone: str, raw: dict[str, Any], when: float | None = None) -> str:
    """`train-mobilenet_v2-b19e20b2-1130-0722`: backbone, raw-data hash and time, so runs in the MLflow list
    can be told apart (every run used to be `train-mobilenet_v2`)."""
    md5 = str(raw.get("md5") or "")[:8] or "nodvc"
    return f"train-{backbone}-{md5}-{time.strftime('%m%d-%H%M', time.localtime(when))}"


def epoch_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """One epoch's history row as run metrics, grouped (`medclf.infra.tracking.METRIC_PREFIXES`): `train/loss`,
    `train/auc` (Keras' running AUC over the epoch's training batches), `train/lr`, `val/loss`, `val/auc` (exact,
    on every val image) and the epoch's telemetry `system/epoch_seconds`, `system/epoch_data_wait_fraction`,
    `system/epoch_images_per_second`. None values are left out."""
    from medclf.infra.tracking import SYSTEM, TRAIN, VAL

    names = {
        "loss": f"{TRAIN}loss",
        "auc": f"{TRAIN}auc",
        "lr": f"{TRAIN}lr",
        "val_loss": f"{VAL}loss",
        "val_auc": f"{VAL}auc",
        "seconds": f"{SYSTEM}epoch_seconds",
        "data_wait_fraction": f"{SYSTEM}epoch_data_wait_fraction",
        "images_per_second": f"{SYSTEM}epoch_images_per_second",
    }
    return {name: row[k] for k, name in names.items() if row.get(k) is not None}


def summary_metrics(result: dict[str, Any], calibration: dict[str, Any]) -> dict[str, Any]:
    """The finished run's one-value metrics (train_run.json's figures), grouped: `val/best_auc` (the restored
    epoch's), `train/epochs_run`, `train/temperature` (the calibration T folded into the model), and the steady
    state telemetry `system/data_wait_fraction`, `system/images_per_second`, `system/time_to_first_step_s`,
    `system/train_seconds`."""
    from medclf.infra.tracking import SYSTEM, TRAIN, VAL

    return {
        f"{VAL}best_auc": result.get("best_val_auc"),
        f"{TRAIN}epochs_run": result.get("epochs_run"),
        f"{TRAIN}temperature": calibration.get("temperature"),
        f"{SYSTEM}data_wait_fraction": result.get("data_wait_fraction"),
        f"{SYSTEM}images_per_second": result.get("images_per_second"),
        f"{SYSTEM}time_to_first_step_s": result.get("time_to_first_step_s"),
        f"{SYSTEM}train_seconds": result.get("seconds"),
    }


def run_params(
    settings: Settings, cfg: Train, data: Data, counts: dict[str, int], versions: dict[str, Any]
) -> dict[str, Any]:
    """The training run's params: `train.*` (the values the fit used), `augment.*`, and the data: the true image
    count of each split (`counts`, the ingest npy lengths: `data.n_train` is the real training images) beside the
    rows the fit ran on (`data.n_train_augmented`: augment's balanced set, `data.n_synthetic` of them synthetic).
    The ingest settings that made the splits are logged by evaluate (`ingest.*`: train does not declare the
    `ingest` params, `medclf.pipeline`; the split files it reads are its dependency on them)."""
    from medclf.infra.tracking import flat_params

    aug = settings.augment
    return (
        flat_params(cfg, "train.")
        | flat_params(aug, "augment.")
        | {f"augment.policy.{k}": v for k, v in aug.policy().model_dump().items()}
        | {
            "data.n_train": counts.get("train", len(data.y_train) - data.n_synthetic),
            "data.n_train_augmented": len(data.y_train),
            "data.n_synthetic": data.n_synthetic,
            "data.n_val": counts.get("val", len(data.y_val)),
            "data.n_test": counts.get("test", 0),
            "data.classes": ",".join(data.classes),
            "data.image_size": data.image_size,
            "data.channels": data.channels,
            "data.ingest_digest": versions["ingest"]["data_digest"],
            "data.augment_digest": versions["augment"]["data_digest"],
        }
    )


class Tracker:
    """MLflow logging when mlflow is installed and a tracking URI is set; every method is a no-op otherwise."""

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
        from medclf.infra.tracking import configure

        self.experiment_id = configure(uri, settings.registry.experiment)
        self.mlflow, self.uri = mlflow, uri
        run = None
        if resume_run_id:
            with contextlib.suppress(Exception):  # the old run may be gone (another server): start afresh
                run = mlflow.start_run(run_id=resume_run_id)
        run = run or mlflow.start_run(run_name=run_name, experiment_id=self.experiment_id)
        self.run_id = run.info.run_id
        return self

    def child(self, run_name: str) -> Tracker:
        """A run nested under this one (its parent in the MLflow UI): one tuning trial. A no-op when this is."""
        child = Tracker()
        if self:
            run = self.mlflow.start_run(run_name=run_name, experiment_id=self.experiment_id, nested=True)
            child.mlflow, child.uri, child.experiment_id, child.run_id = (
                self.mlflow,
                self.uri,
                self.experiment_id,
                run.info.run_id,
            )
        return child

    def __bool__(self) -> bool:
        return self.mlflow is not None

    def params(self, params: dict[str, Any]) -> None:
        """Log params once: a resumed run that already holds a key with another value keeps it, and the value
        used now becomes a tag of that name (`medclf.infra.tracking.log_params_once`; MLflow params are
        immutable)."""
        if self and self.run_id:
            from medclf.infra.tracking import log_params_once

            log_params_once(self.mlflow.MlflowClient(tracking_uri=self.uri), self.run_id, params)

    def tags(self, tags: dict[str, Any]) -> None:
        if self:
            self.mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})

    def metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self:
            finite = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
            self.mlflow.log_metrics(finite, step=step)

    def inputs(
        self,
        settings: Settings,
        data: Data,
        rt: Runtime,
        info: dict[str, Any],
        versions: dict[str, Any],
        raw: dict[str, Any],
        commit: str | None,
        cfg: Train | None = None,
    ) -> None:
        """What the run learned from: params (train, augment, the data), tags (code, data versions), datasets.
        `cfg`: the values the final fit used (after `train.tune`), if not params.yaml's `train`."""
        if not self:
            return
        cfg = cfg or settings.train
        counts = split_counts(settings.paths.ingest_dir)
        self.params(run_params(settings, cfg, data, counts, versions))
        self.tags(
            {
                "stage": "train",
                "backbone": cfg.backbone,
                "backend": rt.backend,
                "devices": len(rt.devices),
                "git_commit": commit,
                "mlflow.source.git.commit": commit,
                "weights": info["weights"],
                "preprocessing": info["preprocessing"],
                "mixed_precision": rt.policy,
                "data.ingest.dvc_md5": versions["ingest"].get("dvc_md5"),
                "data.augment.dvc_md5": versions["augment"].get("dvc_md5"),
                "data.raw.md5": raw.get("md5"),
                "data.raw.nfiles": raw.get("nfiles"),
                "data.raw.path": raw.get("path"),
                # `dvc exp run` names the experiment (medclf.stages.register.EXPERIMENT_ENV): never registered
                **({"dvc.experiment": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}),
            }
        )
        self.datasets(settings.paths.ingest_dir, counts)

    def datasets(self, ingest_dir: Path, counts: dict[str, int]) -> None:
        """The ingest splits as MLflow dataset inputs, each with its own digest and its true image count.

        The source is the split's images file; the digest is the split's own (`tracking.split_digest`: sha256
        over its images and labels files, cut to MLflow's 32 characters; the test split's is the start of the
        version's `test_set_digest`), so two runs on the same test split show the same test digest even when
        train changed. The name says how many images the split holds (the npy's length: the train split's real
        images, not augment's balanced rows, which are the `data.n_train_augmented` param). Nothing is uploaded
        (a MetaDataset carries only the reference); the runs table's Dataset column names what a run learned from.
        """
        if not self:
            return
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # made at import

        from medclf.infra.tracking import split_digest

        for split, n in counts.items():
            source = LocalArtifactDatasetSource(str(catalog.IMAGES.under(ingest_dir, split=split)))
            ds = MetaDataset(
                source,
                name=f"{ingest_dir.name}/{split} ({n} images)",  # type: ignore[abstract]
                digest=split_digest(ingest_dir, split)[:32],
            )
            self.mlflow.log_input(ds, context=CONTEXTS[split])

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if self and path.exists():
            self.mlflow.log_artifact(str(path), artifact_path=subdir)

    def end(self, status: str = "FINISHED") -> None:
        if self:
            self.mlflow.end_run(status=status)
