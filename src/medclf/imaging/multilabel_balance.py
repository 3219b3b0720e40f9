"""Offline balancing of multi-label tasks (issue 25: an image carries any number of findings, its label an
N×L 0/1 row), and the rows the augment preview shows.

Per-label oversampling, as for classes (`medclf.imaging.augmentation.balance_classes`), does not carry over:
copying an image copies every finding it carries, so oversampling a rare finding also inflates the common
findings that co-occur with it. `multilabel_plan` is a capped ML-ROS (Charte et al., 2015, "Addressing imbalance
in multilabel classification"): images carrying the findings furthest below their goal are copied one at a time,
each finding's goal being `target_ratio` × the most common finding's positives, but never more than `MAX_GROWTH`
(2) × its own; a copy that would take any finding it carries past that cap is never made. So:

* no finding's positive count, and so neither its prevalence (the rows only grow), more than doubles;
* a finding already at its goal (the common ones) grows only through co-occurrence, within the same cap;
* a finding reaches its goal whenever some image carries it without a finding already at its cap (e.g. alone);
* an all-zero ("no finding") image is never copied.

What is left of each finding's imbalance is the loss's per-finding positive weight (the train stage), computed on
the balanced rows. Copies are transformed under the augment policy, as single-label balancing does
(`medclf.imaging.augmentation.fill_rows`), and keep their source's whole label row.
"""

from __future__ import annotations

import math

import numpy as np

from medclf.config import AugmentPolicy
from medclf.imaging.augmentation import Balanced, fill_rows

__all__ = ["MAX_GROWTH", "balance_multilabel", "multilabel_goals", "multilabel_plan", "preview_picks"]

MAX_GROWTH = 2.0
"""Multi-label balancing caps every finding's positive count at this multiple of its own (module docstring)."""


def multilabel_goals(labels: np.ndarray, target_ratio: float, max_growth: float = MAX_GROWTH) -> np.ndarray:
    """Per finding, the positives `multilabel_plan` aims at: `target_ratio` × the most common finding's, within
    [its own count, `max_growth` × its own count]."""
    counts: np.ndarray = np.asarray(labels, dtype=bool).sum(axis=0).astype(np.int64)
    if not counts.size or counts.max() == 0:
        return counts
    target = math.ceil(target_ratio * counts.max() - 1e-9)
    cap = np.floor(max_growth * counts + 1e-9).astype(np.int64)
    goals: np.ndarray = np.minimum(np.maximum(counts, target), cap)
    return goals


def multilabel_plan(labels: np.ndarray, target_ratio: float, seed: int, max_growth: float = MAX_GROWTH) -> np.ndarray:
    """Capped ML-ROS: the training rows to copy (in copy order), a pure function of (labels, ratio, seed).

    One copy at a time: the finding furthest below its goal (`multilabel_goals`; lowest current/goal, ties to the
    first finding) gets one more positive, from the image carrying it that has been copied least, then carries the
    fewest findings already at their goal, then comes first in a seeded shuffle; an image whose copy would take
    any of its findings past `max_growth` × its count is not a candidate. A finding with no candidate left stops
    short of its goal. Every finding's count stays ≤ `max_growth` × its own; all-zero rows are never copied."""
    y = np.asarray(labels, dtype=bool)
    if y.ndim != 2:
        raise ValueError(f"multi-label labels are an N×L 0/1 matrix; got shape {y.shape}")
    n, width = y.shape
    counts = y.sum(axis=0).astype(np.int64)
    goal = multilabel_goals(y, target_ratio, max_growth)
    cap = np.floor(max_growth * counts + 1e-9).astype(np.int64)
    cur = counts.copy()
    uses = np.zeros(n, np.int64)
    tie = np.empty(n, np.int64)
    tie[np.random.default_rng([seed, 25]).permutation(n)] = np.arange(n)
    carriers = [np.flatnonzero(y[:, j]) for j in range(width)]
    active = {j for j in range(width) if cur[j] < goal[j]}
    picked: list[int] = []
    while active:
        j = min(active, key=lambda k: (cur[k] / goal[k], k))
        rows = carriers[j]
        ok = rows[~((cur + y[rows]) > cap).any(axis=1)]
        if not ok.size:
            active.discard(j)
            continue
        done = cur >= goal
        extra = (y[ok] & done).sum(axis=1)
        row = int(ok[np.lexsort((tie[ok], extra, uses[ok]))[0]])
        picked.append(row)
        uses[row] += 1
        cur += y[row]
        active = {k for k in active if cur[k] < goal[k]}
    return np.asarray(picked, np.int64)


def balance_multilabel(
    images: np.ndarray,
    labels: np.ndarray,
    policy: AugmentPolicy,
    target_ratio: float,
    seed: int,
    chunk: int = 256,
    out: np.ndarray | None = None,
) -> Balanced:
    """Capped ML-ROS (`multilabel_plan`) for N×L 0/1 labels: originals first, then a transformed copy of each
    planned row with its source's label row (uint8). `target_ratio` 0 copies nothing. As `balance_classes`:
    seeded, chunk-independent, `out` may be a preallocated array of the final shape."""
    y = np.asarray(labels)
    if y.ndim != 2 or ((y != 0) & (y != 1)).any():
        raise ValueError(f"multi-label labels are an N×L 0/1 matrix; got shape {y.shape}")
    y = y.astype(np.uint8)
    src_rows = multilabel_plan(y, target_ratio, seed) if target_ratio > 0 else np.zeros(0, np.int64)
    total = len(y) + src_rows.size
    if out is None:
        out = np.empty((total, *images.shape[1:]), np.uint8)
    elif out.shape != (total, *images.shape[1:]):
        raise ValueError(f"out has shape {out.shape}, expected {(total, *images.shape[1:])}")
    fill_rows(images, len(y), src_rows, policy, np.random.default_rng(seed), chunk, out)
    return Balanced(
        images=out,
        labels=np.concatenate([y, y[src_rows]]),
        is_synthetic=np.r_[np.zeros(len(y), bool), np.ones(src_rows.size, bool)],
        source_row=np.concatenate([np.arange(len(y)), src_rows]).astype(np.int64),
    )


def preview_picks(labels: np.ndarray, n_classes: int, n: int, seed: int) -> list[int]:
    """Rows for the augment preview, taken in turn from each class (a class-index label vector), or each finding
    and then the images with none (an N×L multi-label matrix: a row counts for every finding it carries, so the
    first round shows each finding; at least one round is shown even when `n` is smaller)."""
    rng = np.random.default_rng([seed, 99])
    if labels.ndim != 2:
        per_class = [rng.permutation(np.flatnonzero(labels == k)) for k in range(n_classes)]
        return [int(rows[i]) for i in range(max(map(len, per_class))) for rows in per_class if i < len(rows)][:n]
    hot = np.asarray(labels) != 0
    groups = [rng.permutation(np.flatnonzero(hot[:, k])) for k in range(hot.shape[1])]
    groups.append(rng.permutation(np.flatnonzero(~hot.any(axis=1))))
    groups = [g for g in groups if len(g)]
    want = max(n, len(groups))
    picks: list[int] = []
    seen: set[int] = set()
    nxt = [0] * len(groups)
    while len(picks) < want and any(nxt[g] < len(rows) for g, rows in enumerate(groups)):
        for g, rows in enumerate(groups):
            while nxt[g] < len(rows) and int(rows[nxt[g]]) in seen:
                nxt[g] += 1
            if nxt[g] < len(rows) and len(picks) < want:
                picks.append(int(rows[nxt[g]]))
                seen.add(picks[-1])
                nxt[g] += 1
    return picks
