"""K-class and ordinal evaluation (issue 24): multi-class reports (skin lesions), ordinal reports (diabetic-retinopathy
grades), ordinal cut-points, per-class alert thresholds and cluster-bootstrap CIs.

Pure functions over numpy arrays: arrays in, plain dicts of floats out (no I/O, MLflow or Keras). The conventions
are those of `medclf.evaluation.metrics`, which this module builds on:

* a case is called positive when ``p >= threshold``; zero-division yields 0.0; a ranking metric (ROC AUC) is NaN
  when one class is absent (the ONE AUC, `metrics._ranking`: ties count one half);
* calibration is the top-label ECE (confidence = max probability, outcome = argmax correct) over
  `calibration.ECE_BINS` equal-width bins with sklearn's edges (`calibration.ece_design`);
* the bootstrap draws the resamples `metrics.bootstrap` draws for the same seed (`metrics._weight_blocks`), over
  rows or, given ``groups``, over whole groups (a cluster bootstrap: every row of a patient enters a resample
  together); percentile CIs skip NaN resamples (`metrics._percentile_ci`).

Every report number is computed from per-row sums weighted by resample multiplicities (`_weighted`): a row of ones
is the point estimate, a row of bootstrap counts one resample, so the reported values and their CIs are one
computation, and 200 resamples are a few matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from medclf.evaluation.calibration import ECE_BINS, ece_design
from medclf.evaluation.metrics import _check_boot, _div, _percentile_ci, _ranking, _weight_blocks

ROW_SUM_TOL = 1e-3
"""A probability row may differ from 1 by at most this much (softmax outputs in float32 do)."""
SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "mcc", "ece", "brier")
ORDINAL = ("qwk", "mae", "within_one")
PER_CLASS = ("precision", "recall", "f1", "auc", "support", "specificity")
REFERABLE = ("auc", "sensitivity", "specificity", "f1", "prevalence")
"""The referable view's statistics; its ``threshold`` is a fixed input, reported but given no CI."""
DEFAULT_REFERABLE_THRESHOLD = 0.5
MAX_CUTPOINT_PASSES = 100
_CHUNK_ELEMS = 2_000_000  # resample-weight entries per block (~16 MB of float64), as metrics' bootstrap

ReportFn = Callable[..., Mapping[str, Any]]


