"""Tests for medclf.evaluation.metrics: every number is checked against scikit-learn or a hand computation."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning

from medclf.evaluation import metrics
from medclf.evaluation.gates import evaluate_gates


def _data(n: int = 1000, seed: int = 1, decimals: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """Informative but imperfect scores; rounding creates tied scores on purpose."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    return y, (np.round(p, decimals) if decimals is not None else p)


# ----------------------------------------------------------------------------- binary metrics
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.71, 1.0])
def test_binary_metrics_match_sklearn(threshold: float) -> None:
    y, p = _data()
    pred = (p >= threshold).astype(int)
    m = metrics.binary_metrics(y, p, threshold)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "accuracy": skm.accuracy_score(y, pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
            "precision": skm.precision_score(y, pred, zero_division=0),
            "recall": skm.recall_score(y, pred, zero_division=0),
            "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=0),
            "npv": skm.precision_score(y, pred, pos_label=0, zero_division=0),  # the negative class's precision
            "f1": skm.f1_score(y, pred, zero_division=0),
            "roc_auc": skm.roc_auc_score(y, p),
            "pr_auc": skm.average_precision_score(y, p),
            "mcc": skm.matthews_corrcoef(y, pred),
            "brier": skm.brier_score_loss(y, p),
        }
    for key, want in expected.items():
        assert m[key] == pytest.approx(want, abs=1e-12), key
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert all(isinstance(m[k], int) for k in metrics.COUNTS)
    assert set(m) == set(metrics.BINARY_SCORES) | set(metrics.COUNTS)


def test_positive_call_is_inclusive_at_threshold() -> None:
    m = metrics.binary_metrics(np.array([1, 0]), np.array([0.5, 0.4999]), 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 0, 1, 0)


def test_ece_hand_computed() -> None:
    # bin (0, .1]: mean p .05 vs 1/2 positive -> .45 * 2/8; bin (.7, .8]: .75 vs 3/4 -> 0;
    # bin (.9, 1]: .95 vs 0 positive -> .95 * 2/8.  ECE = (.9 + 1.9) / 8 = .35
    y = np.array([0, 1, 1, 1, 1, 0, 0, 0])
    p = np.array([0.05, 0.05, 0.75, 0.75, 0.75, 0.75, 0.95, 0.95])
    assert metrics.binary_metrics(y, p, 0.5)["ece"] == pytest.approx(0.35, abs=1e-12)


def test_ece_perfectly_calibrated_is_zero_and_edges_follow_sklearn() -> None:
    # 0.3 falls in (0.2, 0.3] like sklearn's calibration_curve; with 3 of 10 positive it is calibrated.
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert metrics.binary_metrics(y, np.full(10, 0.3), 0.5)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_degenerate_single_class_gives_nan_aucs_and_zero_division_zero() -> None:
    y = np.zeros(6, dtype=int)
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.2, 0.1])
    m = metrics.binary_metrics(y, p, 0.5)  # must not raise
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["mcc"] == 0.0
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == skm.balanced_accuracy_score(y, (p >= 0.5).astype(int))


@pytest.mark.parametrize(
    "y, p", [([0, 2], [0.1, 0.2]), ([0, 1], [0.1, 1.2]), ([0, 1], [0.1]), ([], []), ([0, 1], [0.1, np.nan])]
)
def test_binary_metrics_rejects_bad_input(y: list[int], p: list[float]) -> None:
    with pytest.raises(ValueError):
        metrics.binary_metrics(np.array(y), np.array(p), 0.5)


# ----------------------------------------------------------------------------- multiclass
def _mc_data(n: int = 400, k: int = 3, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def test_multiclass_metrics_match_sklearn() -> None:
    y, proba = _mc_data()
    names = ["normal", "pneumonia", "covid"]
    m = metrics.multiclass_metrics(y, proba, names)
    pred = proba.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_precision"] == pytest.approx(skm.precision_score(y, pred, average=avg))
        assert m[f"{avg}_recall"] == pytest.approx(skm.recall_score(y, pred, average=avg))
        assert m[f"{avg}_f1"] == pytest.approx(skm.f1_score(y, pred, average=avg))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, proba, labels=[0, 1, 2]))
    f1s = skm.f1_score(y, pred, average=None)
    for c, name in enumerate(names):
        assert m["per_class"][name]["f1"] == pytest.approx(f1s[c])
        assert m["per_class"][name]["support"] == int((y == c).sum())
    assert m["per_class"]["covid"]["recall"] == pytest.approx(skm.recall_score(y, pred, average=None)[2])


