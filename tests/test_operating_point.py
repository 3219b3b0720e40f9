"""The operating point's own uncertainty (issue 26, point 4): a bootstrap interval of the validation-chosen threshold,
the test sensitivity/specificity over it, and a warning when too few validation positives back it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from medclf.config import Evaluate
from medclf.evaluation import metrics
from medclf.evaluation.report import (
    MIN_VAL_POSITIVES,
    Predictions,
    binary_view,
    evaluate_predictions,
    metrics_document,
    operating_point,
    threshold_resamples,
)
from medclf.release.model_card import version_description

CFG = Evaluate(bootstrap=50, target_sensitivity=0.95, seed=3)


def _split(n_pos: int, n_neg: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels and two-column probabilities; the positives score higher, with overlap."""
    y = np.r_[np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)]
    p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.2, -1.2), 1.3)))
    return y, np.c_[1 - p, p]


def _preds(n_pos_val: int, n_neg_val: int, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    yv, pv = _split(n_pos_val, n_neg_val, rng)
    yt, pt = _split(400, 400, rng)
    return Predictions(yv, pv, yt, pt, ["benign", "malignant"], "malignant")


def _op(preds: Predictions, cfg: Evaluate = CFG, patients: np.ndarray | None = None) -> dict:
    choice = metrics.choose_threshold(preds.val.y, preds.val.p, cfg.threshold_rule, cfg.target_sensitivity)
    return operating_point(preds.val, preds.test, choice, cfg, patients)


def test_few_validation_positives_give_a_wide_interval_and_a_warning_naming_the_count():
    report = evaluate_predictions(_preds(21, 200), CFG)
    op = report.threshold["operating_point"]
    assert op["val_positives"] == 21 and op["val_negatives"] == 200 and op["resamples"] == 200
    assert op["ci_low"] <= op["threshold"] <= op["ci_high"]
    assert op["ci_high"] - op["ci_low"] > 0.1
    spec, sens = op["test_specificity_range"], op["test_sensitivity_range"]
    assert spec[0] < spec[1] and sens[0] < sens[1] and spec[1] - spec[0] > 0.1
    w = op["warning"]
    assert w.startswith(f"the operating point rests on 21 validation positives (fewer than {MIN_VAL_POSITIVES})")
    assert "target_sensitivity 0.95" in w and f"threshold {op['threshold']:.3g}" in w
    assert f"95 % interval {op['ci_low']:.3g}–{op['ci_high']:.3g}" in w
    assert f"test specificity would range {spec[0]:.2f}–{spec[1]:.2f}" in w
    doc = metrics_document(report)
    assert doc["operating_point"] == op
    json.dumps(report.threshold, allow_nan=False)  # threshold.json, strict
    json.dumps(doc, allow_nan=False)


def test_many_validation_positives_give_a_narrow_interval_and_no_warning():
    op, few = _op(_preds(500, 500)), _op(_preds(21, 200))
    assert op["val_positives"] == 500 and op["warning"] is None
    assert op["ci_low"] <= op["threshold"] <= op["ci_high"]
    assert op["ci_high"] - op["ci_low"] < 0.15
    assert op["ci_high"] - op["ci_low"] < (few["ci_high"] - few["ci_low"]) / 2
    spread = [r[1] - r[0] for r in (op["test_specificity_range"], few["test_specificity_range"])]
    assert spread[0] < 0.25 and spread[0] < spread[1] / 2


def test_chosen_threshold_and_test_metrics_are_unchanged():
    preds = _preds(21, 200)
    report = evaluate_predictions(preds, CFG)
    today = metrics.choose_threshold(preds.val.y, preds.val.p, CFG.threshold_rule, CFG.target_sensitivity)
    assert {k: v for k, v in report.threshold.items() if k != "operating_point"} == today
    assert report.decision_threshold == today["threshold"] == report.threshold["operating_point"]["threshold"]
    b = preds.test
    assert report.test == metrics.metrics_with_ci(b.y, b.p, today["threshold"], CFG.bootstrap, CFG.seed)
    doc = metrics_document(report)
    without = metrics_document(dataclasses.replace(report, threshold=today))
    assert set(doc) - set(without) == {"operating_point"}
    assert {k: v for k, v in doc.items() if k != "operating_point"} == without


def test_interval_is_reproducible_with_the_seed():
    preds = _preds(21, 200)
    again = _op(preds)
    assert _op(preds) == again
    other_cfg = CFG.model_copy(update={"seed": CFG.seed + 1})
    np.testing.assert_array_equal(threshold_resamples(preds.val, CFG), threshold_resamples(preds.val, CFG))
    assert not np.array_equal(threshold_resamples(preds.val, CFG), threshold_resamples(preds.val, other_cfg))
    assert _op(preds, other_cfg)["threshold"] == again["threshold"]


def test_interval_resamples_whole_patients_when_their_ids_are_given():
    """Ten identical images per patient: rows look like 10x the evidence, patients do not."""
    rng = np.random.default_rng(1)
    y, proba = _split(8, 30, rng)
    rep = np.repeat(np.arange(y.size), 10)
    pt = _preds(21, 200).proba_test
    preds = Predictions(y[rep], proba[rep], _preds(21, 200).y_test, pt, ["benign", "malignant"], "malignant")
    rows, patients = _op(preds), _op(preds, patients=rep)
    assert patients["clustered_by_patient"] and not rows["clustered_by_patient"]
    assert patients["ci_high"] - patients["ci_low"] > rows["ci_high"] - rows["ci_low"]
    with pytest.raises(ValueError, match="one id per validation row"):
        _op(preds, patients=rep[:-1])


def test_no_bootstrap_still_warns_without_an_interval():
    op = _op(_preds(21, 200), CFG.model_copy(update={"bootstrap": 0}))
    assert op["ci_low"] is None and op["ci_high"] is None and op["resamples"] == 0
    assert op["test_specificity_range"] == [None, None]
    assert "21 validation positives" in op["warning"] and "evaluate.bootstrap is 0" in op["warning"]
    json.dumps(op, allow_nan=False)


def test_rows_without_a_class_are_skipped_not_fatal():
    b = binary_view(np.r_[1, np.zeros(60, np.int64)], np.c_[np.zeros(61), np.linspace(0, 1, 61)], 1)
    choice = metrics.choose_threshold(b.y, b.p, "max_f1")
    op = operating_point(b, b, choice, CFG.model_copy(update={"threshold_rule": "max_f1"}))
    assert 0 < op["resamples"] < 200  # ~37 % of the resamples miss the one positive
    assert "by max_f1 (" in op["warning"]


GATES = {"threshold": 0.0671, "threshold_rule": "target_sensitivity", "gates": []}


def test_description_shows_the_warning_only_when_present():
    warned = _op(_preds(21, 200))
    doc = {"test": {"n": 800, "f1": 0.5}, "operating_point": warned}
    md = version_description(GATES, doc, {"positive_class": "malignant"}, "r")
    line = next(x for x in md.splitlines() if "unstable operating point" in x)
    assert line == f"> **Warning, unstable operating point:** {warned['warning']}."
    lines = md.splitlines()
    assert lines.index(line) == next(i for i, x in enumerate(lines) if x.startswith("**Operating point:**")) + 2
    calm = {"test": {"n": 800, "f1": 0.5}, "operating_point": _op(_preds(500, 500))}
    for quiet in (calm, {"test": {"n": 800, "f1": 0.5}}):
        md = version_description(GATES, quiet, {"positive_class": "malignant"}, "r")
        assert "unstable operating point" not in md and "validation positives" not in md
        assert "**Operating point:** threshold 0.0671 on p(malignant)" in md
