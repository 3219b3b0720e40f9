"""Evaluation pictures as PNG files (matplotlib, headless) from the pure plot data in `metrics`.

The same point lists are written as DVC plot JSON by the evaluate stage, so the PNG a
reviewer sees in MLflow and the curve `dvc plots diff` draws come from one computation.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
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
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.4 * k + 2.5, 1.2 * k + 2))
    draw_confusion(ax, np.asarray(cm), classes, title, fontsize=10)
    return _save(fig, path)


def draw_confusion(ax: Any, cm: np.ndarray, classes: Sequence[str], title: str, fontsize: int = 10) -> None:
    """One confusion matrix on `ax`: counts and row shares as text, shaded by the row share (rows = actual)."""
    k = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(cm.shape):
        ax.text(
            j,
            i,
            f"{cm[i, j]}\n{frac[i, j]:.0%}",
            ha="center",
            va="center",
            color="white" if frac[i, j] > 0.5 else "black",
            fontsize=fontsize,
        )
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="actual")
    ax.set_title(title, fontsize=10)


def confusion_pair_png(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Two panels of one K x K matrix (rows = true class): the counts, and each row divided by its total (the recall
    of the row's class on the diagonal; "-" for a class absent from the test set)."""
    plt = _plt()
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(classes)
    side = 0.9 * k + 2.2
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 0.6, side), layout="constrained")
    peak = max(int(cm.max()), 1)
    for ax, shade, name in ((axes[0], cm / peak, "counts"), (axes[1], frac, "row-normalised (recall on the diagonal)")):
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                label = str(cm[i, j]) if ax is axes[0] else (f"{frac[i, j]:.0%}" if rows[i, 0] else "-")
                ax.text(j, i, label, ha="center", va="center", color="white" if shade[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), classes, rotation=30, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(name, fontsize=9)
    fig.suptitle(textwrap.fill(title, int(12 * (2 * side + 0.6))), fontsize=10)  # ~12 characters an inch at 10 pt
    return _save(fig, path)


def class_curves_png(
    curves: Mapping[str, Sequence[dict[str, Any]]],
    x: str,
    y: str,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    diagonal: bool = False,
) -> Path:
    """One-vs-rest curves of every class in one axes, `curves` keyed by legend label (e.g. "VIRUS (AUC 0.81)");
    a class with no curve (absent from the test set) keeps its legend entry, marked undefined."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 4.8))
    for label, points in curves.items():
        if points:
            ax.plot([p[x] for p in points], [p[y] for p in points], lw=1.8, label=label)
        else:
            ax.plot([], [], lw=0, label=f"{label}: undefined (class absent)")
    if diagonal:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right" if diagonal else "lower left", fontsize=8)
    ax.grid(alpha=0.3)
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
    counts: bool = False,
) -> Path:
    """One curve (ROC, PR or reliability) with an optional chance diagonal and operating point; `before`: the
    same curve before calibration, drawn dashed (reliability diagram: before vs after temperature scaling);
    `counts`: print each point's `count` (a reliability bin's images) beside it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if points:
        ax.plot([p[x] for p in points], [p[y] for p in points], lw=2, marker="o" if len(points) <= 12 else None)
        if counts:
            _bin_counts(ax, points, x, y)
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


_COUNT_STYLE: dict[str, Any] = {"textcoords": "offset points", "ha": "center", "fontsize": 6.5, "color": "dimgray"}


def _bin_counts(ax: Any, points: Sequence[dict[str, Any]], x: str, y: str) -> None:
    """Each reliability bin's image count, just above its point (below it near the top edge)."""
    for p in points:
        dy = 6 if p[y] < 0.9 else -7
        ax.annotate(f"n={p['count']}", (p[x], p[y]), xytext=(0, dy), va="bottom" if dy > 0 else "top", **_COUNT_STYLE)


GALLERY_IMAGE_IN = 1.9
"""The side of a gallery cell's image, in inches."""
GALLERY_GAP_IN = 0.2
"""Between two cells of a row, and between a row's images and the next row's captions, in inches."""
GALLERY_MIN_WIDTH_IN = 5.0
"""A one-column gallery is still this wide, so its title and notes stay readable."""
CAPTION_PT, LABEL_PT, TITLE_PT = 7.0, 9.0, 10.0
_PAD_IN = 0.1