def test_multiclass_ece_hand_computed_and_missing_class_auc_nan() -> None:
    # max probs .9 (right), .9 (wrong), .6, .6 (both right): bins give |.9-.5|*2/4 + |.6-1|*2/4 = .4
    proba = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.2, 0.6, 0.2]])
    y = np.array([0, 1, 1, 1])  # class 2 never occurs
    m = metrics.multiclass_metrics(y, proba, ["a", "b", "c"])
    assert m["ece"] == pytest.approx(0.4, abs=1e-12)
    assert math.isnan(m["roc_auc"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_confusion_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    t, q = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    np.testing.assert_array_equal(metrics.confusion(t, q, 4), skm.confusion_matrix(t, q, labels=range(4)))
    np.testing.assert_array_equal(metrics.confusion(np.array([0]), np.array([0]), 3), np.diag([1, 0, 0]))
    with pytest.raises(ValueError):
        metrics.confusion(np.array([0, 3]), np.array([0, 1]), 3)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_deterministic_and_contains_estimate() -> None:
    y, p = _data(n=300, seed=4)

    def auc(a: np.ndarray, b: np.ndarray) -> float:
        return float(skm.roc_auc_score(a, b))

    ci = metrics.bootstrap_ci(auc, y, p, n=100, seed=7)
    assert ci == metrics.bootstrap_ci(auc, y, p, n=100, seed=7)
    assert ci != metrics.bootstrap_ci(auc, y, p, n=100, seed=8)
    assert ci[0] < skm.roc_auc_score(y, p) < ci[1]
    assert metrics.bootstrap_ci(auc, y, p, n=0, seed=7) == (pytest.approx(math.nan, nan_ok=True),) * 2


def test_bootstrap_ci_skips_nan_resamples() -> None:
    y = np.array([1] + [0] * 9)  # many resamples lack the single positive -> AUC undefined
    p = np.linspace(0.9, 0.0, 10)
    calls: list[float] = []

    def auc(a: np.ndarray, b: np.ndarray) -> float:
        assert a.shape == b.shape == (10,)  # each resample has the original size
        v = skm.roc_auc_score(a, b) if 0 < a.sum() < a.size else math.nan
        calls.append(v)
        return v

    lo, hi = metrics.bootstrap_ci(auc, y, p, n=100, seed=0)
    assert any(math.isnan(v) for v in calls) and lo == hi == 1.0
    assert all(map(math.isnan, metrics.bootstrap_ci(lambda a, b: math.nan, y, p, n=20, seed=0)))


def test_metrics_with_ci_equals_per_resample_sklearn() -> None:
    """The vectorised bootstrap must reproduce the naive one on the same seeded resamples."""
    y, p = _data(n=300, seed=5)
    thr = 0.5
    out = metrics.metrics_with_ci(y, p, thr, n_boot=60, seed=11)
    naive = {
        "roc_auc": lambda a, b: skm.roc_auc_score(a, b),
        "pr_auc": lambda a, b: skm.average_precision_score(a, b),
        "f1": lambda a, b: skm.f1_score(a, b >= thr, zero_division=0),
        "mcc": lambda a, b: skm.matthews_corrcoef(a, b >= thr),
        "brier": lambda a, b: skm.brier_score_loss(a, b),
        "balanced_accuracy": lambda a, b: skm.balanced_accuracy_score(a, b >= thr),
        "ece": lambda a, b: metrics.binary_metrics(a, b, thr)["ece"],
    }
    for key, fn in naive.items():
        lo, hi = metrics.bootstrap_ci(fn, y, p, n=60, seed=11)
        assert out[key]["ci_low"] == pytest.approx(lo, abs=1e-12), key
        assert out[key]["ci_high"] == pytest.approx(hi, abs=1e-12), key


def test_metrics_with_ci_contains_point_estimate_and_is_fast() -> None:
    y, p = _data(n=1000, seed=6, decimals=None)
    start = time.perf_counter()
    out = metrics.metrics_with_ci(y, p, 0.5, n_boot=500, seed=0)
    assert time.perf_counter() - start < 5.0
    assert set(out) == set(metrics.BINARY_SCORES)
    point = metrics.binary_metrics(y, p, 0.5)
    for key, d in out.items():
        assert d["value"] == point[key]
        assert d["ci_low"] <= d["value"] <= d["ci_high"], key
    assert out == metrics.metrics_with_ci(y, p, 0.5, n_boot=500, seed=0)
    none = metrics.metrics_with_ci(y, p, 0.5, n_boot=0, seed=0)
    assert math.isnan(none["f1"]["ci_low"]) and none["f1"]["value"] == point["f1"]


# ----------------------------------------------------------------------------- thresholds
# Scores high -> low with labels 1,1,1,0,1,0,0,1,0,0 (5 positives, 5 negatives).
Y_A = np.array([1, 1, 1, 0, 1, 0, 0, 1, 0, 0])
P_A = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    "target, thr, sens, spec",
    [
        (0.9, 0.3, 1.0, 0.4),  # needs all 5 positives: lowest positive score
        (0.8, 0.6, 0.8, 0.8),  # 4 positives reached at 0.6 (one negative at 0.7 above it)
        (0.6, 0.8, 0.6, 1.0),  # 3 positives reached at 0.8, no false positive yet
        (1.0, 0.3, 1.0, 0.4),
    ],
)
def test_target_sensitivity_picks_highest_qualifying_threshold(target, thr, sens, spec) -> None:
    r = metrics.choose_threshold(Y_A[::-1], P_A[::-1], "target_sensitivity", target)  # input order irrelevant
    assert r["threshold"] == thr and r["rule"] == "target_sensitivity"
    assert r["val_sensitivity"] == pytest.approx(sens) and r["val_specificity"] == pytest.approx(spec)
    m = metrics.binary_metrics(Y_A, P_A, r["threshold"])
    assert m["recall"] == pytest.approx(r["val_sensitivity"]) and m["f1"] == pytest.approx(r["val_f1"])


def test_max_f1_and_youden_on_hand_example() -> None:
    # A: F1 per threshold .333 .571 .75 .667 .8 .727 .667 .769 .714 .667 -> max at 0.6.
    # Youden J ties at 0.8 and 0.6 (0.6 each); ties go to the lower threshold.
    assert metrics.choose_threshold(Y_A, P_A, "max_f1")["threshold"] == 0.6
    assert metrics.choose_threshold(Y_A, P_A, "max_f1")["val_f1"] == pytest.approx(0.8)
    assert metrics.choose_threshold(Y_A, P_A, "youden")["threshold"] == 0.6
    # B: labels 1,1,1,1,0,0,1,1,0,0. J max = 4/6 at 0.6; F1 max = 12/14 at 0.3.
    y_b = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    p_b = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1])
    yd = metrics.choose_threshold(y_b, p_b, "youden")
    assert (yd["threshold"], yd["val_specificity"]) == (0.6, 1.0)
    assert yd["val_sensitivity"] == pytest.approx(4 / 6)
    f1 = metrics.choose_threshold(y_b, p_b, "max_f1")
    assert (f1["threshold"], f1["val_sensitivity"]) == (0.3, 1.0)
    assert f1["val_f1"] == pytest.approx(12 / 14)


