"""Evaluation metrics, operating thresholds and bootstrap CIs (the release gates: `medclf.evaluation.gates`).

Pure functions over numpy arrays (no I/O, MLflow or Keras), so the evaluate stage, the
gates and the tests share one definition of every number that decides a release.
Conventions, fixed here once:

* a case is called positive when ``p >= threshold``;
* zero-division yields 0.0, and a single-class input yields NaN for the ranking metrics
  (ROC AUC, average precision) instead of raising, so a tiny split or an unlucky bootstrap
  resample cannot crash a run;
* calibration uses 10 equal-width bins with ``sklearn.calibration.calibration_curve``'s edges
  (right-closed, the first bin also holds 0), so ECE and reliability plots agree with sklearn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from medclf.config.vocabulary import METRICS, SUBGROUP, metric
from medclf.evaluation.calibration import ECE_BINS, bin_ids, ece_design, ece_of

ThresholdRule = Literal["target_sensitivity", "max_f1", "youden"]
BINARY_SCORES = tuple(METRICS)
"""Every binary score `binary_metrics` returns, named in `medclf.config.vocabulary.METRICS`."""
COUNTS = ("tp", "fp", "tn", "fn")
MAX_PLOT_POINTS = 200
_CHUNK_ELEMS = 2_000_000  # bootstrap weight-matrix entries per block (~16 MB of float64)


# ----------------------------------------------------------------------------- helpers
def _check_binary(y_true: Any, p_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y_true), np.asarray(p_pos, dtype=float)
    if y.ndim != 1 or p.shape != y.shape or y.size == 0:
        raise ValueError(f"need equal-length, non-empty 1-D y and p; got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0/1 labels")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y.astype(np.int64), p


def _div(num: Any, den: Any) -> np.ndarray:
    """Elementwise num/den with 0.0 where den == 0 (the zero-division convention)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    out: np.ndarray = np.divide(num, den, out=np.zeros(num.shape), where=den > 0)
    return out