def wrap_to_width(text: str, width_px: float, renderer: Any, size: float, weight: str = "normal") -> str:
    """`text` in lines no wider than `width_px` as `renderer` draws it at `size` points: greedy by words, a word
    wider than the line cut where it fills it, the text's own line breaks kept."""
    from matplotlib.font_manager import FontProperties

    def width(s: str) -> float:
        return float(renderer.get_text_width_height_descent(s, prop, ismath=False)[0])

    prop, lines = FontProperties(size=size, weight=weight), []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            candidate = f"{line} {word}" if line else word
            if width(candidate) <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and width(word) > width_px:
                cut = next((i for i in range(len(word) - 1, 0, -1) if width(word[:i]) <= width_px), 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return "\n".join(lines)


def gallery_png(groups: dict[str, list[dict[str, Any]]], path: Path, n: int, title: str) -> Path:
    """A grid: one row per group (TP / FP / FN; a K-class task's per-class groups), up to `n` overlays per row,
    captioned.

    Each item: {"overlay": uint8 HxWx3, "caption": str}. An empty group is one line "<group>: none in the test set",
    so a missing row means "none of these in the test set", not a failed render. The layout is measured, not
    guessed: every caption is wrapped to its image's width as the renderer draws it, each row is given the height of
    its tallest caption, row labels are wrapped to the image height and the title to the figure width, so no text
    overlaps another or an image.
    """
    plt = _plt()
    cols, img, gap, pad = max(1, n), GALLERY_IMAGE_IN, GALLERY_GAP_IN, _PAD_IN
    fig = plt.figure(figsize=(1.0, 1.0))
    renderer = fig.canvas.get_renderer()
    px = fig.dpi  # pixels per inch of the measurements below

    def text(s: str, size: float, width_in: float, **kw: Any) -> Any:  # placed once the figure's size is known
        wrapped = wrap_to_width(s, width_in * px, renderer, size, kw.get("weight", "normal"))
        return fig.text(0, 0, wrapped, fontsize=size, parse_math=False, **kw)

    def extent(t: Any) -> tuple[float, float]:
        box = t.get_window_extent(renderer)
        return box.width / px, box.height / px

    labels = {
        name: text(name, LABEL_PT, img, rotation=90, weight="bold", ha="center", va="center")
        for name, items in groups.items()
        if items
    }
    label_w = max((extent(t)[0] for t in labels.values()), default=0.0) + pad
    width = max(pad + label_w + cols * img + (cols - 1) * gap + pad, GALLERY_MIN_WIDTH_IN)
    head = text(title, TITLE_PT, width - 2 * pad, ha="center", va="top")
    notes = {
        name: text(f"{name}: none in the test set", LABEL_PT, width - 2 * pad, ha="left", va="top")
        for name, items in groups.items()
        if not items
    }
    captions = {
        name: [text(str(it["caption"]), CAPTION_PT, img - pad, ha="center", va="bottom") for it in items[:cols]]
        for name, items in groups.items()
    }
    row_h = {  # captions + images, or the note
        name: max(extent(t)[1] for t in captions[name]) + pad / 2 + img if items else extent(notes[name])[1]
        for name, items in groups.items()
    }
    height = pad + extent(head)[1] + sum(gap + h for h in row_h.values()) + pad
    fig.set_size_inches(width, height)

    def at(t: Any, x: float, y: float) -> None:  # inches from the bottom left, as figure fractions: a figure saved
        t.set_position((x / width, y / height))  # with bbox_inches="tight" moves those, not dpi_scale_trans

    at(head, width / 2, height - pad)
    top = height - pad - extent(head)[1]  # inches from the bottom; walk down row by row
    for name, items in groups.items():
        top -= gap
        bottom = top - row_h[name]
        if not items:
            at(notes[name], pad, top)
        else:
            at(labels[name], pad + label_w / 2, bottom + img / 2)
            for c, (item, caption) in enumerate(zip(items, captions[name], strict=False)):
                left = pad + label_w + c * (img + gap)
                ax = fig.add_axes((left / width, bottom / height, img / width, img / height))
                ax.imshow(item["overlay"])
                ax.axis("off")
                at(caption, left + img / 2, bottom + img + pad / 4)
        top = bottom
    return _save(fig, path)


GALLERY_ROWS_PER_FIGURE = 9
"""A K-class gallery has three rows per class; past this many rows it is drawn one figure per class."""


def class_gallery_pngs(
    per_class: Sequence[dict[str, list[dict[str, Any]]]],
    classes: Sequence[str],
    fig: Callable[[str], Path],
    n: int,
    title: str,
) -> dict[str, dict[str, int]]:
    """A K-class Grad-CAM gallery (`medclf.modeling.gradcam.class_gallery`: each class's rows): one figure `gradcam`
    while it has at most `GALLERY_ROWS_PER_FIGURE` rows, else one `gradcam_<index>_<class>` per class, its title
    naming the class; `title` ends each title. Returns {figure: {row: cases}}."""
    import re

    k = len(classes)
    pages = {"gradcam": ({r: v for rows in per_class for r, v in rows.items()}, "each row on its class's log-odds")}
    if sum(len(rows) for rows in per_class) > GALLERY_ROWS_PER_FIGURE:
        pages = {
            f"gradcam_{c}_{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}": (
                rows,
                f"one figure per class: '{name}' ({c + 1}/{k})",
            )
            for c, (name, rows) in enumerate(zip(classes, per_class, strict=True))
        }
    for name, (rows, what) in pages.items():
        gallery_png(rows, fig(name), n, f"Grad-CAM {what}; {title}")
    return {name: {r: len(v) for r, v in rows.items()} for name, (rows, _) in pages.items()}


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
        counts=True,
    )