def test_threshold_with_tied_scores_calls_all_ties_positive() -> None:
    r = metrics.choose_threshold(np.array([1, 0, 1, 0]), np.array([0.8, 0.5, 0.5, 0.2]), "target_sensitivity", 1.0)
    assert r["threshold"] == 0.5 and r["val_sensitivity"] == 1.0 and r["val_specificity"] == 0.5


def test_target_sensitivity_matches_brute_force() -> None:
    y, p = _data(n=300, seed=9)
    r = metrics.choose_threshold(y, p, "target_sensitivity", 0.85)
    sens = {t: metrics.binary_metrics(y, p, t)["recall"] for t in np.unique(p)}
    assert r["threshold"] == max(t for t, s in sens.items() if s >= 0.85)
    assert r["val_sensitivity"] >= 0.85


def test_choose_threshold_rejects_single_class_and_unknown_rule() -> None:
    with pytest.raises(ValueError):
        metrics.choose_threshold(np.zeros(4, dtype=int), np.linspace(0, 1, 4), "youden")
    with pytest.raises(ValueError):
        metrics.choose_threshold(Y_A, P_A, "bogus")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- plot points
def test_calibration_points_match_sklearn_including_bin_edges() -> None:
    y, p = _data(n=500, seed=10, decimals=1)  # many scores exactly on bin edges
    pts = metrics.calibration_curve_points(y, p)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose([d["fraction_positive"] for d in pts], frac)
    np.testing.assert_allclose([d["mean_predicted"] for d in pts], mean)
    assert sum(d["count"] for d in pts) == 500


