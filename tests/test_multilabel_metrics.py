"""Tests for medclf.evaluation.multilabel (issue 25): every figure is checked against scikit-learn (or a hand
computation), each finding's threshold is fitted on validation and applied to its own column, CIs are clustered by
patient, and per-finding temperatures recover a known one."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from medclf.evaluation import kclass, multilabel

FUNDUS = ["normal", "diabetic_retinopathy", "glaucoma", "cataract"]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _data(n: int = 400, seed: int = 0, tied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Informative, imperfect, correlated findings with different prevalences, some images with no finding. With
    `tied`, probabilities sit on 50 levels (odd hundredths: many ties, never on an ECE bin edge)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 1))  # findings co-occur
    z = 0.7 * shared + rng.normal(size=(n, len(FUNDUS))) + np.array([0.0, -1.0, -1.5, -0.5])
    y = (rng.random(z.shape) < _sigmoid(2 * z)).astype(np.int64)
    p = _sigmoid(1.5 * z + rng.normal(0, 0.8, z.shape))
    if tied:
        p = (np.floor(p * 50) + 0.5) / 50
    return y, p


def _thresholds(**kw: float) -> dict[str, float]:
    return {c: kw.get(c, 0.5) for c in FUNDUS}


def _hand_ece(y: np.ndarray, p: np.ndarray) -> float:
    """ECE from sklearn's reliability curve: sum over non-empty bins of n_b / N |fraction positive - mean p|."""
    frac, mean_p = calibration_curve(y, p, n_bins=10)
    counts = np.histogram(p, bins=np.linspace(0, 1, 11))[0]
    counts = counts[counts > 0]
    return float(np.sum(counts / len(p) * np.abs(frac - mean_p)))


