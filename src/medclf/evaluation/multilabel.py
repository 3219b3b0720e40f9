"""Multi-label evaluation (issue 25): an image may carry any number of findings (fundus: normal, diabetic
retinopathy, glaucoma, cataract, ...), one sigmoid probability each.

Pure functions over numpy arrays (no I/O, MLflow or Keras). ``y`` is an N x L 0/1 matrix (columns = the findings,
in ``labels`` order; a row of zeros, "no finding", is legal) and ``p`` the N x L per-finding probabilities. The
conventions are those of `medclf.evaluation.metrics` and `medclf.evaluation.kclass`, which this module builds on:

* each finding is its own binary problem: called present when ``p[:, j] >= threshold_j``, its own threshold,
  fitted on validation only (`fit_thresholds`) and looked up by the finding's name, never by position;
* the per-finding figures are `metrics.binary_metrics` of that column (zero-division yields 0.0; ROC AUC and
  average precision are NaN when the finding is absent from the sample, or is every row; ECE over
  `calibration.ECE_BINS` equal-width bins with sklearn's edges);
* the CIs are `kclass.bootstrap_report_ci` over `multilabel_report` (percentile, NaN resamples skipped, rows or
  whole patients resampled);
* per-finding temperature scaling is `calibration.fit_temperature` on the two-column view [1 - p_j, p_j]: the
  softmax of log p / T over those two columns is sigmoid(logit(p_j) / T), so the same bounded golden-section
  search minimises each finding's binary NLL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from medclf.evaluation import calibration, kclass, metrics
from medclf.infra.io import json_safe

RULES = ("target_sensitivity", "f1")
"""The threshold rules a finding may name (`fit_thresholds`); a number is that finding's own target sensitivity."""
PER_LABEL_FIGURES = ("auc", "ap", "recall", "specificity", "precision", "f1", "support", "prevalence", "ece")
"""The per-finding table (`per_class.<label>.<figure>`): `vocabulary.PER_LABEL` and the support, prevalence, ECE."""
SUMMARY = (
    "macro_auc",
    "micro_auc",
    "map",
    "macro_f1",
    "micro_f1",
    "hamming_loss",
    "subset_accuracy",
    "ece",
    "label_cardinality",
)
_FROM_BINARY = {"auc": "roc_auc", "ap": "pr_auc", "recall": "recall", "specificity": "specificity"}
_FROM_BINARY |= {"precision": "precision", "f1": "f1", "ece": "ece"}  # per-finding figure -> binary_metrics key

Fit = dict[str, float | str | None]
"""One finding's fitted threshold: threshold, rule, target, val_sensitivity, val_specificity, val_f1, n_positive."""
Thresholds = Mapping[str, float | Mapping[str, Any]] | Sequence[float]
"""Per-finding thresholds: by name (a number, or a `Fit` with its ``threshold``), or a sequence in label order."""