def test_roc_and_pr_points_downsampled_json_safe() -> None:
    y, p = _data(n=5000, seed=12, decimals=None)
    roc, pr = metrics.roc_points(y, p), metrics.pr_points(y, p)
    assert 2 < len(roc) <= 200 and 2 < len(pr) <= 200
    assert (roc[0]["fpr"], roc[0]["tpr"]) == (0.0, 0.0) and (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    assert pr[0]["recall"] == 0.0 and pr[-1]["recall"] == 1.0
    assert np.all(np.diff([d["recall"] for d in pr]) >= 0)
    json.dumps({"roc": roc, "pr": pr}, allow_nan=False)  # no inf/nan in DVC plot files
    small_y, small_p = _data(n=50, seed=13)
    fpr, tpr, _ = skm.roc_curve(small_y, small_p)
    assert [(d["fpr"], d["tpr"]) for d in metrics.roc_points(small_y, small_p)] == list(zip(fpr, tpr, strict=True))
    assert metrics.roc_points(np.zeros(5, dtype=int), np.linspace(0, 1, 5)) == []


# ----------------------------------------------------------------------------- gates
GATES = {"min_f1": 0.7, "min_recall": 0.8, "min_auc": None, "min_specificity": None, "non_inferiority_margin": 0.02}


def test_gates_pass_exactly_at_boundary() -> None:
    r = evaluate_gates({"f1": 0.7, "recall": 0.8, "roc_auc": 0.9}, GATES, None)
    assert r["passed"] and r["failures"] == []
    assert [g["name"] for g in r["gates"]] == ["min_f1", "min_recall"]  # None gates are skipped
    assert r["gates"][0] == {"name": "min_f1", "metric": "f1", "value": 0.7, "bound": 0.7, "op": ">=", "passed": True}
    assert r["non_inferiority"] == {"skipped": True, "note": "no champion registered"}


def test_gates_fail_just_below_boundary() -> None:
    r = evaluate_gates({"f1": float(np.nextafter(0.7, 0)), "recall": 0.8}, GATES, None)
    assert not r["passed"] and [g["passed"] for g in r["gates"]] == [False, True]
    # 3 decimals would print "0.700 < 0.700"; the message shows full precision instead
    assert r["failures"] == ["f1 0.6999999999999998 < min_f1 0.7"]


def test_gate_failure_message_and_nan_fails() -> None:
    r = evaluate_gates(
        {"f1": 0.612, "recall": 0.9, "roc_auc": math.nan}, {**GATES, "min_auc": 0.8, "min_specificity": 0.5}, None
    )
    assert "f1 0.612 < min_f1 0.700" in r["failures"]
    auc = next(g for g in r["gates"] if g["name"] == "min_auc")
    assert not auc["passed"]
    spec = next(g for g in r["gates"] if g["name"] == "min_specificity")  # missing metric fails too
    assert not spec["passed"] and not r["passed"] and len(r["failures"]) == 3


def test_non_inferiority_against_champion() -> None:
    champ = {"f1": 0.75, "recall": 0.85}
    ok = evaluate_gates({"f1": 0.74, "recall": 0.85 - 0.02}, GATES, champ)  # within margin / at bound
    assert ok["passed"] and not ok["non_inferiority"]["skipped"]
    assert [e["metric"] for e in ok["non_inferiority"]["entries"]] == ["f1", "recall"]
    assert all(e["passed"] for e in ok["non_inferiority"]["entries"])
    bad = evaluate_gates({"f1": 0.72, "recall": 0.9}, GATES, champ)  # f1 dropped 0.03 > 0.02
    assert not bad["passed"]
    assert [e["passed"] for e in bad["non_inferiority"]["entries"]] == [False, True]
    assert len(bad["failures"]) == 1 and "non-inferiority" in bad["failures"][0]


def test_gates_accept_pydantic_settings() -> None:
    config = pytest.importorskip("medclf.config")
    g = config.Gates(min_f1=0.7, min_recall=0.8, non_inferiority_margin=0.02)
    assert evaluate_gates({"f1": 0.7, "recall": 0.8}, g, None)["passed"]


# ----------------------------------------------------------------------------- issue 15: mutation survivors
# Each test below kills mutants that `make mutate` found surviving (docs/TESTING.md, "Mutation score").
def test_bad_input_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="equal-length, non-empty 1-D"):
        metrics.binary_metrics(np.array([[0, 1]]), np.array([[0.1, 0.2]]), 0.5)  # 2-D, though shapes agree
    with pytest.raises(ValueError, match=r"^y_true must contain only 0/1 labels$"):
        metrics.binary_metrics(np.array([0, 2]), np.array([0.1, 0.2]), 0.5)
    with pytest.raises(ValueError, match=r"^probabilities must be finite and within \[0, 1\]$"):
        metrics.binary_metrics(np.array([0, 1]), np.array([0.1, 1.2]), 0.5)
    for n, alpha in ((-1, 0.05), (10, 0.0), (10, 1.0), (10, 1.5)):
        with pytest.raises(ValueError, match="need n >= 0 resamples and alpha in"):
            metrics.metrics_with_ci(np.array([0, 1]), np.array([0.1, 0.9]), 0.5, n, 0, alpha)
        with pytest.raises(ValueError, match="need n >= 0"):
            metrics.bootstrap_ci(lambda a, b: 0.0, np.array([0, 1]), np.array([0.1, 0.9]), n, 0, alpha)


