"""Challenger versus champion on the same test images: paired differences with CIs, and one picture.

Both models are scored on the identical test split, each at its own registered threshold (the
threshold is part of the model a clinician gets). The difference of each metric comes with a
paired percentile-bootstrap CI: every resample draws the same images for both models, so the
interval reflects how much the *difference* varies, which is narrower than comparing two
independent CIs. A multi-class or ordinal task's numbers are `medclf.evaluation.kclass_comparison`'s; its picture
is `kclass_comparison_png`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medclf.config.vocabulary import COMPARED, METRICS
from medclf.evaluation import metrics


def paired_differences(
    y: np.ndarray,
    p_challenger: np.ndarray,
    t_challenger: float,
    p_champion: np.ndarray,
    t_champion: float,
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, float | None]]:
    """`{metric: {challenger, champion, diff, ci_low, ci_high}}`, diff = challenger - champion."""
    raw = metrics.paired_difference_ci(
        y, p_challenger, t_challenger, p_champion, t_champion, list(COMPARED), n_boot, seed
    )

    def finite(x: float) -> float | None:  # strict JSON: gates.json is a DVC metrics file
        return x if math.isfinite(x) else None

    return {
        k: {
            "challenger": finite(v["a"]),
            "champion": finite(v["b"]),
            "diff": finite(v["diff"]),
            "ci_low": finite(v["ci_low"]),
            "ci_high": finite(v["ci_high"]),
        }
        for k, v in raw.items()
    }


def comparison_png(
    y: np.ndarray,
    p_challenger: np.ndarray,
    t_challenger: float,
    p_champion: np.ndarray,
    t_champion: float,
    labels: tuple[str, str],
    path: Path,
    champion_name: str,
) -> Path:
    """ROC and PR curves overlaid, and the two confusion matrices side by side, each at its own threshold."""
    from medclf.evaluation.plots import _plt, _save

    plt = _plt()
    y = np.asarray(y).astype(int)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), layout="constrained")
    runs = (("challenger", p_challenger, t_challenger, "tab:blue"), (champion_name, p_champion, t_champion, "tab:grey"))
    for name, p, _, colour in runs:
        roc, pr = metrics.roc_points(y, np.asarray(p)), metrics.pr_points(y, np.asarray(p))
        auc, ap = (
            metrics.binary_metrics(y, np.asarray(p), 0.5)["roc_auc"],
            metrics.binary_metrics(y, np.asarray(p), 0.5)["pr_auc"],
        )
        axes[0].plot(
            [q["fpr"] for q in roc], [q["tpr"] for q in roc], color=colour, lw=2, label=f"{name} (AUC {auc:.3f})"
        )
        axes[1].plot(
            [q["recall"] for q in pr], [q["precision"] for q in pr], color=colour, lw=2, label=f"{name} (AP {ap:.3f})"
        )
    axes[0].plot([0, 1], [0, 1], ls="--", color="lightgrey", lw=1)
    for ax, (xl, yl, title) in zip(
        axes[:2],
        (
            ("1 - specificity", "sensitivity", "ROC, same test images"),
            ("sensitivity (recall)", "precision (PPV)", "precision-recall"),
        ),
        strict=True,
    ):
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=xl, ylabel=yl)
        ax.set_title(title, fontsize=10)
        ax.legend(loc="lower right" if "ROC" in title else "lower left", fontsize=8)
        ax.grid(alpha=0.3)
    for ax, (name, p, t, _) in zip(axes[2:], runs, strict=True):
        cm = metrics.confusion(y, (np.asarray(p) >= t).astype(int), 2)
        frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(
                    j,
                    i,
                    f"{cm[i, j]}\n{frac[i, j]:.0%}",
                    ha="center",
                    va="center",
                    color="white" if frac[i, j] > 0.5 else "black",
                    fontsize=10,
                )
        ax.set_xticks(range(2), labels)
        ax.set_yticks(range(2), labels, rotation=90, va="center")
        ax.set(xlabel="predicted", ylabel="actual")
        ax.set_title(f"{name} at its threshold {t:.4f}", fontsize=10)
    return _save(fig, path)


def comparison_rows(diffs: dict[str, dict[str, float | None]], champion_name: str) -> list[str]:
    """The markdown table of the version page: both values, the difference and its 95 % CI."""

    def f(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"

    def d(v: float | None) -> str:
        if v is None or not math.isfinite(v):
            return "n/a"
        return "0.000" if abs(v) < 0.0005 else f"{v:+.3f}"

    rows = [
        f"| metric (same test images) | challenger | {champion_name} | difference | 95 % CI of the difference |",
        "|---|---|---|---|---|",
    ]
    for key in COMPARED:
        label = METRICS[key].label
        if key in diffs:
            e = diffs[key]
            rows.append(
                f"| {label} | {f(e['challenger'])} | {f(e['champion'])} | **{d(e['diff'])}** | "
                f"{d(e['ci_low'])} to {d(e['ci_high'])} |"
            )
    return rows


_PER_CLASS_ORDER = ("recall", "precision", "f1", "auc", "specificity")
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def kclass_comparison_png(
    cm_challenger: Sequence[Sequence[int]] | np.ndarray,
    cm_champion: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    deltas: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    path: Path,
    title: str,
    names: tuple[str, str] = ("challenger", "champion"),
    margin: float | None = None,
) -> Path:
    """A K-class challenger versus its champion on the same test images: both confusion matrices side by side
    (row-normalised shading, counts and row shares annotated; rows = actual), and the per-class differences
    challenger - champion with their 95 % CIs (`deltas`: `kclass_comparison`'s ``per_class``, {class: {metric:
    {diff, ci_low, ci_high}}}); a dashed line at -`margin` when given."""
    from medclf.evaluation.plots import _plt, _save, draw_confusion

    plt = _plt()
    k = len(classes)
    side = 1.1 * k + 2.2
    fig, axes = plt.subplots(1, 3, figsize=(3 * side + 1, side), layout="constrained")
    for ax, cm_in, name in zip(axes[:2], (cm_challenger, cm_champion), names, strict=True):
        cm = np.asarray(cm_in, dtype=np.int64)
        if cm.shape != (k, k):
            raise ValueError(f"{name}'s confusion matrix has shape {cm.shape}, not ({k}, {k})")
        draw_confusion(ax, cm, classes, name, fontsize=9)
    ax = axes[2]
    metrics_shown = [m for m in _PER_CLASS_ORDER if any(m in (deltas.get(c) or {}) for c in classes)]
    width = 0.8 / max(1, len(metrics_shown))
    for n, m in enumerate(metrics_shown):
        ys, xs, lo, hi = [], [], [], []
        for i, c in enumerate(classes):
            e = (deltas.get(c) or {}).get(m) or {}
            d = e.get("diff")
            if d is None or not math.isfinite(d):
                continue
            low, high = e.get("ci_low"), e.get("ci_high")
            ys.append(i - 0.4 + width * (n + 0.5))
            xs.append(d)
            lo.append(d - low if low is not None else 0.0)
            hi.append(high - d if high is not None else 0.0)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=3, label=m, color=_COLOURS[n % len(_COLOURS)])
    ax.axvline(0, color="grey", lw=1)
    if margin is not None:
        ax.axvline(-margin, color="tab:red", lw=1, ls="--", label=f"-margin ({margin:g})")
    ax.set_yticks(range(k), classes)
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_xlabel(f"{names[0]} - {names[1]} (95 % CI, paired bootstrap)")
    ax.set_title("per-class differences", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