# ----------------------------------------------------------------------------- input checks
def _check(y: ArrayLike, p: ArrayLike, labels: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(y as an int64 0/1 matrix, p as a float matrix), or a ValueError saying what is wrong."""
    try:
        pp = np.asarray(p, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"p must be a numeric (N, L) array of per-finding probabilities: {e}") from e
    if pp.ndim != 2 or pp.shape[0] == 0 or pp.shape[1] == 0:
        raise ValueError(f"p must be a non-empty (N, L) array of per-finding probabilities; got shape {pp.shape}")
    if labels is not None:
        kclass._check_classes(labels, pp.shape[1])
    if not np.isfinite(pp).all() or (pp < 0).any() or (pp > 1).any():
        raise ValueError("p must hold finite probabilities within [0, 1] (NaN or out of range found)")
    yy = np.asarray(y)
    if yy.shape != pp.shape:
        raise ValueError(f"y must be an N x L 0/1 matrix of the shape of p {pp.shape}; got shape {yy.shape}")
    if not (np.issubdtype(yy.dtype, np.number) or yy.dtype == bool) or not np.isin(yy, (0, 1)).all():
        raise ValueError("y must hold only 0/1 labels (one column per finding)")
    return yy.astype(np.int64), pp


def _threshold_vector(thresholds: Thresholds, labels: Sequence[str]) -> np.ndarray:
    """The (L,) thresholds in ``labels`` order: looked up by name in a mapping (every finding, and only those),
    or taken in order from a sequence."""
    names = list(labels)
    if isinstance(thresholds, Mapping):
        missing, extra = [c for c in names if c not in thresholds], [c for c in thresholds if c not in names]
        if missing or extra:
            raise ValueError(
                f"thresholds must name every finding of {names} and no other; missing {missing}, unknown {extra}"
            )
        vals = [v["threshold"] if isinstance(v, Mapping) else v for v in (thresholds[c] for c in names)]
    else:
        vals = list(thresholds)
        if len(vals) != len(names):
            raise ValueError(f"got {len(vals)} thresholds for {len(names)} findings {names}")
    t = np.asarray(vals, dtype=float)
    bad = [c for c, v in zip(names, t, strict=True) if not 0.0 <= v <= 1.0]  # NaN fails too
    if bad:
        raise ValueError(f"thresholds must lie within [0, 1]; not so for {bad}")
    return t


# ----------------------------------------------------------------------------- thresholds
def _rule_of(label: str, rule: str | float) -> tuple[str, float | None]:
    """(rule name, target) of one finding's rule: "f1", "target_sensitivity" (target filled in later) or a
    number (its own target sensitivity)."""
    if isinstance(rule, bool) or not isinstance(rule, str | int | float):
        raise ValueError(f"finding {label!r}: rule must be one of {RULES} or a target sensitivity; got {rule!r}")
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"finding {label!r}: unknown threshold rule {rule!r}; known: {', '.join(RULES)}")
        return rule, None
    return "target_sensitivity", float(rule)


def fit_thresholds(
    y_val: ArrayLike,
    p_val: ArrayLike,
    labels: Sequence[str],
    rule: str = "target_sensitivity",
    rules: Mapping[str, str | float] | None = None,
    target_sensitivity: float = 0.9,
) -> dict[str, Fit]:
    """One threshold per finding, fitted on the VALIDATION split only (never pass test data: a threshold tuned on
    the test set biases every test figure).

    Each finding follows ``rules[label]`` if given, else ``rule``:

    * ``"target_sensitivity"``: the highest threshold whose validation sensitivity reaches ``target_sensitivity``
      (`kclass.fit_class_threshold`: the best specificity that does not miss more of the finding);
    * a number in ``rules``: the same, for that finding's own target sensitivity (e.g. ``{"glaucoma": 0.95}``);
    * ``"f1"``: the threshold of the best validation F1 (`metrics.choose_threshold` ``max_f1``; ties go to the
      lower threshold).

    Returns ``{label: {threshold, rule ("target_sensitivity" | "f1"), target (the sensitivity aimed at, None for
    f1), val_sensitivity, val_specificity, val_f1 (the validation figures at that threshold), n_positive}}`` in
    ``labels`` order. A ValueError names the finding that cannot be fitted: no positive image in validation
    (either rule), no negative one (f1), an unknown rule or a target outside (0, 1]; and a ``rules`` key that is no
    finding.
    """
    y, p = _check(y_val, p_val, labels)
    names, rules = list(labels), dict(rules or {})
    unknown = sorted(set(rules) - set(names))
    if unknown:
        raise ValueError(f"rules name finding(s) {unknown} that are not among the findings {names}")
    out: dict[str, Fit] = {}
    for j, label in enumerate(names):
        how, target = _rule_of(label, rules.get(label, rule))
        yj, pj = y[:, j], p[:, j]
        n_pos = int(yj.sum())
        if n_pos == 0:
            raise ValueError(
                f"finding {label!r} has no positive image in the validation split ({yj.size} images): its "
                "threshold cannot be fitted"
            )
        try:
            if how == "f1":
                thr = float(metrics.choose_threshold(yj, pj, "max_f1")["threshold"])
            else:
                target = float(target_sensitivity) if target is None else target
                thr = float(kclass.fit_class_threshold(yj, pj, target)["threshold"])
        except ValueError as e:
            raise ValueError(f"finding {label!r}: {e}") from e
        val = metrics.binary_metrics(yj, pj, thr)
        out[label] = {
            "threshold": thr,
            "rule": how,
            "target": target,
            "val_sensitivity": val["recall"],
            "val_specificity": val["specificity"],
            "val_f1": val["f1"],
            "n_positive": n_pos,
        }
    return out


def apply_thresholds(p: ArrayLike, thresholds: Thresholds, labels: Sequence[str]) -> np.ndarray:
    """N x L bool: finding j is called present where ``p[:, j] >= thresholds[labels[j]]``, each column at its own
    finding's threshold (looked up by name; a sequence is taken in ``labels`` order)."""
    pp = np.asarray(p, dtype=float)
    if pp.ndim != 2 or pp.shape[1] != len(labels):
        raise ValueError(f"p must be (N, {len(labels)}), one column per finding of {list(labels)}; got {pp.shape}")
    out: np.ndarray = pp >= _threshold_vector(thresholds, labels)[None, :]
    return out


def decision_rule_words(thresholds: Mapping[str, Mapping[str, Any]]) -> str:
    """The decision rule as the model card and the version page state it: every finding's threshold and what it
    was fitted for."""

    def why(f: Mapping[str, Any]) -> str:
        return "best F1" if f["rule"] == "f1" else f"sensitivity {float(f['target']):g}"

    each = ", ".join(f"{c} >= {float(f['threshold']):.4f} ({why(f)})" for c, f in thresholds.items())
    head = "each finding is called present when its own probability reaches its threshold, fitted on validation: "
    return head + each


# ----------------------------------------------------------------------------- reports
def _nanmean(v: np.ndarray) -> float:
    """Mean of the defined values; NaN when none is."""
    ok = ~np.isnan(v)
    return float(v[ok].mean()) if ok.any() else math.nan


def multilabel_report(y: ArrayLike, p: ArrayLike, labels: Sequence[str], thresholds: Thresholds) -> dict[str, Any]:
    """Per-finding and summary figures of a multi-label classifier at per-finding thresholds.

    ``thresholds``: a mapping finding -> threshold (or -> a `fit_thresholds` entry), or a sequence in ``labels``
    order. ``called = apply_thresholds(p, thresholds, labels)``.

    * ``per_class[label]``: `metrics.binary_metrics` of the finding's column at its threshold: ``auc`` (ROC AUC),
      ``ap`` (average precision, sklearn's step sum), ``recall`` (sensitivity), ``specificity``, ``precision``,
      ``f1``, ``ece`` (of p_j against the finding); ``support`` (int, images with the finding) and ``prevalence``
      (support / N). ``auc`` and ``ap`` are NaN for a finding absent from the sample, or present in every image;
    * ``macro_auc`` / ``map``: mean per-finding ROC AUC / average precision over the findings where it is defined
      (the NaN ones are skipped; NaN if none is defined);
    * ``micro_auc``: ROC AUC of every image-finding pair pooled (sklearn's ``average="micro"``);
    * ``macro_f1``: mean per-finding F1 over all L findings (a finding never present nor called counts 0, as
      sklearn's ``zero_division=0``); ``micro_f1``: F1 of the pooled counts, 2 TP / (2 TP + FP + FN);
    * ``hamming_loss``: share of wrong image-finding pairs; ``subset_accuracy``: share of images with every finding
      right (the "no finding" image included);
    * ``ece``: mean per-finding ECE; ``label_cardinality``: mean findings per image in ``y``; ``n``: images.
    """
    yy, pp = _check(y, p, labels)
    thr = _threshold_vector(thresholds, labels)
    called, n = pp >= thr[None, :], yy.shape[0]
    per: dict[str, dict[str, float]] = {}
    tp = fp = fn = 0.0
    for j, label in enumerate(labels):
        b = metrics.binary_metrics(yy[:, j], pp[:, j], float(thr[j]))
        per[label] = {m: b[key] for m, key in _FROM_BINARY.items()}
        per[label].update(support=int(b["tp"] + b["fn"]), prevalence=(b["tp"] + b["fn"]) / n)
        tp, fp, fn = tp + b["tp"], fp + b["fp"], fn + b["fn"]
    table = {m: np.array([float(per[c][m]) for c in labels]) for m in ("auc", "ap", "f1", "ece")}
    wrong = yy.astype(bool) != called
    out: dict[str, Any] = {
        "macro_auc": _nanmean(table["auc"]),
        "micro_auc": metrics.roc_auc(yy.ravel(), pp.ravel()),
        "map": _nanmean(table["ap"]),
        "macro_f1": float(table["f1"].mean()),
        "micro_f1": float(metrics._div(2 * tp, 2 * tp + fp + fn)),
        "hamming_loss": float(wrong.mean()),
        "subset_accuracy": float((~wrong.any(axis=1)).mean()),
        "ece": float(table["ece"].mean()),
        "label_cardinality": float(yy.sum(axis=1).mean()),
        "n": n,
        "per_class": per,
    }
    return out


def mean_ece(y: ArrayLike, p: ArrayLike) -> float:
    """Mean over the findings of each one's ECE (p_j against y_j, `calibration.ece_of`): the report's ``ece``."""
    yy, pp = _check(y, p)
    return float(np.mean([calibration.ece_of(pp[:, j], yy[:, j].astype(float)) for j in range(pp.shape[1])]))


def evaluate_multilabel(
    y: ArrayLike,
    p: ArrayLike,
    labels: Sequence[str],
    thresholds: Thresholds,
    n_boot: int,
    seed: int,
    groups: ArrayLike | None = None,
) -> dict[str, Any]:
    """Test figures of a multi-label decision with 95 % percentile bootstrap CIs.

    Returns ``{"test": {name: {value, ci_low, ci_high}}, "report": multilabel_report(...)}``, names as
    `kclass.flatten_report` writes them (``macro_auc``, ``per_class.glaucoma.recall``, ...; the image count ``n``
    is in the report only). The thresholds stay fixed (fitted on validation) while ``n_boot`` resamples drawn
    from ``seed`` redraw the rows, or, with ``groups`` (a patient id per row), whole patients: both eyes of a
    patient enter a resample together (`kclass.bootstrap_report_ci`). A resample where a figure is undefined (a
    finding absent) is skipped for that figure; ``n_boot == 0`` gives NaN CIs.
    """
    names = list(labels)
    point = multilabel_report(y, p, names, thresholds)
    test = kclass.bootstrap_report_ci(
        multilabel_report, y, p, n_boot, seed, groups=groups, labels=names, thresholds=thresholds
    )
    test.pop("n", None)
    return {"test": test, "report": point}


def metrics_document(
    labels: Sequence[str], thresholds: Mapping[str, Mapping[str, Any]], result: Mapping[str, Any], n_val: int
) -> dict[str, Any]:
    """`reports/metrics.json` of a multi-label task (strict JSON: NaN becomes null): every test figure with its CI
    under its own name (``macro_auc``, ``macro_auc_ci_low``, ``macro_auc_ci_high``, ``per_class.<label>.auc``,
    ...), the test image count, the per-finding table and the decision: its rule in words and every finding's
    fitted threshold (``thresholds``: `fit_thresholds`'s), all from validation."""
    names = list(labels)
    test: dict[str, Any] = {}
    for name, v in result["test"].items():
        test[name], test[f"{name}_ci_low"], test[f"{name}_ci_high"] = v["value"], v["ci_low"], v["ci_high"]
    report = result["report"]
    fits = {c: dict(thresholds[c]) for c in names}
    doc: dict[str, Any] = json_safe(
        {
            "task": "multilabel",
            "classes": names,
            "decision": {"rule": decision_rule_words(fits), "thresholds": fits, "source": "validation"},
            "val": {"n": int(n_val)},
            "test": {**test, "n": int(report["n"])},
            "per_class": {c: report["per_class"][c] for c in names},
        }
    )
    return doc


# ----------------------------------------------------------------------------- calibration
def _two_columns(pj: np.ndarray) -> np.ndarray:
    """[1 - p, p]: the softmax view of one sigmoid, on which `calibration` fits and applies temperatures."""
    return np.column_stack([1.0 - pj, pj])


def fit_temperatures(y_val: ArrayLike, p_val: ArrayLike) -> np.ndarray:
    """One temperature per finding, fitted on validation: the T_j > 0 minimising the binary NLL of
    sigmoid(logit(p_j) / T_j), by `calibration.fit_temperature`'s golden-section search on log T in
    `calibration.LOG_T_BOUNDS` (T = 1 for a finding with one class only in validation, or where no T beats 1).

    T_j > 1 softens an overconfident finding, T_j < 1 sharpens an underconfident one; the calibrated model outputs
    sigmoid(z_j / T_j) (`calibration.fold_per_finding`)."""
    y, p = _check(y_val, p_val)
    return np.array([calibration.fit_temperature(y[:, j], _two_columns(p[:, j])) for j in range(p.shape[1])])


def apply_temperatures(p: ArrayLike, temperatures: ArrayLike) -> np.ndarray:
    """sigmoid(logit(p_j) / T_j) per finding (`calibration.rescale` of [1 - p_j, p_j], its clipping included)."""
    pp, t = np.asarray(p, dtype=float), np.asarray(temperatures, dtype=float)
    if pp.ndim != 2 or t.shape != (pp.shape[1],):
        raise ValueError(f"need (N, L) probabilities and L temperatures; got shapes {pp.shape} and {t.shape}")
    if not (np.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"temperatures must be finite and > 0; got {t.tolist()}")
    cols = [calibration.rescale(_two_columns(pp[:, j]), float(t[j]))[:, 1] for j in range(pp.shape[1])]
    out: np.ndarray = np.column_stack(cols) if cols else pp.copy()
    return out