def test_float32_scores_are_compared_at_their_float64_value() -> None:
    # float32(0.7) is 0.69999998...: below a 0.7 threshold. Compared in float32 it would count as positive.
    p32 = np.array([0.7, 0.2, 0.9], dtype=np.float32)
    y = np.array([1, 0, 1])
    assert metrics.binary_metrics(y, p32, 0.7) == metrics.binary_metrics(y, p32.astype(np.float64), 0.7)
    assert metrics.binary_metrics(y, p32, 0.7)["tp"] == 1
    proba = np.array([[0.3, 0.7], [0.8, 0.2]], dtype=np.float32)
    np.testing.assert_array_equal(metrics.thresholded_labels(proba, 1, 0.7), [0, 0])


def test_zero_division_is_exactly_zero_even_on_reused_memory() -> None:
    for n in (3, 100, 5000):
        junk = np.full(n, 3.0)  # leave non-zero bytes in memory the next allocation may reuse
        del junk
        out = metrics._div(np.ones(n), np.zeros(n))
        assert out.shape == (n,) and not out.any()
    np.testing.assert_array_equal(metrics._div([1, 3], [2, 0]), [0.5, 0.0])


@pytest.mark.parametrize(
    "y, p",
    [
        ([1], [0.9]),
        ([0], [0.9]),
        ([1, 0], [0.9, 0.1]),
        ([1, 1, 0], [0.8, 0.3, 0.6]),
        ([0, 0, 1], [0.8, 0.3, 0.6]),
        ([1, 1, 1], [0.8, 0.3, 0.6]),
    ],
)
def test_tiny_and_single_class_inputs_match_sklearn(y: list[int], p: list[float]) -> None:
    """One positive, one negative, or a single class: balanced accuracy and AUC follow sklearn."""
    m = metrics.binary_metrics(np.array(y), np.array(p), 0.5)
    pred = (np.array(p) >= 0.5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    if 0 < sum(y) < len(y):
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
        assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    else:
        assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])


def test_percentile_ci_uses_alpha_over_two_on_each_side() -> None:
    calls = iter(range(101))  # fn returns 0, 1, ..., 100: the 5% and 95% quantiles are 5 and 95

    def counter(a: np.ndarray, b: np.ndarray) -> float:
        return float(next(calls))

    y, p = np.array([0, 1]), np.array([0.2, 0.8])
    assert metrics.bootstrap_ci(counter, y, p, n=101, seed=0, alpha=0.1) == (pytest.approx(5.0), pytest.approx(95.0))


def test_metrics_with_ci_is_independent_of_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    y, p = _data(n=300, seed=14)
    whole = metrics.metrics_with_ci(y, p, 0.5, n_boot=10, seed=2)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMS", 1000)  # 3 resamples per block: blocks of 3, 3, 3 and 1
    assert metrics.metrics_with_ci(y, p, 0.5, n_boot=10, seed=2) == whole


