"""Tests for medclf.evaluation.kclass: every number is checked against scikit-learn or a hand computation."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from medclf.evaluation import calibration, kclass, metrics

SKIN = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
DR = ["none", "mild", "moderate", "severe", "proliferative"]


def _data(n: int = 600, k: int = 7, seed: int = 0, templates: int | None = 60) -> tuple[np.ndarray, np.ndarray]:
    """Informative but imperfect K-class probabilities. With `templates`, rows are drawn from that many distinct
    probability vectors, so every column has many tied scores across both classes (AUC tie handling)."""
    rng = np.random.default_rng(seed)
    if templates is None:
        y = rng.integers(0, k, n)
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), y] += 1.5
        p = np.exp(logits)
        return y, p / p.sum(axis=1, keepdims=True)
    table = rng.dirichlet(np.full(k, 0.7), size=templates)
    p = table[rng.integers(0, templates, n)]
    y = np.where(rng.random(n) < 0.5, p.argmax(axis=1), rng.integers(0, k, n))
    return y, p


def _ordinal(n: int = 800, k: int = 5, seed: int = 0, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Graded probabilities peaked near shrink * (true grade): shrink < 1 biases the argmax toward low grades."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centre = shrink * y + rng.normal(0, 0.6, n)
    logits = -((np.arange(k)[None, :] - centre[:, None]) ** 2) / 0.8
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _skl_specificity(y: np.ndarray, pred: np.ndarray, k: int) -> list[float]:
    cm = skm.confusion_matrix(y, pred, labels=list(range(k)))
    n = cm.sum()
    out = []
    for c in range(k):
        tn = n - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        neg = n - cm[c, :].sum()
        out.append(tn / neg if neg else 0.0)
    return out


# ----------------------------------------------------------------------------- multiclass_report
@pytest.mark.parametrize("templates", [60, None])
def test_multiclass_report_matches_sklearn(templates: int | None) -> None:
    y, p = _data(templates=templates)
    k, pred = p.shape[1], p.argmax(axis=1)
    r = kclass.multiclass_report(y, p, SKIN)
    labels = list(range(k))
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    for avg in ("macro", "weighted"):
        expected = skm.f1_score(y, pred, average=avg, labels=labels, zero_division=0)
        assert r[f"{avg}_f1"] == pytest.approx(expected, abs=1e-12)
    assert r["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred), abs=1e-12)
    ovr = skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels)
    assert r["macro_auc"] == pytest.approx(ovr, abs=1e-12)
    assert r["macro_auc"] == pytest.approx(metrics.macro_auc(y, p), abs=1e-12)
    assert r["ece"] == pytest.approx(calibration.ece(y, p), abs=1e-12)  # top-label ECE, ECE_BINS bins
    assert r["brier"] == pytest.approx(np.mean(((p - np.eye(k)[y]) ** 2).sum(axis=1)), abs=1e-12)
    legacy = metrics.multiclass_metrics(y, p, SKIN)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "mcc", "ece", "brier"):
        assert r[key] == pytest.approx(legacy[key], abs=1e-12)

    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    spec = _skl_specificity(y, pred, k)
    assert list(r["per_class"]) == SKIN
    for c, name in enumerate(SKIN):
        pc = r["per_class"][name]
        assert set(pc) == {"precision", "recall", "f1", "auc", "support", "specificity"}
        assert pc["precision"] == pytest.approx(pr[c], abs=1e-12)
        assert pc["recall"] == pytest.approx(rc[c], abs=1e-12)
        assert pc["f1"] == pytest.approx(f1[c], abs=1e-12)
        assert pc["support"] == sup[c] and isinstance(pc["support"], int)
        assert pc["specificity"] == pytest.approx(spec[c], abs=1e-12)
        assert pc["auc"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]), abs=1e-12)

    cm = skm.confusion_matrix(y, pred, labels=labels)
    assert r["confusion"]["labels"] == SKIN
    assert r["confusion"]["counts"] == cm.tolist()
    np.testing.assert_allclose(r["confusion"]["normalized"], cm / cm.sum(axis=1, keepdims=True), atol=1e-12)


def test_multiclass_report_by_hand() -> None:
    """Six rows, three classes: every figure worked out on paper."""
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array(
        [
            [0.72, 0.18, 0.10],  # pred 0, right
            [0.40, 0.55, 0.05],  # pred 1, wrong
            [0.12, 0.83, 0.05],  # pred 1, right
            [0.20, 0.25, 0.55],  # pred 2, wrong
            [0.07, 0.10, 0.83],  # pred 2, right
            [0.30, 0.25, 0.45],  # pred 2, right
        ]
    )
    r = kclass.multiclass_report(y, p, ["a", "b", "c"])
    assert r["confusion"]["counts"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert r["confusion"]["normalized"] == [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    f1 = {"a": 2 / 3, "b": 0.5, "c": 0.8}
    assert r["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert r["weighted_f1"] == pytest.approx(sum(f1.values()) / 3)  # equal supports
    assert r["mcc"] == pytest.approx(12 / math.sqrt(22 * 24))
    # class b: positives score .83 and .25 against negatives .18 .55 .10 .25 -> (4 + 2.5) / 8
    assert [r["per_class"][c]["auc"] for c in "abc"] == pytest.approx([1.0, 6.5 / 8, 7 / 8])
    assert r["macro_auc"] == pytest.approx((1.0 + 6.5 / 8 + 7 / 8) / 3)
    assert [r["per_class"][c]["precision"] for c in "abc"] == pytest.approx([1.0, 0.5, 2 / 3])
    assert [r["per_class"][c]["specificity"] for c in "abc"] == pytest.approx([1.0, 0.75, 0.75])
    assert [r["per_class"][c]["support"] for c in "abc"] == [2, 2, 2]
    # bins (0.7, 0.8]: .72 right; (0.5, 0.6]: .55 .55 both wrong; (0.8, 0.9]: .83 .83 right; (0.4, 0.5]: .45 right
    assert r["ece"] == pytest.approx((0.28 + 2 * 0.55 + 2 * 0.17 + 0.55) / 6)
    brier = sum(sum((p[i, c] - (y[i] == c)) ** 2 for c in range(3)) for i in range(6)) / 6
    assert r["brier"] == pytest.approx(brier)


def test_given_pred_drives_decisions_only() -> None:
    y, p = _data(seed=3)
    pred = np.roll(p.argmax(axis=1), 1)
    r, base = kclass.multiclass_report(y, p, SKIN, pred=pred), kclass.multiclass_report(y, p, SKIN)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert r["confusion"]["counts"] == skm.confusion_matrix(y, pred, labels=list(range(7))).tolist()
    for key in ("macro_auc", "ece", "brier"):  # properties of the probabilities, not of the call
        assert r[key] == base[key]


def test_absent_class_gives_nan_auc_and_sklearn_figures() -> None:
    y, p = _data(seed=4)
    keep = y != 3
    y, p = y[keep], p[keep]
    pred = p.argmax(axis=1)
    assert (pred == 3).any()  # predicted but never true
    r = kclass.multiclass_report(y, p, SKIN)
    assert math.isnan(r["macro_auc"]) and math.isnan(r["per_class"]["df"]["auc"])
    assert r["per_class"]["df"]["recall"] == 0.0 and r["per_class"]["df"]["support"] == 0
    assert r["confusion"]["normalized"][3] == [0.0] * 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert r["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred), abs=1e-12)
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=range(7), zero_division=0))


def test_binary_k2_is_allowed_for_multiclass() -> None:
    y, p = _data(k=2, seed=5)
    r = kclass.multiclass_report(y, p, ["neg", "pos"])
    assert r["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert r["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p.argmax(axis=1)), abs=1e-12)


# ----------------------------------------------------------------------------- ordinal_report
def test_ordinal_report_matches_sklearn() -> None:
    y, p = _ordinal()
    pred = p.argmax(axis=1)
    r = kclass.ordinal_report(y, p, DR)
    base = kclass.multiclass_report(y, p, DR)
    for key, v in base.items():  # everything of the multiclass report
        assert r[key] == v
    assert r["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic", labels=range(5)), abs=1e-12)
    assert r["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-12)  # all present
    assert r["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-12)
    assert r["within_one"] == pytest.approx(np.mean(np.abs(y - pred) <= 1), abs=1e-12)
    assert "referable" not in r


def test_ordinal_report_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array(
        [
            [0.72, 0.18, 0.10],
            [0.40, 0.55, 0.05],
            [0.12, 0.83, 0.05],
            [0.20, 0.25, 0.55],
            [0.07, 0.10, 0.83],
            [0.30, 0.25, 0.45],
        ]
    )
    r = kclass.ordinal_report(y, p, ["g0", "g1", "g2"], referable_from=1)
    # observed weighted disagreement 2; expected (row totals 2,2,2 x column totals 1,2,3 / 6) weighted: 8
    assert r["qwk"] == pytest.approx(1 - 2 / 8)
    assert r["mae"] == pytest.approx(2 / 6)
    assert r["within_one"] == 1.0
    # P(grade >= 1) = .28 .60 .88 .80 .93 .70; referable rows 2..5; called at >= 0.5: rows 1..5
    assert r["referable"] == pytest.approx(
        {"auc": 1.0, "sensitivity": 1.0, "specificity": 0.5, "f1": 8 / 9, "prevalence": 4 / 6, "threshold": 0.5}
    )
    r2 = kclass.ordinal_report(y, p, ["g0", "g1", "g2"], referable_from=2, referable_threshold=0.5)
    # P(grade 2) = .10 .05 .05 .55 .83 .45: truth rows 4, 5; called rows 3, 4
    assert r2["referable"] == pytest.approx(
        {"auc": 7 / 8, "sensitivity": 0.5, "specificity": 0.75, "f1": 0.5, "prevalence": 2 / 6, "threshold": 0.5}
    )


@pytest.mark.parametrize("referable_from, threshold", [(2, None), (2, 0.3), (1, 0.8), (4, 0.1)])
def test_referable_view_matches_sklearn(referable_from: int, threshold: float | None) -> None:
    y, p = _ordinal(seed=2)
    r = kclass.ordinal_report(y, p, DR, referable_from=referable_from, referable_threshold=threshold)["referable"]
    truth, score = y >= referable_from, p[:, referable_from:].sum(axis=1)
    call = score >= (0.5 if threshold is None else threshold)
    assert r["threshold"] == (0.5 if threshold is None else threshold)
    assert r["auc"] == pytest.approx(skm.roc_auc_score(truth, score), abs=1e-12)
    assert r["sensitivity"] == pytest.approx(skm.recall_score(truth, call), abs=1e-12)
    assert r["specificity"] == pytest.approx(skm.recall_score(~truth, ~call), abs=1e-12)
    assert r["f1"] == pytest.approx(skm.f1_score(truth, call), abs=1e-12)
    assert r["prevalence"] == pytest.approx(truth.mean(), abs=1e-12)


def test_qwk_uses_grade_distance_and_nan_when_undefined() -> None:
    # grade 2 absent: sklearn without labels would re-index grades 3, 4 as 2, 3; the grade distance keeps them
    y = np.array([0, 1, 3, 4, 4, 0, 1, 3])
    pred = np.array([0, 1, 4, 3, 4, 1, 0, 3])
    p = np.full((8, 5), 0.2)
    r = kclass.ordinal_report(y, p, DR, pred=pred)
    assert r["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic", labels=range(5)))
    same = np.full(8, 2)
    assert math.isnan(kclass.ordinal_report(same, p, DR, pred=same)["qwk"])


# ----------------------------------------------------------------------------- ordinal cut-points
def test_expected_grade_and_apply_cutpoints() -> None:
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(kclass.expected_grade(p), [0.0, 1.3, 1.5, 2.0])
    np.testing.assert_array_equal(kclass.apply_cutpoints(p, [0.5, 1.5]), [0, 1, 2, 2])  # e >= cut: the higher grade
    np.testing.assert_array_equal(kclass.apply_cutpoints(p, [1.3, 1.6]), [0, 1, 1, 2])
    assert kclass.apply_cutpoints(p, [0.5, 1.5]).dtype == np.int64


def test_cutpoints_improve_qwk_over_argmax() -> None:
    y, p = _ordinal(n=1500, seed=7, shrink=0.55)  # the argmax under-grades
    cuts = kclass.fit_ordinal_cutpoints(y, p, 5)
    assert len(cuts) == 4 and all(isinstance(c, float) for c in cuts)
    assert all(a < b for a, b in zip(cuts, cuts[1:], strict=False))

    def qwk(pred: np.ndarray) -> float:
        return float(skm.cohen_kappa_score(y, pred, weights="quadratic", labels=range(5)))

    fitted, argmax = qwk(kclass.apply_cutpoints(p, cuts)), qwk(p.argmax(axis=1))
    rounded = qwk(kclass.apply_cutpoints(p, [0.5, 1.5, 2.5, 3.5]))
    assert fitted > argmax + 0.02 and fitted >= rounded
    assert kclass.ordinal_report(y, p, DR, pred=kclass.apply_cutpoints(p, cuts))["qwk"] == pytest.approx(fitted)
    # the cut-points carry over to fresh data from the same model
    y2, p2 = _ordinal(n=1500, seed=8, shrink=0.55)
    qwk2 = skm.cohen_kappa_score(y2, kclass.apply_cutpoints(p2, cuts), weights="quadratic")
    assert qwk2 > skm.cohen_kappa_score(y2, p2.argmax(axis=1), weights="quadratic")
    # deterministic, and insensitive to the row order
    assert kclass.fit_ordinal_cutpoints(y, p, 5) == cuts
    perm = np.random.default_rng(0).permutation(y.size)
    assert kclass.fit_ordinal_cutpoints(y[perm], p[perm], 5) == pytest.approx(cuts, abs=1e-12)


def test_cutpoints_are_a_coordinate_optimum() -> None:
    """No single cut can move to another candidate (midpoint) for a strictly higher validation QWK."""
    y, p = _ordinal(n=300, k=4, seed=11, shrink=0.7)
    cuts = kclass.fit_ordinal_cutpoints(y, p, 4)
    e = np.unique(kclass.expected_grade(p))
    mids = (e[:-1] + e[1:]) / 2

    def qwk(c: list[float]) -> float:
        return float(skm.cohen_kappa_score(y, kclass.apply_cutpoints(p, c), weights="quadratic", labels=range(4)))

    best = qwk(cuts)
    for j in range(3):
        lo, hi = (cuts[j - 1] if j else -1.0), (cuts[j + 1] if j < 2 else 4.0)
        for m in mids[(mids > lo) & (mids < hi)]:
            trial = list(cuts)
            trial[j] = float(m)
            assert qwk(trial) <= best + 1e-9


# ----------------------------------------------------------------------------- per-class thresholds
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_class_threshold_is_highest_meeting_target(target: float) -> None:
    rng = np.random.default_rng(int(target * 100))
    is_mel = rng.random(400) < 0.2
    p = np.round(np.clip(0.3 * is_mel + 0.7 * rng.random(400), 0, 1), 2)  # rounding: tied scores
    fit = kclass.fit_class_threshold(is_mel, p, target)
    t = fit["threshold"]

    def sens(thr: float) -> float:
        return float(np.mean(p[is_mel] >= thr))

    assert fit["val_sensitivity"] == pytest.approx(sens(t)) and sens(t) >= target
    assert sens(np.nextafter(t, 2.0)) < target  # any higher threshold misses the target
    feasible = [v for v in np.unique(p) if sens(v) >= target]
    assert t == max(feasible)
    assert fit["val_specificity"] == pytest.approx(np.mean(p[~is_mel] < t))
    assert fit["n_positive"] == int(is_mel.sum())
    flags = kclass.flag_critical(np.column_stack([1 - p, p]), 1, t)
    np.testing.assert_array_equal(flags, p >= t)


def test_class_threshold_ties_all_called_positive() -> None:
    is_c = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    p = np.array([0.9, 0.6, 0.6, 0.2, 0.6, 0.3, 0.1, 0.1, 0.0, 0.6])
    fit = kclass.fit_class_threshold(is_c, p, 0.5)  # 2 of 4 needed: the 2nd score is 0.6, tied with a third
    assert fit == {"threshold": 0.6, "val_sensitivity": 0.75, "val_specificity": 4 / 6, "n_positive": 4}
    # a target of 0.7 needs 3 of 4 (float 0.7 * 4 = 2.8): still 0.6
    assert kclass.fit_class_threshold(is_c, p, 0.7)["threshold"] == 0.6
    assert kclass.fit_class_threshold(is_c, p, 0.75)["threshold"] == 0.6
    assert kclass.fit_class_threshold(is_c, p, 0.76)["threshold"] == 0.2


def test_class_threshold_exact_fraction_targets() -> None:
    """target * n_pos lands on an integer in decimal but not in binary (0.9 * 10, 0.7 * 10): no extra row."""
    is_c = np.ones(10, dtype=bool)
    p = np.linspace(0.05, 0.95, 10)
    assert kclass.fit_class_threshold(is_c, p, 0.9)["threshold"] == pytest.approx(p[1])
    assert kclass.fit_class_threshold(is_c, p, 0.7)["threshold"] == pytest.approx(p[3])
    assert kclass.fit_class_threshold(is_c, p, 0.3)["threshold"] == pytest.approx(p[7])
    assert kclass.fit_class_threshold(is_c, p, 0.3)["val_specificity"] == 0.0  # no negatives: zero-division 0


# ----------------------------------------------------------------------------- bootstrap
def _assert_same_ci(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], skip: str = "\0") -> None:
    assert a.keys() == b.keys()
    for name in a:
        if skip in name:
            continue
        for part in ("value", "ci_low", "ci_high"):
            assert a[name][part] == pytest.approx(b[name][part], abs=1e-12, nan_ok=True), (name, part)


def test_bootstrap_names_values_and_reproducibility() -> None:
    y, p = _ordinal(n=400, seed=3)
    kw: dict[str, Any] = {"classes": DR, "referable_from": 2}
    ci = kclass.bootstrap_report_ci(kclass.ordinal_report, y, p, 100, seed=5, **kw)
    report = kclass.ordinal_report(y, p, **kw)
    flat = kclass.flatten_report(report)
    assert list(ci) == list(flat)
    expected = {*kclass.SUMMARY, *kclass.ORDINAL}
    expected |= {f"per_class.{c}.{m}" for c in DR for m in kclass.PER_CLASS}
    expected |= {f"referable.{m}" for m in ("auc", "sensitivity", "specificity", "f1", "prevalence")}
    assert set(ci) == expected  # the referable threshold is fixed: no CI
    for name, v in ci.items():
        assert v["value"] == flat[name]
        assert v["ci_low"] <= v["ci_high"]
        assert v["ci_low"] - 1e-9 <= v["value"] <= v["ci_high"] + 1e-9 or name.endswith("support"), name
    assert ci["per_class.moderate.support"]["value"] == report["per_class"]["moderate"]["support"]
    again = kclass.bootstrap_report_ci(kclass.ordinal_report, y, p, 100, seed=5, **kw)
    assert again == ci
    other = kclass.bootstrap_report_ci(kclass.ordinal_report, y, p, 100, seed=6, **kw)
    assert other["qwk"]["ci_low"] != ci["qwk"]["ci_low"]
    none = kclass.bootstrap_report_ci(kclass.ordinal_report, y, p, 0, seed=5, **kw)
    assert all(math.isnan(v["ci_low"]) and math.isnan(v["ci_high"]) for v in none.values())
    assert none["qwk"]["value"] == report["qwk"]


def test_bootstrap_draws_as_metrics_bootstrap() -> None:
    """The row bootstrap uses the resamples of `metrics.bootstrap` for the same seed (one draw convention)."""
    y, p = _data(n=300, seed=9)
    ci = kclass.bootstrap_report_ci(kclass.multiclass_report, y, p, 80, seed=3, classes=SKIN)
    ref = metrics.bootstrap(
        lambda i: {
            "accuracy": float(np.mean(p[i].argmax(axis=1) == y[i])),
            "mcc": kclass.multiclass_report(y[i], p[i], SKIN)["mcc"],
        },
        y.size,
        80,
        3,
    )
    assert (ci["accuracy"]["ci_low"], ci["accuracy"]["ci_high"]) == pytest.approx(ref["accuracy"], abs=1e-12)
    assert (ci["mcc"]["ci_low"], ci["mcc"]["ci_high"]) == pytest.approx(ref["mcc"], abs=1e-12)


@pytest.mark.parametrize("grouped", [False, True])
def test_vectorised_bootstrap_equals_per_resample_calls(grouped: bool) -> None:
    """The fast path for the module's reports gives what calling the report on every resample gives."""
    y, p = _ordinal(n=300, seed=4)
    groups = np.arange(y.size) // 3 if grouped else None
    pred = kclass.apply_cutpoints(p, [0.4, 1.4, 2.6, 3.5])
    kw: dict[str, Any] = {"classes": DR, "pred": pred, "referable_from": 2, "referable_threshold": 0.4}
    fast = kclass.bootstrap_report_ci(kclass.ordinal_report, y, p, 60, seed=1, groups=groups, **kw)
    slow = kclass.bootstrap_report_ci(
        lambda *a, **k: kclass.ordinal_report(*a, **k), y, p, 60, seed=1, groups=groups, **kw
    )
    _assert_same_ci(fast, slow)
    fast_mc = kclass.bootstrap_report_ci(kclass.multiclass_report, y, p, 40, seed=2, groups=groups, classes=DR)
    slow_mc = kclass.bootstrap_report_ci(
        lambda *a, **k: kclass.multiclass_report(*a, **k), y, p, 40, seed=2, groups=groups, classes=DR
    )
    _assert_same_ci(fast_mc, slow_mc)