def _num(v: Any) -> str:
    return "n/a" if v is None or not np.isfinite(float(v)) else f"{float(v):.3f}"


def kclass_pngs(doc: Mapping[str, Any], y: np.ndarray, proba: np.ndarray, fig: Callable[[str], Path]) -> None:
    """A K-class task's figures from its metrics document (`medclf.evaluation.task.metrics_document`) and the test
    labels and probabilities: one-vs-rest ROC and PR of every class (legend: per-class AUC / AP), the confusion
    matrix in counts and row-normalised, and the top-label reliability diagram (confidence = max p against argmax
    accuracy, the bins of the reported ECE, each bin's count printed); `fig(name)` is where each PNG goes."""
    from medclf.evaluation import metrics

    classes, test, y, proba = list(doc["classes"]), doc["test"], np.asarray(y), np.asarray(proba, dtype=float)
    roc: dict[str, list[dict[str, Any]]] = {}
    pr: dict[str, list[dict[str, Any]]] = {}
    for i, c in enumerate(classes):
        is_c, p_c = (y == i).astype(np.int64), proba[:, i]
        ap = metrics.binary_metrics(is_c, p_c, 0.5)["pr_auc"]
        roc[f"{c} (AUC {_num(doc['per_class'][c]['auc'])})"] = metrics.roc_points(is_c, p_c)
        pr[f"{c} (AP {_num(ap)}; prevalence {is_c.mean():.2f})"] = metrics.pr_points(is_c, p_c)
    title = f"One-vs-rest ROC per class, test set (macro AUC {_num(test.get('macro_auc'))})"
    class_curves_png(roc, "fpr", "tpr", fig("roc"), title, "false positive rate", "true positive rate", diagonal=True)
    title = "One-vs-rest precision-recall per class, test set"
    class_curves_png(pr, "recall", "precision", fig("pr"), title, "recall", "precision")
    rule = f"test set; {doc['task']}: {doc['decision']['rule']}"
    confusion_pair_png(np.asarray(doc["confusion"]["counts"]), classes, fig("confusion"), rule)
    curve_png(
        metrics.calibration_curve_points((proba.argmax(axis=1) == y).astype(np.int64), proba.max(axis=1)),
        "mean_predicted",
        "fraction_positive",
        fig("calibration"),
        f"Top-label reliability, test set (ECE {_num(test.get('ece'))}, Brier {_num(test.get('brier'))})",
        diagonal=True,
        xlabel="confidence (max class probability)",
        ylabel="accuracy (argmax correct)",
        counts=True,
    )


def multilabel_pngs(doc: Mapping[str, Any], y: np.ndarray, proba: np.ndarray, fig: Callable[[str], Path]) -> None:
    """A multi-label task's figures (`medclf.evaluation.multilabel.metrics_document`): ROC and PR of every finding
    (legend: its AUC / AP and prevalence; a finding without positives in the test split is left out, and said so),
    and the reliability diagram of every image-finding probability pooled (each bin's count printed)."""
    from medclf.evaluation import metrics

    labels, test, y, proba = list(doc["classes"]), doc["test"], np.asarray(y), np.asarray(proba, dtype=float)
    roc: dict[str, list[dict[str, Any]]] = {}
    pr: dict[str, list[dict[str, Any]]] = {}
    for j, c in enumerate(labels):
        is_c, p_c, row = y[:, j].astype(np.int64), proba[:, j], doc["per_class"][c]
        if 0 < is_c.sum() < len(is_c):
            roc[f"{c} (AUC {_num(row.get('auc'))})"] = metrics.roc_points(is_c, p_c)
            pr[f"{c} (AP {_num(row.get('ap'))}; prevalence {is_c.mean():.2f})"] = metrics.pr_points(is_c, p_c)
    title = f"ROC per finding, test set (macro AUC {_num(test.get('macro_auc'))})"
    class_curves_png(roc, "fpr", "tpr", fig("roc"), title, "false positive rate", "true positive rate", diagonal=True)
    title = f"Precision-recall per finding, test set (mAP {_num(test.get('map'))})"
    class_curves_png(pr, "recall", "precision", fig("pr"), title, "recall", "precision")
    curve_png(
        metrics.calibration_curve_points(y.ravel().astype(np.int64), proba.ravel()),
        "mean_predicted",
        "fraction_positive",
        fig("calibration"),
        f"Reliability of every image-finding probability, test set (mean per-finding ECE {_num(test.get('ece'))})",
        diagonal=True,
        xlabel="predicted probability of the finding",
        ylabel="fraction with the finding",
        counts=True,
    )
