"""augment: offline class balancing into its own versioned output, plus a preview of the policy.

Reads the ingest train split (never writes to it) and writes, as one atomic directory
`paths.augment_dir`:

* `train_images.npy` (N×H×W×C uint8, originals first, then synthetic rows) and `train_labels.npy`;
* `train_is_synthetic.npy` (bool per row) and `train_source_row.npy` (the ingest train row each row
  is, or was derived from), so any synthetic image can be traced back and excluded;
* `augment.json`: counts before/after, the resolved policy, the seed.

Validation and test data are never augmented.  The preview grid (`reports/augment/preview.png`)
shows originals next to augmented versions under the same policy training uses online.

Multi-label tasks (issue 25; ingest's `classes.json` says `"task": "multilabel"`, the labels are an N×L 0/1
matrix over the findings): no per-label oversampling, which would inflate the common findings that co-occur
with a rare one. `augment.balance` runs a capped ML-ROS (`medclf.imaging.multilabel_balance`): images carrying
the findings furthest below `target_ratio` × the most common finding are copied (transformed, with their whole
label row), and no finding's positive count, so neither its prevalence, ever more than doubles (`MAX_GROWTH`);
the rest of the imbalance is left to the loss's per-finding positive weights (train). `augment.json` then
counts positives per finding before and after (`counts_before`/`counts_after`), with `prevalence_before`/
`_after`, `cardinality_before`/`_after` (mean findings per image), `no_finding_before`/`_after`, `goal` (the
positives each finding aimed at), `sampler` (`ml_ros_capped`, or `none` without balancing) and `max_growth`;
the preview shows every finding (and images with none), `preview_examples` says how many of each.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from medclf.config import AugmentPolicy, Paths, Settings
from medclf.imaging.augmentation import apply_policy, balance_classes, balance_plan
from medclf.imaging.multilabel_balance import (
    MAX_GROWTH,
    balance_multilabel,
    multilabel_goals,
    multilabel_plan,
    preview_picks,
)
from medclf.infra import catalog
from medclf.infra.io import atomic_dir, atomic_file, disk_writes, npy_memmap, write_json
from medclf.pipeline import declared

log = logging.getLogger(__name__)


class AugmentError(RuntimeError):
    """The ingest output is missing or unusable for augmentation."""


def _load_train(paths: Paths) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """(train images, labels, classes, multi-label?) of the ingest output, checked."""
    xp, yp, cp = (
        catalog.IMAGES.path(paths, split="train"),
        catalog.LABELS.path(paths, split="train"),
        catalog.CLASSES.path(paths),
    )
    for p in (xp, yp, cp):
        if not p.exists():
            raise AugmentError(f"{p}: missing; run `medclf ingest` first")
    x, y = catalog.load_split(paths, "train")  # memory-mapped read-only: the ingest output cannot be modified from here
    meta = catalog.CLASSES.load(paths)
    classes, multilabel = meta["classes"], meta.get("task") == "multilabel"
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y):
        raise AugmentError(f"{xp}: expected N×H×W×C uint8 matching {yp}; got {x.dtype} {x.shape} and {y.shape}")
    if len(x) == 0:
        raise AugmentError(f"{xp}: the train split is empty")
    if multilabel:
        if y.ndim != 2 or y.shape[1] != len(classes) or ((y != 0) & (y != 1)).any():
            raise AugmentError(
                f"{yp}: a multi-label task ({cp}) needs an N×{len(classes)} 0/1 matrix (one column per finding); "
                f"got {y.dtype} {y.shape}"
            )
        return x, y, classes, True
    if y.ndim != 1:
        raise AugmentError(f"{yp}: class indices (N) expected, got shape {y.shape}; {cp} is not a multi-label task")
    if y.min() < 0 or y.max() >= len(classes):
        raise AugmentError(f"{yp}: labels outside 0..{len(classes) - 1} ({cp})")
    return x, y, classes, False


def preview_png(
    images: np.ndarray, labels: np.ndarray, classes: list[str], policy: AugmentPolicy, n: int, seed: int
) -> bytes:
    """A grid of (original | two augmented versions) triplets, picked evenly across classes (multi-label: across
    findings, then images with none, each finding shown at least once; `preview_picks`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    picks = preview_picks(labels, len(classes), n, seed)
    orig = np.asarray(images[np.sort(picks)])[np.argsort(np.argsort(picks))]
    aug = [apply_policy(orig, policy, np.random.default_rng([seed, 100 + j])) for j in range(2)]
    cols = 4  # triplets per row
    rows = -(-len(picks) // cols)
    titles = [_title(labels[row], classes) for row in picks]
    lines = max(t.count("\n") for t in titles) if titles else 0  # multi-label: one finding a line
    fig, axes = plt.subplots(rows, cols * 3, figsize=(cols * 3 * 1.3, rows * (1.5 + 0.12 * lines)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(len(picks)):
        for j, img in enumerate((orig[i], aug[0][i], aug[1][i])):
            ax = axes[i // cols, (i % cols) * 3 + j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(titles[i] if j == 0 else f"aug {j}", fontsize=7 if labels.ndim == 1 else 6)
    fig.suptitle("augment preview: original | augmented (policy used online and for synthetic rows)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _title(label: np.ndarray, classes: list[str]) -> str:
    """A preview tile's label: the class, or the findings (one a line) or "no finding"."""
    if np.ndim(label) == 0:
        return f"{classes[int(label)]}"
    return "\n".join(c for c, v in zip(classes, np.asarray(label).tolist(), strict=True) if v) or "no finding"


def _finding_counts(y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Multi-label: positives, prevalence, findings per image and images with none of an N×L label matrix."""
    pos = np.asarray(y, dtype=np.int64).sum(axis=0)
    n = max(len(y), 1)
    return {
        "counts": dict(zip(classes, pos.tolist(), strict=True)),
        "prevalence": {c: round(float(p) / n, 4) for c, p in zip(classes, pos, strict=True)},
        "cardinality": round(float(pos.sum()) / n, 4),
        "no_finding": int((np.asarray(y).sum(axis=1) == 0).sum()),
    }


def _ratio(counts: np.ndarray) -> float:
    return round(float(counts.min() / counts.max()), 4) if counts.max() > 0 else 0.0


def _run_multilabel(
    settings: Settings, policy: AugmentPolicy, x: np.ndarray, y: np.ndarray, classes: list[str], t0: float
) -> dict[str, Any]:
    """The multi-label augment (capped ML-ROS, module docstring): the same outputs, labels N×L uint8."""
    cfg, paths = settings.augment, settings.paths
    ratio = cfg.target_ratio if cfg.balance else 0.0
    n_copies = len(multilabel_plan(y, ratio, cfg.seed)) if ratio else 0
    total = len(y) + n_copies
    picks = preview_picks(y, len(classes), cfg.preview_n, cfg.seed)
    with atomic_dir(paths.augment_dir) as tmp:
        out = npy_memmap(catalog.TRAIN_IMAGES.under(tmp), (total, *x.shape[1:]), np.uint8)
        res = balance_multilabel(x, y, policy, ratio, cfg.seed, out=out)
        with disk_writes(catalog.TRAIN_IMAGES.under(tmp)):
            out.flush()
        del out
        np.save(catalog.TRAIN_LABELS.under(tmp), res.labels)
        np.save(catalog.TRAIN_IS_SYNTHETIC.under(tmp), res.is_synthetic)
        np.save(catalog.TRAIN_SOURCE_ROW.under(tmp), res.source_row)
        before, after = _finding_counts(y, classes), _finding_counts(res.labels, classes)
        shown = np.asarray(y)[picks].sum(axis=0) if picks else np.zeros(len(classes), np.int64)
        pos_before, pos_after = np.asarray(y).sum(axis=0), res.labels.sum(axis=0)
        summary = {
            "task": "multilabel",
            "classes": classes,
            "sampler": "ml_ros_capped" if ratio else "none",
            "max_growth": MAX_GROWTH,
            "goal": dict(zip(classes, (multilabel_goals(y, ratio) if ratio else pos_before).tolist(), strict=True)),
            "counts_before": before["counts"],
            "counts_after": after["counts"],
            "prevalence_before": before["prevalence"],
            "prevalence_after": after["prevalence"],
            "cardinality_before": before["cardinality"],
            "cardinality_after": after["cardinality"],
            "no_finding_before": before["no_finding"],
            "no_finding_after": after["no_finding"],
            "synthetic": int(res.is_synthetic.sum()),
            "rows": int(total),
            "ratio_before": _ratio(pos_before),
            "ratio_after": _ratio(pos_after),
            "balance": cfg.balance,
            "target_ratio": cfg.target_ratio,
            "seed": cfg.seed,
            "preset": cfg.preset,
            "policy": policy.model_dump(),
            "preview_examples": {
                **dict(zip(classes, shown.tolist(), strict=True)),
                "no finding": int((np.asarray(y)[picks].sum(axis=1) == 0).sum()) if picks else 0,
            },
        }
        write_json(catalog.AUGMENT_SUMMARY.under(tmp), summary)
    png = preview_png(x, y, classes, policy, cfg.preview_n, cfg.seed)
    with atomic_file(catalog.AUGMENT_PREVIEW.path(paths), "wb") as fh:
        fh.write(png)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log.info(
        "augment (multi-label, %s): positives %s -> %s (%d synthetic rows, preset %s), %.1f s",
        summary["sampler"],
        summary["counts_before"],
        summary["counts_after"],
        summary["synthetic"],
        cfg.preset,
        summary["seconds"],
    )
    return summary


@declared
def run(settings: Settings) -> dict[str, Any]:
    cfg, paths = settings.augment, settings.paths
    t0 = time.perf_counter()
    policy = cfg.policy()
    x, y, classes, multilabel = _load_train(paths)
    if multilabel:
        return _run_multilabel(settings, policy, x, y, classes, t0)
    k = len(classes)
    before = np.bincount(y, minlength=k)
    plan = balance_plan(y, cfg.target_ratio, k) if cfg.balance else {i: 0 for i in range(k)}
    total = len(y) + sum(plan.values())
    with atomic_dir(paths.augment_dir) as tmp:
        # preallocated: a full disk is a DiskFull naming the file here, not a SIGBUS at a page of the map
        out = npy_memmap(catalog.TRAIN_IMAGES.under(tmp), (total, *x.shape[1:]), np.uint8)
        res = balance_classes(x, y, policy, cfg.target_ratio if cfg.balance else 0.0, k, cfg.seed, out=out)
        with disk_writes(catalog.TRAIN_IMAGES.under(tmp)):
            out.flush()
        del out
        np.save(catalog.TRAIN_LABELS.under(tmp), res.labels)
        np.save(catalog.TRAIN_IS_SYNTHETIC.under(tmp), res.is_synthetic)
        np.save(catalog.TRAIN_SOURCE_ROW.under(tmp), res.source_row)
        after = np.bincount(res.labels, minlength=k)
        summary = {
            "classes": classes,
            "counts_before": dict[str, Any](zip(classes, before.tolist(), strict=True)),
            "counts_after": dict[str, Any](zip(classes, after.tolist(), strict=True)),
            "synthetic": int(res.is_synthetic.sum()),
            "rows": int(total),
            "ratio_before": round(float(before.min() / before.max()), 4),
            "ratio_after": round(float(after.min() / after.max()), 4),
            "balance": cfg.balance,
            "target_ratio": cfg.target_ratio,
            "seed": cfg.seed,
            "preset": cfg.preset,
            "policy": policy.model_dump(),
        }
        write_json(catalog.AUGMENT_SUMMARY.under(tmp), summary)
    png = preview_png(x, y, classes, policy, cfg.preview_n, cfg.seed)
    with atomic_file(catalog.AUGMENT_PREVIEW.path(paths), "wb") as fh:
        fh.write(png)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log.info(
        "augment: %s -> %s (%d synthetic rows, preset %s), %.1f s",
        summary["counts_before"],
        summary["counts_after"],
        summary["synthetic"],
        cfg.preset,
        summary["seconds"],
    )
    return summary