def test_cluster_bootstrap_keeps_groups_together() -> None:
    """Every resample holds each group with all of its rows, the same number of times."""
    y, p = _data(n=120, seed=2)
    groups = np.repeat(np.arange(40), 3)[np.random.default_rng(0).permutation(120)]
    seen: list[np.ndarray] = []

    def spy(yy: np.ndarray, pp: np.ndarray, classes: list[str], pred: np.ndarray) -> dict[str, Any]:
        seen.append(np.bincount(pred, minlength=120))  # pred carries the row ids
        return {"n": float(len(pred))}

    ci = kclass.bootstrap_report_ci(spy, y, p, 30, seed=0, groups=groups, classes=SKIN, pred=np.arange(120))
    assert len(seen) == 31  # the point estimate, then 30 resamples
    for counts in seen[1:]:
        for g in range(40):
            assert np.unique(counts[groups == g]).size == 1  # a group's rows share one multiplicity
        assert counts.sum() == 120  # 40 groups drawn, 3 rows each
    assert ci["n"] == {"value": 120.0, "ci_low": 120.0, "ci_high": 120.0}


def test_cluster_bootstrap_of_duplicated_rows_is_the_row_bootstrap() -> None:
    """Each row duplicated as one group of two: the cluster bootstrap sees the original sample (same resamples, same
    CIs; supports doubled), while the row bootstrap treats the copies as independent and narrows every CI."""
    y, p = _ordinal(n=300, seed=6)
    y2, p2, groups = np.repeat(y, 2), np.repeat(p, 2, axis=0), np.repeat(np.arange(300), 2)
    kw: dict[str, Any] = {"classes": DR, "referable_from": 3}
    rows = kclass.bootstrap_report_ci(kclass.ordinal_report, y, p, 200, seed=4, **kw)
    clustered = kclass.bootstrap_report_ci(kclass.ordinal_report, y2, p2, 200, seed=4, groups=groups, **kw)
    naive = kclass.bootstrap_report_ci(kclass.ordinal_report, y2, p2, 200, seed=4, **kw)
    _assert_same_ci(rows, clustered, skip=".support")
    for c in DR:
        name = f"per_class.{c}.support"
        assert [clustered[name][k] for k in ("value", "ci_low", "ci_high")] == [
            2 * rows[name][k] for k in ("value", "ci_low", "ci_high")
        ]
    ratios = [
        (naive[n]["ci_high"] - naive[n]["ci_low"]) / (clustered[n]["ci_high"] - clustered[n]["ci_low"])
        for n in ("accuracy", "macro_f1", "macro_auc", "qwk", "mae", "brier", "referable.auc")
    ]
    assert max(ratios) < 0.9 and np.median(ratios) < 0.8  # ~1/sqrt(2)
    # one row per group is the row bootstrap itself
    _assert_same_ci(rows, kclass.bootstrap_report_ci(kclass.ordinal_report, y, p, 200, 4, groups=np.arange(300), **kw))


