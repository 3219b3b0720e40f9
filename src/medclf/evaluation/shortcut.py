"""Shortcut check (issue 26): how much of the Grad-CAM heat of the test set lies on the image's border and corners.

A model that reads a marker, a padding strip or a collimation edge instead of the anatomy puts its heat there. The
check measures, per heat map, the share of its heat mass inside the outer band (width `band` x side on each edge)
and inside the four corner squares (`corner` x side each), and summarises it per true class.

**What a uniform map gives.** A map is a grid of cells, each read as constant over the image area it covers (the
nearest-neighbour upsampling of the feature map); each cell's weight is the exact share of its area inside the region,
so the fractions do not depend on the map's resolution. A uniform map (heat unrelated to position) gives the region's
area share: 1 - (1 - 2 band)^2 for the band (0.36 at band 0.1) and (2 corner)^2 for the corners (0.09 at 0.15).

**The bound.** A class warns when its mean border fraction exceeds `BOUND` (1.5) times the band's area share (0.54
at band 0.1: more than half of the heat on 36 % of the image), or its mean corner fraction exceeds `BOUND` times the
corners' area share (0.135 at 0.15). A ratio to the area share, not a fixed fraction, so the bound means the same at
any band width: "this class's heat is 1.5x more concentrated on the edge than position-blind heat would be". A
model that looks at lesions in the image's body puts less than the area share there (the tests' centred-lesion
model: ~0 on border and corners); one trained on a corner marker puts most of it there (tests/test_shortcut.py). A mean
over a class, not single maps: one lesion at the edge must not warn, a class-wide habit must.

**Which maps.** Class c's maps are Grad-CAM of class c's log-odds on the test images whose true label is c (binary
included: the negative class's log-odds is minus the positive's, so a marker that marks the negatives is seen too).
At most `SAMPLE` (500) images, a seeded sample beyond that. A map with no heat (ReLU of an all-negative sum) has no
fractions (None) and is counted in `n_no_heat`.

`border_heat` and `shortcut_report` are pure (numpy); `check_test_set` is the evaluate stage's edge: it computes the
maps (medclf.modeling.gradcam) and the overlays of each class's highest-border-heat cases for the gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BAND = 0.1
"""The outer band's width, a fraction of each side."""
CORNER = 0.15
"""Each corner square's side, a fraction of each side."""
BOUND = 1.5
"""Warn when a class's mean border (or corner) fraction exceeds this multiple of the region's area share."""
SAMPLE = 500
"""At most this many test images are mapped (a seeded sample beyond it)."""
BATCH = 128


def area_fractions(band: float = BAND, corner: float = CORNER) -> dict[str, float]:
    """The fractions a uniform map gives: the band's and the four corners' share of the image area."""
    if not (0 < band <= 0.5 and 0 < corner <= 0.5):
        raise ValueError(f"band {band} and corner {corner} must be in (0, 0.5]")
    return {"border": 1.0 - (1.0 - 2.0 * band) ** 2, "corner": (2.0 * corner) ** 2}


def _inside(cells: int, lo: float, hi: float) -> np.ndarray:
    """Per cell i of `cells` covering [i/cells, (i+1)/cells]: the share of its length inside [lo, hi]."""
    edges = np.arange(cells + 1) / cells
    share: np.ndarray = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None) * cells
    return share


def region_weights(h: int, w: int, band: float = BAND, corner: float = CORNER) -> tuple[np.ndarray, np.ndarray]:
    """(border, corner) weights (h, w): each cell's exact share of area in the outer band / the corner squares."""
    area_fractions(band, corner)  # validates
    inner = np.outer(_inside(h, band, 1 - band), _inside(w, band, 1 - band))
    edge_r = _inside(h, 0, corner) + _inside(h, 1 - corner, 1)
    edge_c = _inside(w, 0, corner) + _inside(w, 1 - corner, 1)
    return np.clip(1.0 - inner, 0.0, 1.0), np.outer(edge_r, edge_c)


