"""augment: offline class balancing into its own versioned output, plus a preview of the policy.

Reads the ingest train split (never writes to it) and writes, as one atomic directory
`paths.augment_dir`:

* `train_images.npy` (N×H×W×C uint8, originals first, then synthetic rows) and `train_labels.npy`;
* `train_is_synthetic.npy` (bool per row) and `train_source_row.npy` (the ingest train row each row
  is, or was derived from), so any synthetic image can be traced back and excluded;
* `augment.json`: counts before/after, the resolved policy, the seed.

Validation and test data are never augmented.  The preview grid (`reports/augment/preview.png`)
shows originals next to augmented versions under the same policy training uses online.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from medclf.config import AugmentPolicy, Paths, Settings
from medclf.imaging.augmentation import apply_policy, balance_classes, balance_plan
from medclf.infra import catalog
from medclf.infra.io import atomic_dir, atomic_file, disk_writes, npy_memmap, write_json
from medclf.pipeline import declared

log = logging.getLogger(__name__)


class AugmentError(RuntimeError):
    """The ingest output is missing or unusable for augmentation."""


def _load_train(paths: Paths) -> tuple[np.ndarray, np.ndarray, list[str]]:
    xp, yp, cp = (
        catalog.IMAGES.path(paths, split="train"),
        catalog.LABELS.path(paths, split="train"),
        catalog.CLASSES.path(paths),
    )
    for p in (xp, yp, cp):
        if not p.exists():
            raise AugmentError(f"{p}: missing; run `medclf ingest` first")
    x, y = catalog.load_split(paths, "train")  # memory-mapped read-only: the ingest output cannot be modified from here
    classes = catalog.CLASSES.load(paths)["classes"]
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y):
        raise AugmentError(f"{xp}: expected N×H×W×C uint8 matching {yp}; got {x.dtype} {x.shape} and {y.shape}")
    if len(x) == 0:
        raise AugmentError(f"{xp}: the train split is empty")
    if y.min() < 0 or y.max() >= len(classes):
        raise AugmentError(f"{yp}: labels outside 0..{len(classes) - 1} ({cp})")
    return x, y, classes


def preview_png(
    images: np.ndarray, labels: np.ndarray, classes: list[str], policy: AugmentPolicy, n: int, seed: int
) -> bytes:
    """A grid of (original | two augmented versions) triplets, picked evenly across classes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rng = np.random.default_rng([seed, 99])
    per_class = [rng.permutation(np.flatnonzero(labels == k)) for k in range(len(classes))]
    picks = [int(rows[i]) for i in range(max(map(len, per_class))) for rows in per_class if i < len(rows)][:n]
    orig = np.asarray(images[np.sort(picks)])[np.argsort(np.argsort(picks))]
    aug = [apply_policy(orig, policy, np.random.default_rng([seed, 100 + j])) for j in range(2)]
    cols = 4  # triplets per row
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols * 3, figsize=(cols * 3 * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(picks):
        for j, img in enumerate((orig[i], aug[0][i], aug[1][i])):
            ax = axes[i // cols, (i % cols) * 3 + j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{classes[labels[row]]}" if j == 0 else f"aug {j}", fontsize=7)
    fig.suptitle("augment preview: original | augmented (policy used online and for synthetic rows)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


@declared
def run(settings: Settings) -> dict[str, Any]:
    cfg, paths = settings.augment, settings.paths
    t0 = time.perf_counter()
    policy = cfg.policy()
    x, y, classes = _load_train(paths)
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