def _weighted_binary(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every binary metric for each row of ``w`` (B x N sample multiplicities).

    A row of ones is the plain point estimate; a row of bootstrap counts is one resample. One
    code path for both keeps the confidence intervals consistent with the reported values, and
    turns 500 resamples into a few matrix products instead of 500 Python-level metric calls.
    """
    pred, pos = p >= threshold, y == 1
    cols = np.column_stack([pos & pred, ~pos & pred, ~pos & ~pred, pos & ~pred, (p - y) ** 2])
    s = w @ np.hstack([cols.astype(float), ece_design(p, y.astype(float), ECE_BINS)])
    tp, fp, tn, fn, sq = s[:, :5].T
    n, n_pos, n_neg = tp + fp + tn + fn, tp + fn, tn + fp
    recall, spec = _div(tp, n_pos), _div(tn, n_neg)
    # like sklearn: mean recall over the classes present in y_true
    bal = np.where((n_pos > 0) & (n_neg > 0), (recall + spec) / 2, np.where(n_pos > 0, recall, spec))
    out = {
        "accuracy": _div(tp + tn, n),
        "balanced_accuracy": bal,
        "precision": _div(tp, tp + fp),
        "recall": recall,
        "specificity": spec,
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "mcc": _div(tp * tn - fp * fn, np.sqrt((tp + fp) * n_pos * n_neg * (tn + fn))),
        "brier": _div(sq, n),
        "ece": _div(np.abs(s[:, 5:]).sum(axis=1), n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
    out["roc_auc"], out["pr_auc"] = _ranking(y, p, w, n_pos, n_neg)
    return out


def _ranking(
    y: np.ndarray, p: np.ndarray, w: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ROC AUC, average precision) per row of ``w``, NaN where a class is absent: from per-distinct-score
    class weights, walking scores high -> low."""
    order = np.argsort(-p, kind="stable")
    ps, ys, wo = p[order], y[order].astype(float), w[:, order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    pos_g, neg_g = np.add.reduceat(wo * ys, starts, axis=1), np.add.reduceat(wo * (1 - ys), starts, axis=1)
    cum_pos, cum_neg = np.cumsum(pos_g, axis=1), np.cumsum(neg_g, axis=1)
    valid = (n_pos > 0) & (n_neg > 0)
    below = n_neg[:, None] - cum_neg  # negatives scored strictly lower; ties count one half
    auc = _div((pos_g * (below + 0.5 * neg_g)).sum(axis=1), n_pos * n_neg)
    ap = _div((pos_g * _div(cum_pos, cum_pos + cum_neg)).sum(axis=1), n_pos)  # sum dRecall * precision
    return np.where(valid, auc, np.nan), np.where(valid, ap, np.nan)


def _resample_indices(n_samples: int, n: int, seed: int) -> Iterator[np.ndarray]:
    """The i.i.d. with-replacement resamples: the ONE bootstrap draw, shared by every CI in this module."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, n_samples, size=n_samples)


def _weight_blocks(n_samples: int, n: int, seed: int) -> Iterator[np.ndarray]:
    """The same resamples as B x N multiplicity matrices, in blocks of bounded memory (vectorised CIs)."""
    resamples, block = _resample_indices(n_samples, n, seed), max(1, _CHUNK_ELEMS // n_samples)
    for start in range(0, n, block):
        yield np.stack(
            [np.bincount(next(resamples), minlength=n_samples) for _ in range(min(block, n - start))]
        ).astype(float)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def _check_boot(n: int, alpha: float) -> None:
    if n < 0 or not 0 < alpha < 1:
        raise ValueError(f"need n >= 0 resamples and alpha in (0, 1); got n={n}, alpha={alpha}")


# ----------------------------------------------------------------------------- metrics
def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """The one ROC AUC (ties count one half); NaN if one class is absent. It is the ranking part of
    `_weighted_binary` with unit weights, so the AUC that selects epochs, the one reported and the one
    bootstrapped are the same computation."""
    y, p = np.asarray(y).astype(bool).astype(np.int64), np.asarray(score, dtype=float)
    n_pos = np.array([float(y.sum())])
    auc, _ = _ranking(y, p, np.ones((1, y.size)), n_pos, y.size - n_pos)
    return float(auc[0])


def macro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """Binary (2 columns): AUC of the last class. K > 2: the mean one-vs-rest AUC, NaN when any class is
    absent (or is every sample), as evaluate reports it; training selects epochs by the same number."""
    y, proba = np.asarray(y).astype(np.int64), np.asarray(proba)
    k = proba.shape[1]
    if k == 2:
        return roc_auc(y == 1, proba[:, 1])
    return float(np.mean([roc_auc(y == c, proba[:, c]) for c in range(k)]))


def binary_metrics(y_true: np.ndarray, p_pos: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold, ranking and calibration metrics for a binary classifier.

    ``ece`` measures calibration of the positive-class probability (10 equal-width bins,
    weighted by bin count): the quantity a clinician reads off a risk score. Counts are ints.
    """
    y, p = _check_binary(y_true, p_pos)
    vals = _weighted_binary(y, p, float(threshold), np.ones((1, y.size)))
    keys = (*BINARY_SCORES, *COUNTS)
    return {k: round(float(vals[k][0])) if k in COUNTS else float(vals[k][0]) for k in keys}


def multiclass_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Summary and per-class metrics for a K-class softmax output (prediction = argmax).

    ``roc_auc`` is the macro one-vs-rest AUC (NaN when some class is absent from y_true);
    ``brier`` is the mean over samples of the squared distance to the one-hot label; ``ece`` is
    the top-label calibration error of the max probability.
    """
    y, prob, k = np.asarray(y_true).astype(np.int64), np.asarray(proba, dtype=float), len(class_names)
    if prob.ndim != 2 or prob.shape != (y.size, k) or y.size == 0:
        raise ValueError(f"proba must be (N, {k}) with N = len(y_true) > 0; got {prob.shape}")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    pred, kw = prob.argmax(axis=1), {"labels": list(range(k)), "zero_division": 0}
    out: dict[str, Any] = {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
    }
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, pred, average=avg, **kw)
        out.update({f"{avg}_precision": float(pr), f"{avg}_recall": float(rc), f"{avg}_f1": float(f1)})
    out["roc_auc"] = macro_auc(y, prob)  # the one AUC; NaN if any class is absent (or is every sample)
    out["mcc"] = float(skm.matthews_corrcoef(y, pred))
    out["brier"] = float(((prob - np.eye(k)[y]) ** 2).sum(axis=1).mean())
    out["ece"] = ece_of(prob.max(axis=1), (pred == y).astype(float))
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, average=None, **kw)
    out["per_class"] = {
        name: {"precision": float(pr[c]), "recall": float(rc[c]), "f1": float(f1[c]), "support": int(sup[c])}
        for c, name in enumerate(class_names)
    }
    return out


def bootstrap(
    stat: Callable[[np.ndarray], Mapping[str, float]], n_samples: int, n: int, seed: int, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of each value of ``stat(rows)`` over ``n`` seeded resamples of the rows.

    The generic path (any statistic, one call per resample); ``metrics_with_ci`` and
    ``paired_difference_ci`` evaluate the same resamples vectorised. Resamples where a value is
    undefined (NaN, e.g. AUC on one class) are skipped rather than biasing the interval; with
    ``n == 0`` (bootstrap disabled) every CI is (nan, nan).
    """
    _check_boot(n, alpha)
    vals: dict[str, list[float]] = {}
    for i in _resample_indices(n_samples, n, seed):
        for k, v in stat(i).items():
            vals.setdefault(k, []).append(v)
    return {k: _percentile_ci(np.asarray(v, dtype=float), alpha) for k, v in vals.items()}


def bootstrap_ci(
    fn: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, p: np.ndarray, n: int, seed: int, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``fn(y, p)`` (see ``bootstrap``); (nan, nan) when ``n == 0``."""
    y, p = np.asarray(y), np.asarray(p)
    return bootstrap(lambda i: {"v": fn(y[i], p[i])}, len(y), n, seed, alpha).get("v", (math.nan, math.nan))


MULTICLASS_CI = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_recall", "roc_auc")


def multiclass_with_ci(
    y: np.ndarray, proba: np.ndarray, class_names: list[str], n_boot: int, seed: int
) -> dict[str, Any]:
    """``multiclass_metrics`` plus ``<name>_ci_low/_ci_high`` for its summary scores (same resamples)."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=float)
    out = multiclass_metrics(y, proba, class_names)
    if n_boot:
        cis = bootstrap(
            lambda i: {k: multiclass_metrics(y[i], proba[i], class_names)[k] for k in MULTICLASS_CI},
            len(y),
            n_boot,
            seed,
        )
        for k in MULTICLASS_CI:
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = cis[k]
    return out


def metrics_with_ci(
    y_true: np.ndarray, p_pos: np.ndarray, threshold: float, n_boot: int, seed: int, alpha: float = 0.05
) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` for every non-count binary metric.

    The threshold stays fixed across resamples (it was chosen on validation data), so the CI
    reflects test-set sampling noise only. Resamples are the same ones ``bootstrap`` draws
    for the same seed, evaluated in vectorised blocks.
    """
    _check_boot(n_boot, alpha)
    y, p = _check_binary(y_true, p_pos)
    point = binary_metrics(y, p, threshold)
    boot: dict[str, list[np.ndarray]] = {k: [] for k in BINARY_SCORES}
    for w in _weight_blocks(y.size, n_boot, seed):
        for k, v in _weighted_binary(y, p, float(threshold), w).items():
            if k in boot:
                boot[k].append(v)
    cis = {k: _percentile_ci(np.concatenate(boot[k]), alpha) if n_boot else (math.nan, math.nan) for k in BINARY_SCORES}
    return {k: {"value": point[k], "ci_low": cis[k][0], "ci_high": cis[k][1]} for k in BINARY_SCORES}


def paired_difference_ci(
    y_true: np.ndarray,
    p_a: np.ndarray,
    t_a: float,
    p_b: np.ndarray,
    t_b: float,
    keys: Sequence[str],
    n_boot: int,
    seed: int,
    alpha: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Model A minus model B on the same rows, each at its own threshold, with a paired bootstrap CI.

    Every resample weights the same rows for both models (the resamples ``bootstrap`` draws for
    this seed), so the interval is that of the difference itself.
    """
    _check_boot(n_boot, alpha)
    y, pa = _check_binary(y_true, p_a)
    _, pb = _check_binary(y_true, p_b)
    a, b = binary_metrics(y, pa, t_a), binary_metrics(y, pb, t_b)
    boot: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for w in _weight_blocks(y.size, n_boot, seed):
        wa, wb = _weighted_binary(y, pa, float(t_a), w), _weighted_binary(y, pb, float(t_b), w)
        for k in keys:
            boot[k].append(wa[k] - wb[k])
    out = {}
    for k in keys:
        lo, hi = _percentile_ci(np.concatenate(boot[k]), alpha) if n_boot else (math.nan, math.nan)
        out[k] = {"a": float(a[k]), "b": float(b[k]), "diff": float(a[k] - b[k]), "ci_low": lo, "ci_high": hi}
    return out


# ----------------------------------------------------------------------------- thresholds
def choose_threshold(
    y_val: np.ndarray, p_val: np.ndarray, rule: ThresholdRule, target_sensitivity: float = 0.9
) -> dict[str, Any]:
    """Pick the operating threshold on VALIDATION data (positive when ``p >= threshold``).

    The caller must never pass test data: a threshold tuned on the test set makes every
    reported test metric optimistically biased. Candidates are the distinct validation scores.

    * ``target_sensitivity``: the highest threshold whose sensitivity >= target, i.e. the best
      specificity subject to the sensitivity constraint (screening: do not miss disease);
    * ``max_f1``: maximise F1; ``youden``: maximise sensitivity + specificity - 1.
      Ties go to the lower threshold, i.e. the higher sensitivity.
    """
    y, p = _check_binary(y_val, p_val)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("validation data must contain both classes to choose a threshold")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    ends = np.r_[np.flatnonzero(ps[1:] != ps[:-1]), ps.size - 1]  # last index of each distinct score
    thr, tp = ps[ends], np.cumsum(ys)[ends].astype(float)
    fp = (ends + 1) - tp  # ends + 1 = number called positive at each threshold
    sens, spec, f1 = tp / n_pos, (n_neg - fp) / n_neg, 2 * tp / (2 * tp + fp + (n_pos - tp))
    if rule == "target_sensitivity":
        if not 0 < target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        i = int(np.argmax(sens >= target_sensitivity - 1e-12))  # first (highest) qualifying score
    elif rule in ("max_f1", "youden"):
        score = f1 if rule == "max_f1" else sens + spec - 1
        i = int(np.flatnonzero(score >= score.max() - 1e-12)[-1])
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    out: dict[str, Any] = {
        "threshold": float(thr[i]),
        "rule": rule,
        "val_sensitivity": float(sens[i]),
        "val_specificity": float(spec[i]),
        "val_f1": float(f1[i]),
    }
    if rule == "target_sensitivity":
        out["target_sensitivity"] = float(target_sensitivity)
    return out


def thresholded_labels(proba: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row under the operating threshold (shared by evaluation and serving).

    Positive when ``proba[:, positive] >= threshold``; otherwise the most probable of the other
    classes (for two classes: the negative one). With K > 2 this is the one-vs-rest decision the
    binary metrics and gates are computed for, so reports and served labels never disagree.
    """
    prob = np.asarray(proba, dtype=float)
    if prob.ndim != 2 or not 0 <= positive < prob.shape[1]:
        raise ValueError(f"proba must be (N, K) with 0 <= positive < K; got {prob.shape}, {positive}")
    if prob.shape[1] == 1:
        return np.zeros(len(prob), np.int64)
    rest = prob.copy()
    rest[:, positive] = -np.inf
    return np.where(prob[:, positive] >= threshold, positive, rest.argmax(axis=1)).astype(np.int64)


# ----------------------------------------------------------------------------- plot data
def confusion(y_true: ArrayLike, y_pred: ArrayLike, k: int) -> np.ndarray:
    """k x k confusion matrix, rows = true class, columns = predicted class."""
    t, q = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    if t.shape != q.shape or (t.size and (min(t.min(), q.min()) < 0 or max(t.max(), q.max()) >= k)):
        raise ValueError(f"y_true / y_pred must be equal-length labels in [0, {k})")
    return np.bincount(t * k + q, minlength=k * k).reshape(k, k)


def _downsample(points: list[dict[str, Any]], max_points: int = MAX_PLOT_POINTS) -> list[dict[str, Any]]:
    """Evenly thin a curve to <= max_points, keeping both end points (small DVC plot files)."""
    if len(points) <= max_points:
        return points
    idx = np.unique(np.round(np.linspace(0, len(points) - 1, max_points)).astype(int))
    return [points[i] for i in idx]


def calibration_curve_points(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Reliability-diagram points for the non-empty equal-width bins (sklearn's bin edges)."""
    yy, pp = _check_binary(y, p)
    ids, edges = bin_ids(pp, bins), np.linspace(0.0, 1.0, bins + 1)
    count = np.bincount(ids, minlength=bins)
    mean_p = _div(np.bincount(ids, weights=pp, minlength=bins), count)
    frac = _div(np.bincount(ids, weights=yy, minlength=bins), count)
    return [
        {
            "bin": b,
            "bin_lower": float(edges[b]),
            "bin_upper": float(edges[b + 1]),
            "mean_predicted": float(mean_p[b]),
            "fraction_positive": float(frac[b]),
            "count": int(count[b]),
        }
        for b in range(bins)
        if count[b] > 0
    ]


def roc_points(y: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
    """ROC curve points {fpr, tpr, threshold}; [] when one class only.

    sklearn's leading +inf sentinel threshold is reported as None (JSON has no infinity).
    """
    yy, pp = _check_binary(y, p)
    if yy.min() == yy.max():
        return []
    fpr, tpr, thr = skm.roc_curve(yy, pp)  # drop_intermediate=True already thins collinear points
    return _downsample(
        [
            {"fpr": float(a), "tpr": float(b), "threshold": float(t) if np.isfinite(t) else None}
            for a, b, t in zip(fpr, tpr, thr, strict=True)
        ]
    )


def pr_points(y: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
    """Precision-recall points {recall, precision, threshold}, recall ascending; [] if no positives.

    The end point (recall 0, precision 1) has no threshold and gets None.
    """
    yy, pp = _check_binary(y, p)
    if yy.max() == 0:
        return []
    prec, rec, thr = skm.precision_recall_curve(yy, pp)
    pts = [
        {"recall": float(r), "precision": float(q), "threshold": t}
        for r, q, t in zip(rec, prec, [*map(float, thr), None], strict=True)
    ]
    return _downsample(pts[::-1])


SUBGROUP_MIN_N, SUBGROUP_MIN_CLASS = 20, 2
SUBGROUP_FIGURES = {name: metric(name).key for name in SUBGROUP}  # column -> binary_metrics key


def subgroup_metrics(
    y: np.ndarray,
    p: np.ndarray,
    groups: Mapping[str, np.ndarray],
    threshold: float,
    n_boot: int,
    seed: int,
    min_n: int = SUBGROUP_MIN_N,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{column: {category: {n, positives, roc_auc, sensitivity, specificity, f1, <each>_ci_low/_ci_high}}} at the
    fixed `threshold` (`metrics_with_ci` per category); a category under `min_n` images or with fewer than
    `SUBGROUP_MIN_CLASS` of either class has its counts and `note: "too few ..."` only (medclf.evaluation.subgroups)."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, cats in groups.items():
        cats, out[name] = np.asarray(cats).astype(str), {}
        for cat in sorted(set(cats.tolist())):
            idx = np.flatnonzero(cats == cat)
            pos = int(y[idx].sum())
            row: dict[str, Any] = {"n": int(idx.size), "positives": pos}
            if idx.size < min_n or min(pos, idx.size - pos) < SUBGROUP_MIN_CLASS:
                row["note"] = f"too few (n < {min_n} or < {SUBGROUP_MIN_CLASS} of a class)"
            else:
                ci = metrics_with_ci(y[idx], p[idx], threshold, n_boot, seed)
                for key, src in SUBGROUP_FIGURES.items():
                    for part, v in zip(("", "_ci_low", "_ci_high"), ci[src].values(), strict=True):
                        row[key + part] = float(v) if math.isfinite(v) else None
            out[name][cat] = row
    return out