# ----------------------------------------------------------------------------- multilabel_report
@pytest.mark.parametrize("tied", [False, True])
def test_report_matches_sklearn(tied: bool) -> None:
    y, p = _data(tied=tied)
    assert (y.sum(axis=1) == 0).any() and (y.sum(axis=1) >= 2).any()  # "no finding" and co-occurring rows
    thr = _thresholds(normal=0.55, diabetic_retinopathy=0.3, glaucoma=0.2, cataract=0.45)
    pred = (p >= np.array([thr[c] for c in FUNDUS])).astype(np.int64)
    r = multilabel.multilabel_report(y, p, FUNDUS, thr)
    for j, c in enumerate(FUNDUS):
        row, yj, qj = r["per_class"][c], y[:, j], pred[:, j]
        assert row["auc"] == pytest.approx(skm.roc_auc_score(yj, p[:, j]), abs=1e-12), c
        assert row["ap"] == pytest.approx(skm.average_precision_score(yj, p[:, j]), abs=1e-12), c
        assert row["recall"] == pytest.approx(skm.recall_score(yj, qj, zero_division=0)), c
        assert row["specificity"] == pytest.approx(skm.recall_score(1 - yj, 1 - qj, zero_division=0)), c
        assert row["precision"] == pytest.approx(skm.precision_score(yj, qj, zero_division=0)), c
        assert row["f1"] == pytest.approx(skm.f1_score(yj, qj, zero_division=0)), c
        assert row["support"] == int(yj.sum()) and isinstance(row["support"], int)
        assert row["prevalence"] == pytest.approx(yj.mean())
        assert row["ece"] == pytest.approx(_hand_ece(yj, p[:, j]), abs=1e-12), c
    assert r["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"), abs=1e-12)
    assert r["micro_auc"] == pytest.approx(skm.roc_auc_score(y, p, average="micro"), abs=1e-12)
    assert r["map"] == pytest.approx(skm.average_precision_score(y, p, average="macro"), abs=1e-12)
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert r["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro", zero_division=0))
    assert r["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    assert r["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert r["ece"] == pytest.approx(np.mean([_hand_ece(y[:, j], p[:, j]) for j in range(len(FUNDUS))]))
    assert r["ece"] == pytest.approx(multilabel.mean_ece(y, p))
    assert r["label_cardinality"] == pytest.approx(y.sum() / len(y)) and r["n"] == len(y)
    assert set(r["per_class"]["glaucoma"]) == set(multilabel.PER_LABEL_FIGURES)


def test_report_by_hand() -> None:
    """Three images, two findings: every count by hand (the second image has no finding)."""
    y = np.array([[1, 0], [0, 0], [1, 1]])
    p = np.array([[0.9, 0.2], [0.6, 0.1], [0.3, 0.8]])
    r = multilabel.multilabel_report(y, p, ["a", "b"], {"a": 0.5, "b": 0.5})
    # called: [[1, 0], [1, 0], [0, 1]]; a: TP 1, FP 1, FN 1, TN 0; b: TP 1, TN 2
    assert r["per_class"]["a"]["recall"] == 0.5 and r["per_class"]["a"]["specificity"] == 0.0
    assert r["per_class"]["b"]["f1"] == 1.0 and r["per_class"]["b"]["auc"] == 1.0
    assert r["per_class"]["a"]["auc"] == 0.5  # positives 0.9, 0.3 vs negative 0.6
    assert r["hamming_loss"] == pytest.approx(2 / 6) and r["subset_accuracy"] == pytest.approx(1 / 3)
    assert r["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1)) and r["label_cardinality"] == 1.0


def test_undefined_auc_is_nan_and_skipped_in_the_macro_means() -> None:
    y, p = _data()
    y[:, 2] = 0  # glaucoma absent from the sample
    y[:, 3] = 1  # cataract in every image
    thr = _thresholds()
    r = multilabel.multilabel_report(y, p, FUNDUS, thr)
    for c in ("glaucoma", "cataract"):
        assert math.isnan(r["per_class"][c]["auc"]) and math.isnan(r["per_class"][c]["ap"])
    assert r["macro_auc"] == pytest.approx(skm.roc_auc_score(y[:, :2], p[:, :2], average="macro"))
    assert r["map"] == pytest.approx(skm.average_precision_score(y[:, :2], p[:, :2], average="macro"))
    pred = (p >= 0.5).astype(np.int64)
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))  # all four
    assert r["micro_auc"] == pytest.approx(skm.roc_auc_score(y, p, average="micro"))
    y[:, :2] = 0
    y[:, 3] = 0
    r = multilabel.multilabel_report(y, p, FUNDUS, thr)  # no finding at all: nothing ranked
    assert math.isnan(r["macro_auc"]) and math.isnan(r["map"]) and math.isnan(r["micro_auc"])


# ----------------------------------------------------------------------------- thresholds by name
def test_each_column_is_called_at_its_own_findings_threshold() -> None:
    """Very different thresholds, given in another order than the columns: each column must use its own."""
    _, p = _data(n=300, seed=1)
    thr = {"cataract": 0.9, "normal": 0.05, "glaucoma": 0.5, "diabetic_retinopathy": 0.2}
    called = multilabel.apply_thresholds(p, thr, FUNDUS)
    assert called.shape == p.shape and called.dtype == bool
    for j, c in enumerate(FUNDUS):
        np.testing.assert_array_equal(called[:, j], p[:, j] >= thr[c], err_msg=c)
    positional = p >= np.array(list(thr.values()))  # the dict's order, not the findings'
    assert (called != positional).any()
    in_order = multilabel.apply_thresholds(p, [thr[c] for c in FUNDUS], FUNDUS)
    np.testing.assert_array_equal(called, in_order)
    fits = {c: {"threshold": t, "rule": "f1", "target": None} for c, t in thr.items()}  # fit_thresholds' entries
    np.testing.assert_array_equal(multilabel.apply_thresholds(p, fits, FUNDUS), called)