def test_multiclass_rejects_bad_shapes_and_labels_with_a_message() -> None:
    y, proba = np.array([0, 1, 2]), np.eye(3)
    with pytest.raises(ValueError, match=r"proba must be \(N, 3\)"):
        metrics.multiclass_metrics(y, np.eye(3, 4), ["a", "b", "c"])  # 2-D, one column too many
    for bad in ([0, 1, 3], [0, 1, -1]):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            metrics.multiclass_metrics(np.array(bad), proba, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        metrics.multiclass_metrics(np.array([0, 1, 3]), proba, ["a", "b", "c"])  # label == K
    one = metrics.multiclass_metrics(np.array([1]), np.array([[0.2, 0.7, 0.1]]), ["a", "b", "c"])  # one sample is fine
    assert one["accuracy"] == 1.0 and math.isnan(one["roc_auc"])


def test_multiclass_auc_is_defined_for_a_class_seen_once_and_never_asks_sklearn_for_undefined_ones() -> None:
    y = np.array([0, 0, 1, 2, 2])  # class 1 occurs once
    proba = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.1, 0.6]])
    m = metrics.multiclass_metrics(y, proba, ["a", "b", "c"])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    # an absent class (or one that is every sample) yields NaN without asking sklearn for an undefined AUC
    y_abs = np.array([0, 1, 1, 1])
    p_abs = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]
    )  # class 2 never predicted either
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", UndefinedMetricWarning)
        absent = metrics.multiclass_metrics(y_abs, p_abs, ["a", "b", "c"])
        every = metrics.multiclass_metrics(np.array([0, 0]), np.array([[0.8, 0.2], [0.4, 0.6]]), ["a", "b"])
    assert math.isnan(absent["roc_auc"]) and math.isnan(every["roc_auc"])
    # macro averages run over all K classes, the absent one counting as 0
    pred = p_abs.argmax(1)
    assert absent["macro_f1"] == pytest.approx(
        skm.f1_score(y_abs, pred, average="macro", labels=[0, 1, 2], zero_division=0)
    )
    assert absent["macro_f1"] < skm.f1_score(y_abs, pred, average="macro", zero_division=0)


def test_confusion_rejects_mismatched_lengths_and_out_of_range_labels() -> None:
    for t, q in (([0, 1], [0]), ([-1], [0]), ([0], [3]), ([3], [0])):
        with pytest.raises(ValueError, match=r"equal-length labels in \[0, 3\)"):
            metrics.confusion(np.array(t), np.array(q), 3)


def test_downsample_keeps_exactly_max_points_including_both_ends() -> None:
    pts = [{"i": i} for i in range(1000)]
    thin = metrics._downsample(pts)
    assert len(thin) == metrics.MAX_PLOT_POINTS and thin[0] == pts[0] and thin[-1] == pts[-1]
    assert metrics._downsample(pts[:200]) == pts[:200]


def test_calibration_points_hand_computed() -> None:
    # bins 0 (0, .1], 3 (.3, .4] and 5 (.5, .6]; the top bins are empty
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.05, 0.35, 0.55, 0.6])
    pts = metrics.calibration_curve_points(y, p)
    assert pts == [
        pytest.approx(d, abs=1e-12)
        for d in (
            {
                "bin": 0,
                "bin_lower": 0.0,
                "bin_upper": 0.1,
                "mean_predicted": 0.05,
                "fraction_positive": 0.5,
                "count": 2,
            },
            {
                "bin": 3,
                "bin_lower": 0.3,
                "bin_upper": 0.4,
                "mean_predicted": 0.35,
                "fraction_positive": 1.0,
                "count": 1,
            },
            {
                "bin": 5,
                "bin_lower": 0.5,
                "bin_upper": 0.6,
                "mean_predicted": 0.575,
                "fraction_positive": 0.5,
                "count": 2,
            },
        )
    ]
    assert [type(d["bin"]) for d in pts] == [int] * 3 and [type(d["count"]) for d in pts] == [int] * 3


def test_roc_and_pr_points_carry_sklearns_thresholds() -> None:
    y, p = _data(n=50, seed=13)
    _, _, thr = skm.roc_curve(y, p)
    roc = metrics.roc_points(y, p)
    assert roc[0]["threshold"] is None  # sklearn's +inf sentinel
    assert [d["threshold"] for d in roc[1:]] == [float(t) for t in thr[1:]]
    prec, rec, pthr = skm.precision_recall_curve(y, p)
    pr = metrics.pr_points(y, p)
    assert [(d["recall"], d["precision"], d["threshold"]) for d in pr] == list(
        zip(rec[::-1], prec[::-1], [None, *map(float, pthr[::-1])], strict=True)
    )


