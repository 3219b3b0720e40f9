"""What train learns from and is scored on: the balanced train set (augment) and the val split (ingest).

Arrays are memory-mapped; every file is named by `medclf.infra.catalog`. Validation scores are exact (all val
images, padding excluded) and use `medclf.evaluation.metrics.macro_auc`, the same AUC evaluate reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medclf.config import Paths
from medclf.infra import catalog
from medclf.training import TrainError

SPLITS = ("train", "val", "test")


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


def load_data(paths: Paths) -> Data:
    """Memory-mapped arrays: the balanced train set from augment, val from ingest (never augmented)."""
    need = [
        (catalog.CLASSES, {}),
        (catalog.IMAGES, {"split": "val"}),
        (catalog.LABELS, {"split": "val"}),
        (catalog.TRAIN_IMAGES, {}),
        (catalog.TRAIN_LABELS, {}),
    ]
    for entry, fields in need:
        p = entry.path(paths, **fields)
        if not p.exists():
            raise TrainError(
                f"{p}: missing; run `medclf {'augment' if entry.root == 'augment_dir' else 'ingest'}` first"
            )
    meta = catalog.CLASSES.load(paths)
    x, y = catalog.TRAIN_IMAGES.load(paths, mmap=True), catalog.TRAIN_LABELS.load(paths)
    xv, yv = catalog.load_split(paths, "val")
    if x.shape[1:] != xv.shape[1:] or len(x) != len(y) or len(xv) != len(yv):
        raise TrainError(
            f"{paths.augment_dir} ({x.shape}) does not match {paths.ingest_dir} ({xv.shape}); rerun `medclf augment`"
        )
    syn = catalog.TRAIN_IS_SYNTHETIC.path(paths)
    return Data(
        x,
        y,
        xv,
        yv,
        list(meta["classes"]),
        meta.get("positive_class") or meta["classes"][-1],
        int(x.shape[1]),
        int(x.shape[3]),
        int(np.load(syn).sum()) if syn.exists() else 0,
    )


def class_weights(labels: np.ndarray, k: int) -> dict[int, float]:
    """'balanced' weights n / (k * n_c): each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=k).astype(float)
    return {c: float(len(labels) / (k * counts[c])) if counts[c] else 0.0 for c in range(k)}


def val_scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """val_auc (`metrics.macro_auc`: binary, the positive = last class; K>2, the mean one-vs-rest AUC, NaN when
    a class is missing from val) and the mean cross-entropy."""
    from medclf.evaluation.metrics import macro_auc  # lazily: scikit-learn is not needed to import the train stage

    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0))))
    return {"val_auc": macro_auc(y, proba), "val_loss": loss}


def split_counts(ingest_dir: Path) -> dict[str, int]:
    """Images per ingest split, read from the label files' headers (nothing is loaded)."""
    out = {}
    for split in SPLITS:
        f = catalog.LABELS.under(ingest_dir, split=split)
        if f.exists():
            out[split] = int(np.load(f, mmap_mode="r").shape[0])
    return out