def test_report_uses_each_findings_threshold_by_name() -> None:
    y, p = _data(n=300, seed=2)
    thr = {"cataract": 0.85, "normal": 0.1, "glaucoma": 0.6, "diabetic_retinopathy": 0.25}
    r = multilabel.multilabel_report(y, p, FUNDUS, thr)
    for j, c in enumerate(FUNDUS):
        pred = (p[:, j] >= thr[c]).astype(np.int64)
        assert r["per_class"][c]["recall"] == pytest.approx(skm.recall_score(y[:, j], pred, zero_division=0))
        assert r["per_class"][c]["precision"] == pytest.approx(skm.precision_score(y[:, j], pred, zero_division=0))
    shuffled = dict(reversed(list(thr.items())))
    assert multilabel.multilabel_report(y, p, FUNDUS, shuffled)["per_class"] == r["per_class"]


@pytest.mark.parametrize(
    "thr, match",
    [
        ({"normal": 0.5, "diabetic_retinopathy": 0.5, "glaucoma": 0.5}, "cataract"),
        ({**_thresholds(), "myopia": 0.5}, "myopia"),
        ([0.5, 0.5, 0.5], "3 thresholds for 4 findings"),
        (_thresholds(glaucoma=1.5), "glaucoma"),
        (_thresholds(cataract=math.nan), "cataract"),
    ],
)
def test_thresholds_must_name_every_finding_within_0_1(thr: Any, match: str) -> None:
    _, p = _data(n=50)
    with pytest.raises(ValueError, match=match):
        multilabel.apply_thresholds(p, thr, FUNDUS)


# ----------------------------------------------------------------------------- fit_thresholds
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_target_sensitivity_threshold_is_the_highest_meeting_it_on_val(target: float) -> None:
    y, p = _data(n=500, seed=3, tied=True)
    fits = multilabel.fit_thresholds(y, p, FUNDUS, "target_sensitivity", None, target)
    assert list(fits) == FUNDUS
    for j, c in enumerate(FUNDUS):
        f, yj, pj = fits[c], y[:, j], p[:, j]
        called = (pj >= f["threshold"]).astype(np.int64)
        assert f["rule"] == "target_sensitivity" and f["target"] == target and f["n_positive"] == yj.sum()
        assert f["val_sensitivity"] == pytest.approx(skm.recall_score(yj, called)) and f["val_sensitivity"] >= target
        assert f["val_specificity"] == pytest.approx(skm.recall_score(1 - yj, 1 - called))
        assert f["val_f1"] == pytest.approx(skm.f1_score(yj, called))
        higher = pj[(yj == 1) & (pj > f["threshold"])]  # the next candidate up misses the target
        if higher.size:
            assert skm.recall_score(yj, pj >= higher.min()) < target, c
        assert f["threshold"] == kclass.fit_class_threshold(yj, pj, target)["threshold"]


def test_f1_threshold_is_the_best_f1_on_val() -> None:
    y, p = _data(n=500, seed=4, tied=True)
    fits = multilabel.fit_thresholds(y, p, FUNDUS, "f1")
    for j, c in enumerate(FUNDUS):
        yj, pj = y[:, j], p[:, j]
        cands = np.unique(pj)  # the 50 levels
        f1s = np.array([skm.f1_score(yj, pj >= t, zero_division=0) for t in cands])
        best = cands[np.flatnonzero(f1s >= f1s.max() - 1e-12)[0]]  # ties: the lowest threshold
        assert fits[c]["threshold"] == best and fits[c]["rule"] == "f1" and fits[c]["target"] is None, c
        assert fits[c]["val_f1"] == pytest.approx(f1s.max())