def test_bootstrap_skips_nan_resamples() -> None:
    """A rare class is missing from some resamples (its AUC NaN there): those resamples are left out of the CI."""
    y, p = _data(n=60, seed=1)
    y[y == 3] = 0
    y[:2] = 3  # two rows of "df": about one resample in eight misses both
    ci = kclass.bootstrap_report_ci(kclass.multiclass_report, y, p, 200, seed=0, classes=SKIN)
    seen: list[float] = []

    def record(yy: np.ndarray, pp: np.ndarray, classes: list[str]) -> dict[str, Any]:
        r = kclass.multiclass_report(yy, pp, classes)
        seen.append(r["per_class"]["df"]["auc"])
        return r

    kclass.bootstrap_report_ci(record, y, p, 200, seed=0, classes=SKIN)
    aucs = np.array(seen[1:])
    assert 0 < np.isnan(aucs).sum() < 200
    finite = aucs[~np.isnan(aucs)]
    expected = (np.quantile(finite, 0.025), np.quantile(finite, 0.975))
    assert (ci["per_class.df.auc"]["ci_low"], ci["per_class.df.auc"]["ci_high"]) == pytest.approx(expected, abs=1e-12)
    assert math.isfinite(ci["macro_auc"]["ci_low"]) and math.isfinite(ci["macro_auc"]["ci_high"])