def test_thresholded_labels_binary_and_one_vs_rest() -> None:
    two = np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    out = metrics.thresholded_labels(two, 1, 0.5)
    np.testing.assert_array_equal(out, [0, 1, 1])  # inclusive at the threshold
    assert out.dtype == np.int64
    np.testing.assert_array_equal(metrics.thresholded_labels(two, 0, 0.6), [0, 1, 1])
    # K = 3, positive = 1: below the threshold the most probable OTHER class wins, even if 1 is the argmax
    three = np.array([[0.1, 0.5, 0.4], [0.3, 0.45, 0.25], [0.1, 0.8, 0.1], [0.6, 0.1, 0.3]])
    np.testing.assert_array_equal(metrics.thresholded_labels(three, 1, 0.7), [2, 0, 1, 0])
    np.testing.assert_array_equal(metrics.thresholded_labels(np.ones((3, 1)), 0, 0.5), [0, 0, 0])
    assert metrics.thresholded_labels(np.ones((3, 1)), 0, 0.5).dtype == np.int64
    for proba, pos in ((two, 2), (two, -1), (np.array([0.2, 0.8]), 0)):
        with pytest.raises(ValueError, match=r"proba must be \(N, K\) with 0 <= positive < K"):
            metrics.thresholded_labels(proba, pos, 0.5)


def test_choose_threshold_ties_are_called_positive_whatever_their_order() -> None:
    # the tied pair at 0.5 holds the positive FIRST: both are called positive at 0.5, so spec = 1/2
    r = metrics.choose_threshold(np.array([1, 1, 0, 0]), np.array([0.8, 0.5, 0.5, 0.2]), "target_sensitivity", 1.0)
    assert (r["threshold"], r["val_sensitivity"], r["val_specificity"]) == (0.5, 1.0, 0.5)


def test_choose_threshold_can_pick_the_lowest_score() -> None:
    for rule in ("target_sensitivity", "max_f1", "youden"):
        r = metrics.choose_threshold(np.array([0, 1]), np.array([0.9, 0.1]), rule, 1.0)  # type: ignore[arg-type]
        assert r["threshold"] == 0.1 and r["val_sensitivity"] == 1.0, rule


def test_choose_threshold_defaults_validation_and_report() -> None:
    r = metrics.choose_threshold(Y_A, P_A, "target_sensitivity")  # default target 0.9
    assert r["target_sensitivity"] == 0.9 and r["threshold"] == 0.3
    assert r == {
        "threshold": 0.3,
        "rule": "target_sensitivity",
        "val_sensitivity": 1.0,
        "val_specificity": pytest.approx(0.4),
        "val_f1": pytest.approx(10 / 13),
        "target_sensitivity": 0.9,
    }
    assert "target_sensitivity" not in metrics.choose_threshold(Y_A, P_A, "max_f1")
    assert "target_sensitivity" not in metrics.choose_threshold(Y_A, P_A, "youden")
    ok = metrics.choose_threshold(np.array([1, 1, 0]), np.array([0.9, 0.4, 0.6]), "youden")  # one negative is enough
    assert ok["threshold"] == 0.9
    for y in (np.zeros(4, dtype=int), np.ones(4, dtype=int)):
        with pytest.raises(ValueError, match="^validation data must contain both classes to choose a threshold$"):
            metrics.choose_threshold(y, np.linspace(0, 1, 4), "youden")
    for target in (0.0, 1.0001, 1.5):
        with pytest.raises(ValueError, match=r"target_sensitivity must be in \(0, 1\]"):
            metrics.choose_threshold(Y_A, P_A, "target_sensitivity", target)
    with pytest.raises(ValueError, match="unknown threshold rule 'bogus'"):
        metrics.choose_threshold(Y_A, P_A, "bogus")  # type: ignore[arg-type]


def test_optional_gate_after_a_disabled_one_is_still_checked() -> None:
    r = evaluate_gates(
        {"f1": 0.9, "recall": 0.9, "specificity": 0.4}, {**GATES, "min_auc": None, "min_specificity": 0.5}, None
    )
    assert [g["name"] for g in r["gates"]] == ["min_f1", "min_recall", "min_specificity"]
    assert not r["passed"] and r["failures"] == ["specificity 0.400 < min_specificity 0.500"]


