"""Evaluation pictures as PNG files (matplotlib, headless) from the pure plot data in `metrics`.

The same point lists are written as DVC plot JSON by the evaluate stage, so the PNG a
reviewer sees in MLflow and the curve `dvc plots diff` draws come from one computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on CI/servers; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from medclf.infra.io import atomic_file

    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def confusion_png(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Counts with row-normalised shading (rows = true class), so rare classes stay readable."""
    plt = _plt()
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.4 * k + 2.5, 1.2 * k + 2))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{frac[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
                fontsize=10,
            )
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def curve_png(
    points: list[dict[str, Any]],
    x: str,
    y: str,
    path: Path,
    title: str,
    diagonal: bool = False,
    xlabel: str | None = None,
    ylabel: str | None = None,
    marker: dict[str, float] | None = None,
    before: list[dict[str, Any]] | None = None,
) -> Path:
    """One curve (ROC, PR or reliability) with an optional chance diagonal and operating point; `before`: the
    same curve before calibration, drawn dashed (reliability diagram: before vs after temperature scaling)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if points:
        ax.plot([p[x] for p in points], [p[y] for p in points], lw=2, marker="o" if len(points) <= 12 else None)
    else:
        ax.text(0.5, 0.5, "undefined (one class only)", ha="center", va="center")
    if before:
        ax.plot(
            [p[x] for p in before],
            [p[y] for p in before],
            lw=1.5,
            ls="--",
            color="darkorange",
            marker="s" if len(before) <= 12 else None,
            label="before calibration",
        )
        ax.lines[0].set_label("calibrated")
        ax.legend(loc="upper left", fontsize=8)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    if marker:
        ax.plot([marker[x]], [marker[y]], "o", color="crimson", ms=8, label="operating point")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gallery_png(groups: dict[str, list[dict[str, Any]]], path: Path, n: int, title: str) -> Path:
    """A grid: one row per group (TP / FP / FN), up to `n` overlays per row, captioned.

    Each item: {"overlay": uint8 HxWx3, "caption": str}. Empty groups show a note, so a
    missing row means "none of these in the test set", not a failed render.
    """
    plt = _plt()
    cols = max(1, n)
    fig, axes = plt.subplots(len(groups), cols, figsize=(2.1 * cols, 2.3 * len(groups)), squeeze=False)
    for r, (name, items) in enumerate(groups.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                ax.imshow(items[c]["overlay"])
                ax.set_title(items[c]["caption"], fontsize=7)
            elif c == 0:
                ax.text(0.5, 0.5, "none in the test set", ha="center", va="center", fontsize=8)
        axes[r][0].text(
            -0.08,
            0.5,
            name,
            transform=axes[r][0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=9,
            weight="bold",
        )
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def report_pngs(report: Any, classes: list[str], fig: Callable[[str], Path]) -> None:
    """A binary `medclf.evaluation.report.Report`'s figures (typed Any here: the report module sits beside this one
    and imports the comparison, which draws with this module): confusion matrix, ROC and PR with the operating
    point, calibration (before and after temperature scaling); `fig(name)` is where each PNG goes."""
    from medclf.evaluation import metrics

    data, thr = report.plots, report.decision_threshold
    cm = metrics.confusion(
        [classes.index(r["actual"]) for r in data["confusion"]],
        [classes.index(r["predicted"]) for r in data["confusion"]],
        len(classes),
    )
    confusion_png(cm, classes, fig("confusion"), f"test set, threshold {thr:.4f} (from validation)")
    t = report.test
    op = {
        "fpr": 1 - t["specificity"]["value"],
        "tpr": t["recall"]["value"],
        "recall": t["recall"]["value"],
        "precision": t["precision"]["value"],
    }
    curve_png(data["roc"], "fpr", "tpr", fig("roc"), f"ROC (AUC {t['roc_auc']['value']:.3f})", diagonal=True, marker=op)
    curve_png(
        data["pr"],
        "recall",
        "precision",
        fig("pr"),
        f"Precision-recall (AP {t['pr_auc']['value']:.3f})",
        marker=op,
    )
    curve_png(
        data["calibration"],
        "mean_predicted",
        "fraction_positive",
        fig("calibration"),
        f"Calibration (ECE {t['ece']['value']:.3f}, Brier {t['brier']['value']:.3f})"
        + (f"; T={cal['temperature']:.3f}, ECE {cal['ece_before']:.3f} before" if (cal := report.calibration) else ""),
        diagonal=True,
        xlabel="mean predicted probability",
        ylabel="fraction positive",
        before=report.calibration_before,
    )