def test_rules_per_finding_override_the_default_rule() -> None:
    y, p = _data(n=500, seed=5)
    rules = {"glaucoma": 0.5, "cataract": "f1", "normal": "target_sensitivity"}
    fits = multilabel.fit_thresholds(y, p, FUNDUS, "target_sensitivity", rules, 0.9)
    alone = {c: multilabel.fit_thresholds(y, p, FUNDUS, "f1")[c] for c in FUNDUS}
    assert [fits[c]["rule"] for c in FUNDUS] == ["target_sensitivity", "target_sensitivity", "target_sensitivity", "f1"]
    assert [fits[c]["target"] for c in FUNDUS] == [0.9, 0.9, 0.5, None]
    assert fits["cataract"] == alone["cataract"]
    g = FUNDUS.index("glaucoma")
    assert fits["glaucoma"]["threshold"] == kclass.fit_class_threshold(y[:, g], p[:, g], 0.5)["threshold"]
    assert fits["glaucoma"]["threshold"] > kclass.fit_class_threshold(y[:, g], p[:, g], 0.9)["threshold"]
    assert 0.5 <= fits["glaucoma"]["val_sensitivity"] < 0.9
    by_default_f1 = multilabel.fit_thresholds(y, p, FUNDUS, "f1", {"normal": 0.95})
    assert by_default_f1["normal"]["target"] == 0.95 and by_default_f1["glaucoma"] == alone["glaucoma"]
    words = multilabel.decision_rule_words(fits)
    assert f"glaucoma >= {fits['glaucoma']['threshold']:.4f} (sensitivity 0.5)" in words
    assert f"cataract >= {fits['cataract']['threshold']:.4f} (best F1)" in words
    assert words.index("normal") < words.index("diabetic_retinopathy") < words.index("glaucoma")


def test_thresholds_come_from_validation_and_hold_on_test() -> None:
    """Fitted on val, the thresholds are applied unchanged to test: the test report's recall is the recall at the
    val thresholds, which a fit on the test split would not give."""
    y_val, p_val = _data(n=400, seed=6)
    y_test, p_test = _data(n=400, seed=7)
    fits = multilabel.fit_thresholds(y_val, p_val, FUNDUS)
    on_test = multilabel.fit_thresholds(y_test, p_test, FUNDUS)
    assert any(fits[c]["threshold"] != on_test[c]["threshold"] for c in FUNDUS)
    r = multilabel.evaluate_multilabel(y_test, p_test, FUNDUS, fits, 0, 0)
    for j, c in enumerate(FUNDUS):
        called = p_test[:, j] >= fits[c]["threshold"]
        assert r["test"][f"per_class.{c}.recall"]["value"] == pytest.approx(skm.recall_score(y_test[:, j], called))
        assert fits[c]["val_sensitivity"] >= 0.9


@pytest.mark.parametrize(
    "rules, match",
    [
        ({"glaucoma": "youden"}, "glaucoma.*unknown threshold rule"),
        ({"cataract": 1.5}, "cataract.*target_sensitivity"),
        ({"cataract": True}, "cataract"),
        ({"myopia": "f1"}, "myopia"),
    ],
)
def test_bad_rules_are_refused_naming_the_finding(rules: dict[str, Any], match: str) -> None:
    y, p = _data(n=200)
    with pytest.raises(ValueError, match=match):
        multilabel.fit_thresholds(y, p, FUNDUS, "target_sensitivity", rules)


@pytest.mark.parametrize("rule", ["target_sensitivity", "f1"])
def test_a_finding_without_val_positives_is_refused_by_name(rule: str) -> None:
    y, p = _data(n=200)
    y[:, FUNDUS.index("glaucoma")] = 0
    with pytest.raises(ValueError, match="'glaucoma' has no positive image in the validation split"):
        multilabel.fit_thresholds(y, p, FUNDUS, rule)
    y[:, FUNDUS.index("glaucoma")] = 1  # in every image: F1 has no negative to weigh; a sensitivity target does
    if rule == "f1":
        with pytest.raises(ValueError, match="'glaucoma'"):
            multilabel.fit_thresholds(y, p, FUNDUS, rule)
    else:
        assert multilabel.fit_thresholds(y, p, FUNDUS, rule)["glaucoma"]["val_sensitivity"] >= 0.9


# ----------------------------------------------------------------------------- input refusals
_Y, _P = _data(n=20)
_Y[0, 0] = 1


def _with(a: np.ndarray, value: float) -> np.ndarray:
    out = a.astype(float)
    out[3, 2] = value
    return out