def border_heat(maps: np.ndarray, band: float = BAND, corner: float = CORNER) -> list[dict[str, float] | None]:
    """Per map (N, h, w), non-negative: {border_fraction, corner_fraction}, the share of its heat mass in the outer
    band and in the four corner squares; None for a map with no heat."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {maps.shape}")
    wb, wc = region_weights(maps.shape[1], maps.shape[2], band, corner)
    heat = np.maximum(maps, 0.0)
    total = heat.sum(axis=(1, 2))
    border, corners = (heat * wb).sum(axis=(1, 2)), (heat * wc).sum(axis=(1, 2))
    return [
        {"border_fraction": float(b / t), "corner_fraction": float(c / t)} if t > 0 and np.isfinite(t) else None
        for b, c, t in zip(border, corners, total, strict=True)
    ]


def _num(v: float) -> float | None:
    return round(float(v), 4) + 0.0 if np.isfinite(v) else None  # + 0.0: no -0.0


def _summary(fracs: list[dict[str, float] | None], area: dict[str, float], bound: float) -> dict[str, Any]:
    got = [f for f in fracs if f is not None]
    out: dict[str, Any] = {"n": len(fracs), "n_no_heat": len(fracs) - len(got)}
    for key in ("border", "corner"):
        v = np.array([f[f"{key}_fraction"] for f in got])
        mean = float(v.mean()) if len(v) else float("nan")
        out |= {
            f"{key}_fraction_mean": _num(mean),
            f"{key}_fraction_p90": _num(float(np.quantile(v, 0.9))) if len(v) else None,
            f"{key}_enrichment": _num(mean / area[key]),
            f"{key}_share_over_bound": _num(float((v > bound * area[key]).mean())) if len(v) else None,
        }
    out["warn"] = any((out[f"{k}_enrichment"] or 0.0) > bound for k in ("border", "corner"))
    return out


def shortcut_report(
    maps: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    bound: float = BOUND,
    band: float = BAND,
    corner: float = CORNER,
    rows: Sequence[int] | np.ndarray | None = None,
    worst_n: int = 4,
) -> dict[str, Any]:
    """The check's document (strict JSON): the settings and area shares, `per_class` and `overall` summaries
    (n, n_no_heat, {border,corner}_fraction_mean/_p90, _enrichment = mean / area share, _share_over_bound = share of
    maps over the bound, warn), `worst` (each class's `worst_n` maps of highest border fraction: test row, class,
    fractions; highest first) and `warning` (a sentence naming the classes over the bound, else None).

    `maps[i]` is the map of test row `rows[i]` (default i), true class `labels[i]`, on that class's log-odds."""
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
    if not len(labels) == len(rows) == len(maps):
        raise ValueError(f"{len(maps)} maps, {len(labels)} labels, {len(rows)} rows")
    area = area_fractions(band, corner)
    fracs = border_heat(maps, band, corner) if len(maps) else []
    per_class = {
        name: _summary([f for f, y in zip(fracs, labels, strict=True) if y == c], area, bound)
        for c, name in enumerate(classes)
    }
    worst: list[dict[str, Any]] = []
    for c, name in enumerate(classes):
        mine = [
            (f["border_fraction"], f["corner_fraction"], int(r))
            for f, y, r in zip(fracs, labels, rows, strict=True)
            if f and y == c
        ]
        for b, k, r in sorted(mine, key=lambda t: (-t[0], -t[1], t[2]))[:worst_n]:
            worst.append({"row": r, "class": name, "border_fraction": _num(b), "corner_fraction": _num(k)})
    worst.sort(key=lambda w: (-w["border_fraction"], w["row"]))
    flagged = [name for name, s in per_class.items() if s["warn"]]
    warning = (
        "possible shortcut: Grad-CAM heat concentrated on the image border/corners for "
        + ", ".join(
            f"'{n}' (border {per_class[n]['border_fraction_mean']}, corners {per_class[n]['corner_fraction_mean']}"
            f", n={per_class[n]['n']})"
            for n in flagged
        )
        + f"; a uniform map gives {area['border']:.2f} / {area['corner']:.2f}, the bound is {bound}x that"
        if flagged
        else None
    )
    return {
        "band": band,
        "corner": corner,
        "area_fraction": {k: round(v, 4) for k, v in area.items()},
        "bound": bound,
        "score": "class c's log-odds on the test images of true class c",
        "per_class": per_class,
        "overall": _summary(fracs, area, bound),
        "worst": worst,
        "warning": warning,
    }


def check_test_set(
    model: Any, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], seed: int, n: int
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The evaluate stage's check: Grad-CAM of each class's log-odds on its own test images (at most `SAMPLE`, a
    sample seeded by `seed` beyond that), the `shortcut_report` (with `sampled` and `of`), and gallery groups for
    `medclf.evaluation.plots.gallery_png`: per class, its `n` cases of highest border heat."""
    from medclf.modeling import gradcam

    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))
    if len(rows) > SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(rows, SAMPLE, replace=False))
    order = np.concatenate([rows[labels[rows] == c] for c in range(len(classes))]).astype(np.int64)
    maps = []
    for c in range(len(classes)):
        mine = order[labels[order] == c]
        maps += [gradcam.gradcam(model, np.asarray(images[mine[i : i + BATCH]]), c) for i in range(0, len(mine), BATCH)]
    stacked = np.concatenate(maps) if maps else np.zeros((0, 1, 1), np.float32)
    report = shortcut_report(stacked, labels[order], classes, rows=order, worst_n=max(1, n))
    report |= {"sampled": len(order), "of": len(labels), "layer": gradcam.split_model(model).layer}
    at = {int(r): i for i, r in enumerate(order)}
    groups: dict[str, list[dict[str, Any]]] = {f"{name}: highest border heat": [] for name in classes}
    for w in report["worst"]:
        groups[f"{w['class']}: highest border heat"].append(
            {
                "overlay": gradcam.overlay(images[w["row"]], stacked[at[w["row"]]]),
                "caption": f"#{w['row']}  {w['class']}: border {w['border_fraction']:.2f}, "
                f"corners {w['corner_fraction']:.2f}",
            }
        )
    return report, groups