def test_bootstrap_is_fast() -> None:
    y, p = _data(n=1000, k=7, seed=0, templates=None)
    t0 = time.perf_counter()
    kclass.bootstrap_report_ci(kclass.multiclass_report, y, p, 200, seed=0, classes=SKIN)
    yo, po = _ordinal(n=1000, seed=0)
    kclass.bootstrap_report_ci(
        kclass.ordinal_report, yo, po, 200, seed=0, groups=np.arange(1000) // 4, classes=DR, referable_from=2
    )
    assert time.perf_counter() - t0 < 10.0


# ----------------------------------------------------------------------------- bad input
def _bad_cases() -> list[tuple[str, Any, str]]:
    y, p = _data(n=20, seed=0)
    off = p.copy()
    off[3] *= 1.002
    nan = p.copy()
    nan[0, 0] = np.nan
    yo, po = _ordinal(n=20, k=5, seed=0)
    mc, od = kclass.multiclass_report, kclass.ordinal_report
    return [
        ("proba 1-D", lambda: mc(y, p[:, 0], SKIN), r"\(N, K\).*shape \(20,\)"),
        ("proba 3-D", lambda: mc(y, p[:, :, None], SKIN), r"\(N, K\)"),
        ("proba empty", lambda: mc(y[:0], p[:0], SKIN), "non-empty"),
        ("y too short", lambda: mc(y[:-1], p, SKIN), r"y must be a 1-D array with one entry per proba row \(20\)"),
        ("y 2-D", lambda: mc(y[:, None], p, SKIN), "y must be a 1-D array"),
        ("label too high", lambda: mc(np.r_[y[:-1], 7], p, SKIN), r"y must lie in \[0, 7\).*\[7\]"),
        ("label negative", lambda: mc(np.r_[y[:-1], -1], p, SKIN), r"y must lie in \[0, 7\).*\[-1\]"),
        ("label non-integer", lambda: mc(y + 0.5, p, SKIN), "integer class indices"),
        ("label strings", lambda: mc(y.astype(str), p, SKIN), "integer class indices"),
        ("pred out of range", lambda: mc(y, p, SKIN, pred=np.full(20, 9)), r"pred must lie in \[0, 7\)"),
        ("pred length", lambda: mc(y, p, SKIN, pred=y[:5]), "pred must be a 1-D array"),
        ("row sum", lambda: mc(y, off, SKIN), r"rows must sum to 1 within 0\.001.*row 3"),
        ("nan proba", lambda: mc(y, nan, SKIN), r"finite probabilities within \[0, 1\]"),
        ("negative proba", lambda: mc(y, p - 0.5, SKIN), r"within \[0, 1\]"),
        ("class names count", lambda: mc(y, p, SKIN[:-1]), "6 class names for 7 proba columns"),
        ("class names repeated", lambda: mc(y, p, [*SKIN[:-1], "nv"]), "distinct"),
        ("one class", lambda: mc(np.zeros(3, int), np.ones((3, 1)), ["a"]), "K >= 2"),
        ("ordinal K=2", lambda: od(y % 2, np.column_stack([p[:, 0], 1 - p[:, 0]]), ["a", "b"]), "ordinal.*K >= 3"),
        ("referable 0", lambda: od(yo, po, DR, referable_from=0), r"referable_from .* \[1, 4\]"),
        ("referable K", lambda: od(yo, po, DR, referable_from=5), r"referable_from .* \[1, 4\]"),
        ("referable str", lambda: od(yo, po, DR, referable_from="moderate"), "grade index"),
        ("threshold alone", lambda: od(yo, po, DR, referable_threshold=0.3), "without referable_from"),
        ("threshold range", lambda: od(yo, po, DR, referable_from=2, referable_threshold=1.5), r"within \[0, 1\]"),
        ("cuts k", lambda: kclass.fit_ordinal_cutpoints(yo, po, 4), "k = 4 classes, but proba_val has 5"),
        ("cuts K=2", lambda: kclass.fit_ordinal_cutpoints(y % 2, np.full((20, 2), 0.5), 2), "K >= 3"),
        ("cuts labels", lambda: kclass.fit_ordinal_cutpoints(yo + 1, po, 5), r"y_val must lie in \[0, 5\)"),
        ("apply order", lambda: kclass.apply_cutpoints(po, [0.5, 2.5, 1.5, 3.5]), "strictly increasing"),
        ("apply count", lambda: kclass.apply_cutpoints(po, [0.5, 1.5]), "4 finite, strictly increasing"),
        ("target 0", lambda: kclass.fit_class_threshold(y == 4, p[:, 4], 0.0), r"target_sensitivity .* \(0, 1\]"),
        ("target >1", lambda: kclass.fit_class_threshold(y == 4, p[:, 4], 1.1), r"target_sensitivity .* \(0, 1\]"),
        ("no positives", lambda: kclass.fit_class_threshold(y == 99, p[:, 4], 0.9), "no positive row"),
        ("threshold shapes", lambda: kclass.fit_class_threshold(y == 4, p[:5, 4], 0.9), "equal-length"),
        ("threshold labels", lambda: kclass.fit_class_threshold(y, p[:, 4], 0.9), "boolean"),
        ("threshold proba", lambda: kclass.fit_class_threshold(y == 4, p[:, 4] + 1, 0.9), r"within \[0, 1\]"),
        ("flag index", lambda: kclass.flag_critical(p, 7, 0.5), r"class_index must lie in \[0, 7\)"),
        ("groups length", lambda: kclass.bootstrap_report_ci(mc, y, p, 5, 0, groups=y[:3], classes=SKIN), "groups"),
        ("n_boot", lambda: kclass.bootstrap_report_ci(mc, y, p, -1, 0, classes=SKIN), "n >= 0"),
        ("alpha", lambda: kclass.bootstrap_report_ci(mc, y, p, 5, 0, alpha=1.0, classes=SKIN), "alpha"),
        ("boot input", lambda: kclass.bootstrap_report_ci(mc, y, off, 5, 0, classes=SKIN), "sum to 1"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_value_error(case: tuple[str, Any, str]) -> None:
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call()


def test_row_sum_tolerance_and_integer_valued_floats_accepted() -> None:
    y, p = _data(n=20, seed=0)
    q = p.copy()
    q[3] *= 1.0005
    q[3] = np.clip(q[3], 0, 1)
    assert kclass.multiclass_report(y, q, SKIN)["accuracy"] == kclass.multiclass_report(y, p, SKIN)["accuracy"]
    assert kclass.multiclass_report(y.astype(float), p, SKIN) == kclass.multiclass_report(y, p, SKIN)