def test_non_inferiority_entries_margin_zero_and_missing_metrics() -> None:
    champ = {"f1": 0.75, "recall": 0.85}
    strict = evaluate_gates({"f1": 0.74, "recall": 0.9}, {**GATES, "non_inferiority_margin": 0.0}, champ)
    assert not strict["passed"]  # margin 0: any drop fails
    assert strict["failures"] == ["f1 0.740 < champion 0.750 - margin 0.000 = 0.750 (non-inferiority)"]
    assert strict["non_inferiority"]["margin"] == 0.0
    assert strict["non_inferiority"]["entries"][0] == {
        "metric": "f1",
        "value": 0.74,
        "champion": 0.75,
        "margin": 0.0,
        "bound": 0.75,
        "op": ">=",
        "passed": False,
    }
    unset = evaluate_gates({"f1": 0.74, "recall": 0.9}, {**GATES, "non_inferiority_margin": None}, champ)
    assert not unset["passed"] and unset["non_inferiority"]["margin"] == 0.0
    # the champion lacks f1: that entry is skipped, recall is still compared
    partial = evaluate_gates({"f1": 0.9, "recall": 0.8}, GATES, {"recall": 0.9})
    assert partial["non_inferiority"]["entries"][0] == {
        "metric": "f1",
        "skipped": True,
        "note": "champion lacks this metric",
    }
    assert [e["metric"] for e in partial["non_inferiority"]["entries"]] == ["f1", "recall"]
    assert not partial["passed"] and "recall 0.800 < champion 0.900" in partial["failures"][0]
    # the candidate lacks recall (NaN): it fails instead of crashing
    missing = evaluate_gates({"f1": 0.9}, {**GATES, "min_recall": 0.0}, champ)
    assert not missing["passed"] and [e["passed"] for e in missing["non_inferiority"]["entries"]] == [True, False]


def test_paired_difference_is_a_minus_b_at_each_models_threshold() -> None:
    """Challenger (A) minus champion (B) on the same rows; the paired CI is the loop over shared resamples."""
    y, a = _data(n=200, seed=15, decimals=None)
    b = np.clip(a + np.random.default_rng(16).normal(0, 0.25, a.size), 0, 1)
    keys = ["roc_auc", "f1", "specificity"]
    got = metrics.paired_difference_ci(y, a, 0.5, b, 0.4, keys, n_boot=40, seed=9, alpha=0.1)
    assert list(got) == keys
    ma, mb = metrics.binary_metrics(y, a, 0.5), metrics.binary_metrics(y, b, 0.4)
    for k in keys:
        diffs = [
            metrics.binary_metrics(y[i], a[i], 0.5)[k] - metrics.binary_metrics(y[i], b[i], 0.4)[k]
            for i in metrics._resample_indices(y.size, 40, 9)
        ]
        assert got[k] == pytest.approx(
            {
                "a": ma[k],
                "b": mb[k],
                "diff": ma[k] - mb[k],
                "ci_low": np.quantile(diffs, 0.05),
                "ci_high": np.quantile(diffs, 0.95),
            },
            abs=1e-12,
        ), k
    assert got["roc_auc"]["diff"] > 0.05  # A is the better ranker: the sign is A minus B
    assert all(type(v) is float for d in got.values() for v in d.values())


def test_paired_difference_blocks_no_bootstrap_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    y, a = _data(n=120, seed=17)
    b = a[::-1].copy()
    whole = metrics.paired_difference_ci(y, a, 0.5, b, 0.5, ["recall", "pr_auc"], n_boot=7, seed=1)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMS", 360)  # 3 resamples per block: 3, 3 and 1
    assert metrics.paired_difference_ci(y, a, 0.5, b, 0.5, ["recall", "pr_auc"], n_boot=7, seed=1) == whole
    none = metrics.paired_difference_ci(y, a, 0.5, b, 0.5, ["recall"], n_boot=0, seed=1)["recall"]
    assert math.isnan(none["ci_low"]) and math.isnan(none["ci_high"]) and not math.isnan(none["diff"])
    with pytest.raises(ValueError, match="finite and within"):
        metrics.paired_difference_ci(y, a, 0.5, b + 1, 0.5, ["recall"], n_boot=5, seed=1)  # B is checked too
    with pytest.raises(ValueError, match="need n >= 0"):
        metrics.paired_difference_ci(y, a, 0.5, b, 0.5, ["recall"], n_boot=-1, seed=1)
