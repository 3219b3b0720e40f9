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

    @property
    def multilabel(self) -> bool:
        """N×L 0/1 labels (`task.type: multilabel`): one sigmoid per finding, not one class per image."""
        return bool(self.y_val.ndim == 2 or self.y_train.ndim == 2)


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
        meta.get("positive_class") or meta["classes"][-1],  # multi-label: unused (no positive class)
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
    a class is missing from val) and the mean cross-entropy. Multi-label (N×L `y`): the mean per-finding AUC over
    the findings val has both positives and negatives of, and the mean binary cross-entropy."""
    from medclf.evaluation.metrics import macro_auc, roc_auc  # lazily: scikit-learn is not needed to import train

    if np.ndim(y) == 2:
        y, p = np.asarray(y, dtype=bool), np.clip(np.asarray(proba, dtype=float), 1e-7, 1 - 1e-7)
        aucs = [roc_auc(y[:, j], p[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
        bce = float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
        return {"val_auc": float(np.mean(aucs)) if aucs else float("nan"), "val_loss": bce}
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0))))
    return {"val_auc": macro_auc(y, proba), "val_loss": loss}


POS_WEIGHT_MAX = 30.0
"""Largest per-finding positive weight of the multi-label loss: a finding in 1 of 300 images is weighted 30, not
300 (an unbounded weight makes its few positives dominate every batch and the loss noisy)."""


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """Multi-label: per finding, negatives / positives of the training set (the weight of a positive in the binary
    cross-entropy, so each finding's positives and negatives weigh alike), at most `POS_WEIGHT_MAX`; 1 for a
    finding with no positive (nothing to up-weight)."""
    y = np.asarray(labels, dtype=np.float64)
    pos = y.sum(axis=0)
    neg = len(y) - pos
    return np.where(pos > 0, np.minimum(neg / np.maximum(pos, 1.0), POS_WEIGHT_MAX), 1.0).astype(np.float32)


def split_counts(ingest_dir: Path) -> dict[str, int]:
    """Images per ingest split, read from the label files' headers (nothing is loaded)."""
    out = {}
    for split in SPLITS:
        f = catalog.LABELS.under(ingest_dir, split=split)
        if f.exists():
            out[split] = int(np.load(f, mmap_mode="r").shape[0])
    return out