# ----------------------------------------------------------------------------- input checks
def _check_proba(proba: ArrayLike, min_k: int = 2, what: str = "proba") -> np.ndarray:
    try:
        p = np.asarray(proba, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a numeric (N, K) array of class probabilities: {e}") from e
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (N, K) array of class probabilities; got shape {p.shape}")
    if p.shape[1] < min_k:
        kind = "an ordinal task" if min_k >= 3 else "a K-class report"
        raise ValueError(f"{kind} needs K >= {min_k} classes; {what} has {p.shape[1]} column(s)")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{what} must hold finite probabilities within [0, 1]")
    dev = np.abs(p.sum(axis=1) - 1.0)
    if (dev > ROW_SUM_TOL).any():
        i = int(np.argmax(dev))
        raise ValueError(
            f"{what} rows must sum to 1 within {ROW_SUM_TOL:g}: {int((dev > ROW_SUM_TOL).sum())} row(s) do not "
            f"(row {i} sums to {float(p[i].sum()):.6g})"
        )
    return p


def _check_labels(labels: ArrayLike, what: str, k: int, n: int) -> np.ndarray:
    a = np.asarray(labels)
    if a.ndim != 1 or a.size != n:
        raise ValueError(f"{what} must be a 1-D array with one entry per proba row ({n}); got shape {a.shape}")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{what} must hold integer class indices; got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not (np.isfinite(a).all() and (a == np.round(a)).all()):
        raise ValueError(f"{what} must hold integer class indices; found non-integer values")
    out = a.astype(np.int64)
    bad = (out < 0) | (out >= k)
    if bad.any():
        raise ValueError(f"{what} must lie in [0, {k}) for K = {k} classes; found {sorted(set(out[bad].tolist()))}")
    return out


def _check_classes(classes: Sequence[str], k: int) -> list[str]:
    names = list(classes)
    if len(names) != k:
        raise ValueError(f"got {len(names)} class names for {k} proba columns")
    if not all(isinstance(c, str) for c in names) or len(set(names)) != k:
        raise ValueError(f"class names must be {k} distinct strings; got {names}")
    return names


def _check_inputs(
    y: ArrayLike, proba: ArrayLike, classes: Sequence[str], pred: ArrayLike | None, min_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    p = _check_proba(proba, min_k)
    n, k = p.shape
    names = _check_classes(classes, k)
    yy = _check_labels(y, "y", k, n)
    pp = p.argmax(axis=1).astype(np.int64) if pred is None else _check_labels(pred, "pred", k, n)
    return yy, p, pp, names


def _check_referable(k: int, referable_from: int | None, referable_threshold: float | None) -> float | None:
    """The threshold of the referable call (None: no referable view)."""
    if referable_from is None:
        if referable_threshold is not None:
            raise ValueError("referable_threshold is given without referable_from (the lowest referable grade)")
        return None
    if isinstance(referable_from, bool) or not isinstance(referable_from, int | np.integer):
        raise ValueError(f"referable_from must be a grade index (int); got {referable_from!r}")
    if not 1 <= referable_from <= k - 1:
        raise ValueError(f"referable_from must be a grade index in [1, {k - 1}] for K = {k}; got {referable_from}")
    thr = DEFAULT_REFERABLE_THRESHOLD if referable_threshold is None else float(referable_threshold)
    if not 0.0 <= thr <= 1.0:
        raise ValueError(f"referable_threshold must lie within [0, 1]; got {referable_threshold}")
    return thr


# ----------------------------------------------------------------------------- the weighted core
def _qwk(counts: np.ndarray) -> np.ndarray:
    """Quadratic weighted kappa of (..., K, K) confusion counts (rows = actual), NaN where undefined (as sklearn's
    ``cohen_kappa_score(weights="quadratic", labels=range(K))``: the weights are the squared grade distance)."""
    k = counts.shape[-1]
    g = np.arange(k, dtype=float)
    wm = (g[:, None] - g[None, :]) ** 2
    actual, predicted, n = counts.sum(axis=-1), counts.sum(axis=-2), counts.sum(axis=(-2, -1))
    observed = (counts * wm).sum(axis=(-2, -1))
    expected = _div(np.einsum("...i,ij,...j->...", actual, wm, predicted), n)
    out: np.ndarray = np.full(observed.shape, np.nan)
    np.subtract(1.0, observed / np.where(expected > 0, expected, 1.0), out=out, where=expected > 0)
    return out


def _weighted(
    y: np.ndarray,
    p: np.ndarray,
    pred: np.ndarray,
    w: np.ndarray,
    ordinal: bool,
    referable: tuple[int, float] | None,
) -> dict[str, np.ndarray]:
    """Every report statistic for each row of ``w`` (B x N row multiplicities): (B,) arrays for the scalars,
    ``pc_<metric>`` (B, K) for the per-class ones, ``counts`` (B, K, K)."""
    n_rows, k = p.shape
    parts = [np.zeros((n_rows, k * k))]
    parts[0][np.arange(n_rows), y * k + pred] = 1.0
    parts.append(((p - np.eye(k)[y]) ** 2).sum(axis=1, keepdims=True))
    parts.append(ece_design(p.max(axis=1), (p.argmax(axis=1) == y).astype(float), ECE_BINS))
    if ordinal:
        err = np.abs(y - pred).astype(float)
        parts.append(np.column_stack([err, err <= 1]))
    if referable is not None:
        truth, score = y >= referable[0], p[:, referable[0] :].sum(axis=1)
        call = score >= referable[1]
        parts.append(np.column_stack([truth & call, ~truth & call, ~truth & ~call, truth & ~call]).astype(float))
    s = w @ np.hstack(parts)

    counts = s[:, : k * k].reshape(-1, k, k)
    n = counts.sum(axis=(1, 2))
    tp = np.diagonal(counts, axis1=1, axis2=2)
    actual, predicted = counts.sum(axis=2), counts.sum(axis=1)
    recall, f1 = _div(tp, actual), _div(2 * tp, actual + predicted)
    present = actual > 0
    auc = np.column_stack(
        [_ranking((y == c).astype(np.int64), p[:, c], w, actual[:, c], n - actual[:, c])[0] for c in range(k)]
    )
    cov_tp = tp.sum(axis=1) * n - (actual * predicted).sum(axis=1)
    cov_pp, cov_tt = n**2 - (predicted**2).sum(axis=1), n**2 - (actual**2).sum(axis=1)
    out = {
        "accuracy": _div(tp.sum(axis=1), n),
        "balanced_accuracy": _div((recall * present).sum(axis=1), present.sum(axis=1)),  # classes in y, as sklearn
        "macro_f1": f1.mean(axis=1),
        "weighted_f1": _div((f1 * actual).sum(axis=1), n),
        "macro_auc": auc.mean(axis=1),  # NaN when any class is absent (or is every row)
        "mcc": _div(cov_tp, np.sqrt(cov_pp * cov_tt)),  # 0 where undefined, as sklearn
        "ece": _div(np.abs(s[:, k * k + 1 : k * k + 1 + ECE_BINS]).sum(axis=1), n),
        "brier": _div(s[:, k * k], n),
        "pc_precision": _div(tp, predicted),
        "pc_recall": recall,
        "pc_f1": f1,
        "pc_auc": auc,
        "pc_support": actual,
        "pc_specificity": _div(n[:, None] - actual - predicted + tp, n[:, None] - actual),
        "counts": counts,
    }
    col = k * k + 1 + ECE_BINS
    if ordinal:
        out.update({"qwk": _qwk(counts), "mae": _div(s[:, col], n), "within_one": _div(s[:, col + 1], n)})
        col += 2
    if referable is not None:
        rtp, rfp, rtn, rfn = s[:, col : col + 4].T
        out.update(
            {
                "referable.auc": _ranking(truth.astype(np.int64), score, w, rtp + rfn, rtn + rfp)[0],
                "referable.sensitivity": _div(rtp, rtp + rfn),
                "referable.specificity": _div(rtn, rtn + rfp),
                "referable.f1": _div(2 * rtp, 2 * rtp + rfp + rfn),
                "referable.prevalence": _div(rtp + rfn, n),
            }
        )
    return out


def _named(vals: Mapping[str, np.ndarray], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """The (B,) arrays under their flat report names (`flatten_report`'s): per-class ones as
    ``per_class.<class>.<metric>``."""
    out = {k: v for k, v in vals.items() if not k.startswith("pc_") and k != "counts"}
    for c, name in enumerate(classes):
        for m in PER_CLASS:
            out[f"per_class.{name}.{m}"] = vals[f"pc_{m}"][:, c]
    return out


def _report(
    y: np.ndarray,
    p: np.ndarray,
    pred: np.ndarray,
    classes: list[str],
    ordinal: bool,
    referable: tuple[int, float] | None,
) -> dict[str, Any]:
    vals = _weighted(y, p, pred, np.ones((1, y.size)), ordinal, referable)
    out: dict[str, Any] = {m: float(vals[m][0]) for m in (*SUMMARY, *(ORDINAL if ordinal else ()))}
    out["per_class"] = {
        name: {
            m: round(float(vals[f"pc_{m}"][0, c])) if m == "support" else float(vals[f"pc_{m}"][0, c])
            for m in PER_CLASS
        }
        for c, name in enumerate(classes)
    }
    counts = np.rint(vals["counts"][0]).astype(np.int64)
    out["confusion"] = {
        "labels": list(classes),
        "counts": counts.tolist(),
        "normalized": _div(counts, counts.sum(axis=1, keepdims=True)).tolist(),
    }
    if referable is not None:
        out["referable"] = {m: float(vals[f"referable.{m}"][0]) for m in REFERABLE}
        out["referable"]["threshold"] = referable[1]
    return out


# ----------------------------------------------------------------------------- reports
def multiclass_report(
    y: ArrayLike, proba: ArrayLike, classes: Sequence[str], pred: ArrayLike | None = None
) -> dict[str, Any]:
    """Summary, per-class and confusion figures of a K-class classifier (K >= 2).

    ``y`` holds the true class indices (N,), ``proba`` the (N, K) class probabilities (rows summing to 1 within
    `ROW_SUM_TOL`), ``classes`` the K class names in column order, ``pred`` the called class per row (default: the
    argmax). The decision figures use ``pred``; ``macro_auc``, ``ece`` and ``brier`` judge the probabilities only.

    * ``accuracy``: share of rows with pred == y;
    * ``balanced_accuracy``: mean recall over the classes present in ``y`` (sklearn's ``balanced_accuracy_score``);
    * ``macro_f1`` / ``weighted_f1``: mean of the K per-class F1 scores, unweighted / weighted by support (a class
      absent from both y and pred counts F1 0, as sklearn with ``labels=range(K), zero_division=0``);
    * ``macro_auc``: mean one-vs-rest ROC AUC of p_k for class k; NaN if a class is absent from ``y`` (or is every
      row);
    * ``mcc``: the K-class Matthews correlation (Gorodkin's R_K, sklearn's ``matthews_corrcoef``), 0 if undefined;
    * ``ece``: top-label expected calibration error: |mean max-probability - share argmax correct| per
      `calibration.ECE_BINS` equal-width bin, weighted by bin count;
    * ``brier``: multi-class Brier score, mean over rows of sum_k (p_k - [y == k])^2 (0 best, 2 worst);
    * ``per_class[name]``: one-vs-rest ``precision``, ``recall`` (sensitivity), ``f1``, ``specificity`` (TN / (TN +
      FP)) of the call pred == k, ``auc`` (ROC AUC of p_k, NaN if the class is absent or every row) and ``support``
      (int, rows of the class in ``y``);
    * ``confusion``: ``labels`` (the class names), ``counts`` (K x K ints, rows = actual, columns = predicted) and
      ``normalized`` (each row divided by its total: the recall of each row's class on the diagonal; 0 for an empty
      row).
    """
    yy, p, pp, names = _check_inputs(y, proba, classes, pred, min_k=2)
    return _report(yy, p, pp, names, ordinal=False, referable=None)


def ordinal_report(
    y: ArrayLike,
    proba: ArrayLike,
    classes: Sequence[str],
    pred: ArrayLike | None = None,
    referable_from: int | None = None,
    referable_threshold: float | None = None,
) -> dict[str, Any]:
    """`multiclass_report` for ordered grades (K >= 3, ``classes`` lowest grade first), plus:

    * ``qwk``: quadratic weighted Cohen kappa of pred vs y, weights (i - j)^2 over the grade indices 0..K-1 (=
      sklearn's ``cohen_kappa_score(y, pred, weights="quadratic", labels=range(K))``; NaN if undefined);
    * ``mae``: mean absolute grade error |pred - y|;
    * ``within_one``: share of rows with |pred - y| <= 1.

    ``pred`` is typically `apply_cutpoints` of `fit_ordinal_cutpoints` (default: the argmax). With ``referable_from``
    (grade index k in [1, K-1]), ``referable`` is the binary view "grade >= k": the score is P(grade >= k) = sum_{j >=
    k} p_j, called referable when score >= ``referable_threshold`` (default `DEFAULT_REFERABLE_THRESHOLD`), with
    ``auc`` (ROC AUC of the score, NaN with one class), ``sensitivity``, ``specificity``, ``f1`` of the call,
    ``threshold`` (the one used) and ``prevalence`` (share of rows with y >= k).
    """
    yy, p, pp, names = _check_inputs(y, proba, classes, pred, min_k=3)
    thr = _check_referable(p.shape[1], referable_from, referable_threshold)
    ref = None if thr is None or referable_from is None else (int(referable_from), thr)
    return _report(yy, p, pp, names, ordinal=True, referable=ref)


def flatten_report(report: Mapping[str, Any]) -> dict[str, float]:
    """The scalar figures of a report under flat names: the top-level numbers, ``per_class.<class>.<metric>`` and
    ``referable.<metric>`` (less its fixed ``threshold``); the confusion matrix is left out."""
    out: dict[str, float] = {}
    for key, v in report.items():
        if key == "per_class":
            for name, figures in v.items():
                out.update({f"per_class.{name}.{m}": float(x) for m, x in figures.items()})
        elif key == "referable":
            out.update({f"referable.{m}": float(x) for m, x in v.items() if m != "threshold"})
        elif isinstance(v, int | float | np.number) and not isinstance(v, bool):
            out[key] = float(v)
    return out


# ----------------------------------------------------------------------------- ordinal cut-points
def expected_grade(proba: ArrayLike) -> np.ndarray:
    """E[grade] = sum_k k p_k per row (grades 0..K-1): the ordinal score that `apply_cutpoints` cuts."""
    p = _check_proba(proba)
    out: np.ndarray = p @ np.arange(p.shape[1], dtype=float)
    return out


def apply_cutpoints(proba: ArrayLike, cuts: Sequence[float]) -> np.ndarray:
    """Grade per row from its expected grade e: the number of cut-points c_j with e >= c_j (so grade j for
    c_j <= e < c_{j+1}). The cuts [0.5, 1.5, ..., K - 1.5] round the expected grade."""
    e = expected_grade(proba)
    c = np.asarray(cuts, dtype=float)
    k = np.asarray(proba).shape[1]
    if c.shape != (k - 1,) or not np.isfinite(c).all() or (np.diff(c) <= 0).any():
        raise ValueError(f"cuts must be {k - 1} finite, strictly increasing cut-points for K = {k}; got {list(cuts)}")
    out: np.ndarray = np.searchsorted(c, e, side="right").astype(np.int64)
    return out


def fit_ordinal_cutpoints(y_val: ArrayLike, proba_val: ArrayLike, k: int) -> list[float]:
    """K - 1 strictly increasing cut-points on the expected grade that maximise the validation QWK.

    Coordinate ascent from the rounding cuts [0.5, ..., K - 1.5]: each cut in turn moves to the candidate that
    maximises QWK with the other cuts fixed, the candidates being the midpoints between consecutive distinct
    expected grades of the rows it can move (and the neighbouring cuts); a move is taken only for a strictly
    higher QWK (the first such candidate on ties), and passes repeat until none moves (at most
    `MAX_CUTPOINT_PASSES`). Deterministic, and never below the QWK of the rounded expected grade on validation.
    """
    p = _check_proba(proba_val, min_k=3, what="proba_val")
    kk = p.shape[1]
    if k != kk:
        raise ValueError(f"k = {k} classes, but proba_val has {kk} columns")
    y = _check_labels(y_val, "y_val", kk, p.shape[0])
    e = expected_grade(p)
    onehot = np.eye(kk)[y]
    cuts = np.arange(kk - 1, dtype=float) + 0.5

    def confusion(pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
        c = np.zeros((kk, kk))
        np.add.at(c, (y[rows], pred[rows]), 1.0)
        return c

    best = float(_qwk(confusion(np.searchsorted(cuts, e, side="right"), np.ones(e.size, dtype=bool))))
    best = -math.inf if math.isnan(best) else best
    for _ in range(MAX_CUTPOINT_PASSES):
        moved = False
        for j in range(kk - 1):
            lo = cuts[j - 1] if j > 0 else -0.5  # e >= 0 > -0.5: every row below cut 1 can move
            hi = cuts[j + 1] if j < kk - 2 else kk - 0.5
            window = (e >= (cuts[j - 1] if j > 0 else -math.inf)) & (e < (cuts[j + 1] if j < kk - 2 else math.inf))
            base = confusion(np.searchsorted(cuts, e, side="right"), ~window)
            ew = e[window]
            order = np.argsort(ew, kind="stable")
            es, ys = ew[order], onehot[window][order]
            u = np.unique(np.r_[lo, es, hi])
            cand = (u[:-1] + u[1:]) / 2
            below = np.vstack([np.zeros(kk), np.cumsum(ys, axis=0)])[np.searchsorted(es, cand, side="left")]
            trial = np.repeat(base[None], cand.size, axis=0)
            trial[:, :, j] += below
            trial[:, :, j + 1] += ys.sum(axis=0) - below
            q = _qwk(trial)
            if np.isnan(q).all():
                continue
            i = int(np.nanargmax(q))
            if q[i] > best + 1e-12:
                cuts[j], best, moved = cand[i], float(q[i]), True
        if not moved:
            break
    return [float(c) for c in cuts]


# ----------------------------------------------------------------------------- per-class alert thresholds
def fit_class_threshold(y_val_is_class: ArrayLike, p_val: ArrayLike, target_sensitivity: float) -> dict[str, float]:
    """The highest threshold t whose validation sensitivity (share of class rows with p >= t) is >= the target.

    t is the m-th highest class-row score, m the fewest rows meeting the target, so every score tied with it is
    called positive too. Returns ``threshold``, ``val_sensitivity``, ``val_specificity`` (share of other rows with
    p < t; 0 when there are none) and ``n_positive`` (class rows in validation).
    """
    pos, p = np.asarray(y_val_is_class), np.asarray(p_val, dtype=float)
    if pos.ndim != 1 or p.shape != pos.shape or pos.size == 0:
        raise ValueError(f"need equal-length, non-empty 1-D y_val_is_class and p_val; got {pos.shape} and {p.shape}")
    if not np.isin(pos, (0, 1)).all():
        raise ValueError("y_val_is_class must be boolean (or 0/1)")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("p_val must hold finite probabilities within [0, 1]")
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must lie in (0, 1]; got {target_sensitivity}")
    pos = pos.astype(bool)
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise ValueError("y_val_is_class has no positive row: no threshold can be fitted for a sensitivity")
    m = max(1, min(n_pos, math.ceil(target_sensitivity * n_pos)))
    while m > 1 and (m - 1) / n_pos >= target_sensitivity:  # float rounding of target * n_pos
        m -= 1
    while m < n_pos and m / n_pos < target_sensitivity:
        m += 1
    thr = float(np.sort(p[pos])[::-1][m - 1])
    return {
        "threshold": thr,
        "val_sensitivity": float(np.mean(p[pos] >= thr)),
        "val_specificity": float(_div(np.sum(p[~pos] < thr), np.sum(~pos))),
        "n_positive": n_pos,
    }


def flag_critical(proba: ArrayLike, class_index: int, threshold: float) -> np.ndarray:
    """Rows flagged for class ``class_index``: p[:, class_index] >= threshold (whatever the argmax)."""
    p = _check_proba(proba)
    if not 0 <= class_index < p.shape[1]:
        raise ValueError(f"class_index must lie in [0, {p.shape[1]}); got {class_index}")
    out: np.ndarray = p[:, class_index] >= threshold
    return out


# ----------------------------------------------------------------------------- bootstrap
def _unit_weights(inverse: np.ndarray, n_units: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """B x N row multiplicities: each resample draws n_units units (rows, or groups) with replacement (the draws
    of `metrics.bootstrap` for this seed) and gives every row its unit's count; blocks of bounded memory."""
    step = max(1, _CHUNK_ELEMS // inverse.size)
    for wg in _weight_blocks(n_units, n_boot, seed):
        for start in range(0, wg.shape[0], step):
            yield wg[start : start + step][:, inverse]


def bootstrap_report_ci(
    report_fn: ReportFn,
    y: ArrayLike,
    proba: ArrayLike,
    n_boot: int,
    seed: int,
    groups: ArrayLike | None = None,
    alpha: float = 0.05,
    **kw: Any,
) -> dict[str, dict[str, float]]:
    """``{name: {"value", "ci_low", "ci_high"}}`` for every scalar of ``report_fn(y, proba, **kw)`` (names as
    `flatten_report`: ``per_class.<class>.<metric>``, ``referable.<metric>``).

    Percentile bootstrap over ``n_boot`` resamples drawn from ``seed``: of rows, or, with ``groups`` (a patient or
    lesion id per row), of whole groups, so that every row of a group enters a resample with it (a cluster
    bootstrap; with one row per group it is the row bootstrap). NaN resamples (an AUC with a class absent) are
    skipped; ``n_boot == 0`` gives NaN CIs. A ``pred`` in ``kw`` is resampled with its rows; the other arguments
    (classes, referable_from, a threshold fitted on validation) stay fixed. For `multiclass_report` and
    `ordinal_report` the resamples are evaluated vectorised; any other ``report_fn`` is called once per resample.
    """
    _check_boot(n_boot, alpha)
    point = flatten_report(report_fn(y, proba, **kw))  # validates the inputs
    n_rows = len(np.asarray(proba))
    if groups is None:
        inverse, n_units = np.arange(n_rows), n_rows
    else:
        g = np.asarray(groups)
        if g.ndim != 1 or g.size != n_rows:
            raise ValueError(f"groups must be 1-D with one id per proba row ({n_rows}); got shape {g.shape}")
        uniq, inverse = np.unique(g, return_inverse=True)
        n_units = uniq.size
    boot: dict[str, list[np.ndarray]] = {name: [] for name in point}
    if report_fn is multiclass_report or report_fn is ordinal_report:
        ordinal = report_fn is ordinal_report
        yy, p, pp, names = _check_inputs(y, proba, kw["classes"], kw.get("pred"), min_k=3 if ordinal else 2)
        thr = _check_referable(p.shape[1], kw.get("referable_from"), kw.get("referable_threshold"))
        ref = None if thr is None else (int(kw["referable_from"]), thr)
        for w in _unit_weights(inverse, n_units, n_boot, seed):
            vals = _named(_weighted(yy, p, pp, w, ordinal, ref), names)
            for name in boot:
                boot[name].append(vals[name])
    else:
        ya, pa = np.asarray(y), np.asarray(proba)
        for w in _unit_weights(inverse, n_units, n_boot, seed):
            for row in w:
                idx = np.repeat(np.arange(n_rows), row.astype(np.int64))
                kwi = dict(kw, pred=np.asarray(kw["pred"])[idx]) if kw.get("pred") is not None else kw
                vals_i = flatten_report(report_fn(ya[idx], pa[idx], **kwi))
                for name in boot:
                    boot[name].append(np.array([vals_i.get(name, math.nan)]))
    out: dict[str, dict[str, float]] = {}
    for name, value in point.items():
        lo, hi = _percentile_ci(np.concatenate(boot[name]), alpha) if n_boot else (math.nan, math.nan)
        out[name] = {"value": value, "ci_low": lo, "ci_high": hi}
    return out