@pytest.mark.parametrize(
    "y, p, labels, match",
    [
        (_Y, _P[:, :3], FUNDUS, "4 class names for 3"),
        (_Y[:, :3], _P, FUNDUS, "shape of p"),
        (_Y[:10], _P, FUNDUS, "shape of p"),
        (_Y[:, 0], _P[:, 0], FUNDUS[:1], r"\(N, L\)"),
        (_Y * 0.5, _P, FUNDUS, "0/1"),
        (_with(_Y, 2), _P, FUNDUS, "0/1"),
        (_with(_Y, math.nan), _P, FUNDUS, "0/1"),
        (_Y, _with(_P, math.nan), FUNDUS, "NaN"),
        (_Y, _with(_P, 1.2), FUNDUS, r"\[0, 1\]"),
        (_Y, _with(_P, -0.1), FUNDUS, r"\[0, 1\]"),
        (_Y, _P, ["a", "a", "b", "c"], "distinct"),
        (_Y[:0], _P[:0], FUNDUS, "non-empty"),
    ],
)
def test_bad_inputs_raise_value_error(y: Any, p: Any, labels: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        multilabel.multilabel_report(y, p, labels, [0.5] * len(labels))
    with pytest.raises(ValueError, match=match):
        multilabel.fit_thresholds(y, p, labels)


# ----------------------------------------------------------------------------- bootstrap
def test_cis_contain_the_point_and_clustering_correlated_duplicates_widens_them() -> None:
    """Each patient contributes four identical rows (perfectly correlated eyes/visits): resampling rows treats them as
    independent and understates the uncertainty; resampling patients does not."""
    y0, p0 = _data(n=80, seed=8)
    y, p, patients = np.repeat(y0, 4, axis=0), np.repeat(p0, 4, axis=0), np.repeat(np.arange(80), 4)
    thr = _thresholds(glaucoma=0.3)
    rows = multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 200, 11)
    clustered = multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 200, 11, groups=patients)
    assert rows["report"] == clustered["report"] and "n" not in rows["test"]
    assert set(clustered["test"]) == set(kclass.flatten_report(clustered["report"])) - {"n"}
    for res in (rows, clustered):  # the ECE is biased upward in a resample (binning noise): its CI may sit above it
        for name, v in ((k, v) for k, v in res["test"].items() if not k.endswith("ece")):
            assert v["ci_low"] - 1e-12 <= v["value"] <= v["ci_high"] + 1e-12, name
    for name in ("macro_auc", "map", "macro_f1", "micro_f1", "hamming_loss", "per_class.glaucoma.recall"):
        width = {k: r["test"][name]["ci_high"] - r["test"][name]["ci_low"] for k, r in (("r", rows), ("c", clustered))}
        assert width["c"] > 1.4 * width["r"], (name, width)
    # the cluster bootstrap of the duplicated rows is the row bootstrap of the patients (same draws, same figures)
    once = multilabel.evaluate_multilabel(y0, p0, FUNDUS, thr, 200, 11)
    for name, v in once["test"].items():
        scale = 4 if name.endswith(".support") else 1  # a count: four rows per patient
        assert clustered["test"][name] == pytest.approx({k: scale * x for k, x in v.items()}, nan_ok=True), name


def test_singleton_groups_are_the_row_bootstrap_and_the_seed_fixes_the_draws() -> None:
    y, p = _data(n=120, seed=9)
    thr = _thresholds()
    a = multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 60, 3)
    b = multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 60, 3, groups=np.arange(120))
    c = multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 60, 4)
    assert a == b == multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 60, 3)
    assert a["test"]["macro_auc"]["ci_low"] != c["test"]["macro_auc"]["ci_low"]
    nan = multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 0, 3)["test"]["map"]
    assert nan["value"] == a["test"]["map"]["value"] and math.isnan(nan["ci_low"]) and math.isnan(nan["ci_high"])
    with pytest.raises(ValueError, match="groups"):
        multilabel.evaluate_multilabel(y, p, FUNDUS, thr, 10, 3, groups=np.arange(5))


# ----------------------------------------------------------------------------- temperatures
def test_temperatures_recover_known_per_finding_temperatures() -> None:
    """The truth is sigmoid(z / T) for T = 2, 0.5, 1 while the model says sigmoid(z): overconfident, underconfident
    and calibrated findings each get their own T back."""
    rng = np.random.default_rng(10)
    true_t = np.array([2.0, 0.5, 1.0])
    z = rng.normal(0, 2.5, size=(20_000, 3))
    y = (rng.random(z.shape) < _sigmoid(z / true_t)).astype(np.int64)
    p = _sigmoid(z)
    t = multilabel.fit_temperatures(y, p)
    assert t.shape == (3,)
    np.testing.assert_allclose(t, true_t, rtol=0.08)
    after = multilabel.apply_temperatures(p, t)
    np.testing.assert_allclose(after, _sigmoid(np.log(p / (1 - p)) / t), atol=1e-9)
    nll = [skm.log_loss(y[:, j], q[:, j]) for q in (p, after) for j in range(3)]
    assert nll[3] < nll[0] and nll[4] < nll[1] and nll[5] <= nll[2] + 1e-9
    assert multilabel.mean_ece(y, after) < multilabel.mean_ece(y, p)
    np.testing.assert_allclose(multilabel.apply_temperatures(p, np.ones(3)), p, atol=1e-9)


def test_temperature_is_one_for_a_finding_with_one_class_and_bad_temperatures_are_refused() -> None:
    y, p = _data(n=200)
    y[:, 1] = 0
    assert multilabel.fit_temperatures(y, p)[1] == 1.0
    with pytest.raises(ValueError, match="4 temperatures|L temperatures"):
        multilabel.apply_temperatures(p, np.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        multilabel.apply_temperatures(p, np.array([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="0/1"):
        multilabel.fit_temperatures(y * 3, p)


# ----------------------------------------------------------------------------- metrics.json
def test_metrics_document_is_strict_json_with_every_figure_its_ci_and_the_rule() -> None:
    y_val, p_val = _data(n=300, seed=12)
    y, p = _data(n=200, seed=13)
    y[:, 2] = 0  # glaucoma absent from test: its AUC is undefined (null in JSON)
    fits = multilabel.fit_thresholds(y_val, p_val, FUNDUS, "target_sensitivity", {"cataract": "f1"}, 0.8)
    result = multilabel.evaluate_multilabel(y, p, FUNDUS, fits, 40, 0, groups=np.arange(200) // 2)
    doc = multilabel.metrics_document(FUNDUS, dict(reversed(list(fits.items()))), result, len(y_val))
    json.dumps(doc, allow_nan=False)
    assert doc["task"] == "multilabel" and doc["classes"] == FUNDUS and doc["val"] == {"n": 300}
    dec = doc["decision"]
    assert dec["source"] == "validation" and list(dec["thresholds"]) == FUNDUS
    assert dec["thresholds"]["cataract"]["rule"] == "f1" and dec["thresholds"]["glaucoma"]["target"] == 0.8
    assert dec["rule"] == multilabel.decision_rule_words(fits) and "cataract" in dec["rule"]
    test = doc["test"]
    assert test["n"] == 200
    for name in (*multilabel.SUMMARY, *(f"per_class.{c}.{m}" for c in FUNDUS for m in multilabel.PER_LABEL_FIGURES)):
        assert {name, f"{name}_ci_low", f"{name}_ci_high"} <= set(test), name
    assert test["macro_auc"] == pytest.approx(result["report"]["macro_auc"])
    assert test["per_class.glaucoma.auc"] is None and doc["per_class"]["glaucoma"]["auc"] is None
    assert test["macro_auc_ci_low"] <= test["macro_auc"] <= test["macro_auc_ci_high"]
    assert list(doc["per_class"]) == FUNDUS and doc["per_class"]["normal"]["support"] == int(y[:, 0].sum())
