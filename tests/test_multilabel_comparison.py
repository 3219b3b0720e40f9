"""Tests for medclf.evaluation.multilabel_comparison (issue 25): a multi-label challenger against its champion on
the same test images, each at its own per-finding thresholds, with paired (patient-clustered) bootstrap CIs and the
non-inferiority verdict on every gated metric. Real numbers, small samples."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from medclf.evaluation import kclass, multilabel
from medclf.evaluation.multilabel_comparison import comparison_markdown, multilabel_comparison

FUNDUS = ["normal", "diabetic_retinopathy", "glaucoma", "cataract"]
THR = {"normal": 0.55, "diabetic_retinopathy": 0.35, "glaucoma": 0.3, "cataract": 0.45}
_OF_THE_TEST_SET = ("support", "prevalence", "n", "label_cardinality")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _data(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, challenger p, champion p): correlated findings of different prevalences; two informative, imperfect,
    different models."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 1))
    z = 0.7 * shared + rng.normal(size=(n, len(FUNDUS))) + np.array([0.0, -1.0, -1.5, -0.5])
    y = (rng.random(z.shape) < _sigmoid(2 * z)).astype(np.int64)
    p_a = _sigmoid(1.5 * z + rng.normal(0, 0.8, z.shape))
    p_b = _sigmoid(1.2 * z + rng.normal(0, 1.0, z.shape))
    return y, p_a, p_b


def _compare(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "thresholds_challenger": THR,
        "thresholds_champion": THR,
        "gated": ["macro_auc", "macro_f1"],
        "margin": 0.02,
        "n_boot": 100,
        "seed": 0,
    }
    args.update(kw)
    return multilabel_comparison(FUNDUS, y, proba_challenger=p_a, proba_champion=p_b, **args)


def _width(e: dict[str, Any]) -> float:
    return float(e["ci_high"] - e["ci_low"])


# ----------------------------------------------------------------------------- the point and the shape
def test_point_deltas_are_the_differences_of_two_reports() -> None:
    y, p_a, p_b = _data()
    thr_b = {"normal": 0.5, "diabetic_retinopathy": 0.25, "glaucoma": 0.4, "cataract": 0.5}
    r = _compare(y, p_a, p_b, thresholds_champion=thr_b, n_boot=0)
    a = kclass.flatten_report(multilabel.multilabel_report(y, p_a, FUNDUS, THR))
    b = kclass.flatten_report(multilabel.multilabel_report(y, p_b, FUNDUS, thr_b))
    expected = {k for k in a if k.rsplit(".", 1)[-1] not in _OF_THE_TEST_SET}
    assert set(r["metrics"]) == expected  # every model figure of the report, and only those
    for k in expected:
        e = r["metrics"][k]
        assert e["challenger"] == pytest.approx(a[k], abs=1e-12), k
        assert e["champion"] == pytest.approx(b[k], abs=1e-12), k
        assert e["diff"] == pytest.approx(a[k] - b[k], abs=1e-12), k
        assert e["ci_low"] is None and e["ci_high"] is None  # no resamples, no CI
    for c in FUNDUS:  # the per-finding view is the same entries
        assert set(r["per_class"][c]) == {"auc", "ap", "recall", "specificity", "f1"}
        for m, e in r["per_class"][c].items():
            assert e is r["metrics"][f"per_class.{c}.{m}"]
            assert e["diff"] == pytest.approx(a[f"per_class.{c}.{m}"] - b[f"per_class.{c}.{m}"], abs=1e-12)
    assert r["n"] == r["n_units"] == len(y) and not r["clustered"]
    assert set(r["lower_is_better"]) == {"hamming_loss", "ece", *(f"per_class.{c}.ece" for c in FUNDUS)}
    # each model's 2 x 2 counts at its own thresholds, rows = actual
    for c, j in zip(FUNDUS, range(len(FUNDUS)), strict=True):
        (tn, fp), (fn, tp) = r["confusion"]["champion"][c]
        called = p_b[:, j] >= thr_b[c]
        assert tp == int((called & (y[:, j] == 1)).sum()) and tn == int((~called & (y[:, j] == 0)).sum())
        assert tp + fn == int(y[:, j].sum()) and tn + fp + fn + tp == len(y)
    # n_boot = 0: the verdict is the point difference, the CI absent
    assert all(e["tested"] == "diff" and e["ci_low"] is None for e in r["non_inferiority"]["entries"])


def test_identical_models_have_zero_differences_and_pass() -> None:
    y, p, _ = _data()
    gated = ["macro_auc", "macro_f1", "map", "subset_accuracy", *(f"per_class.{c}.auc" for c in FUNDUS)]
    r = _compare(y, p, p.copy(), gated=gated, thresholds_champion={c: {"threshold": t} for c, t in THR.items()})
    json.dumps(r, allow_nan=False)  # strict JSON
    for k, e in r["metrics"].items():
        assert e["diff"] == 0.0 and e["ci_low"] == 0.0 and e["ci_high"] == 0.0, k
        assert e["challenger"] == e["champion"], k
    ni = r["non_inferiority"]
    assert ni["skipped"] is False and ni["paired"] is True and ni["margin"] == 0.02
    assert [e["metric"] for e in ni["entries"]] == gated
    assert all(e["passed"] and e["challenger"] == e["champion"] and e["diff"] == 0.0 for e in ni["entries"])
    assert ni["failures"] == []
    assert "re-scored on this test set" in ni["source"] and "paired bootstrap" in ni["source"]
    assert r["confusion"]["challenger"] == r["confusion"]["champion"]


def test_champion_better_on_one_gated_finding_fails_that_entry() -> None:
    y, p_b, _ = _data(n=300)
    rng = np.random.default_rng(7)
    p_a = p_b.copy()
    g = FUNDUS.index("glaucoma")
    p_a[:, g] = np.clip(0.5 * p_b[:, g] + 0.5 * rng.random(len(y)), 0, 1)  # the challenger's glaucoma is worse
    gated = ["per_class.glaucoma.auc", "per_class.cataract.auc", "per_class.normal.recall"]
    r = _compare(y, p_a, p_b, gated=gated, margin=0.02)
    entry = {e["metric"]: e for e in r["non_inferiority"]["entries"]}
    glaucoma = entry["per_class.glaucoma.auc"]
    assert glaucoma["diff"] < -0.02 and not glaucoma["passed"]
    assert glaucoma["ci_low"] <= glaucoma["diff"] <= glaucoma["ci_high"]  # the paired CI beside the verdict
    assert entry["per_class.cataract.auc"]["passed"] and entry["per_class.normal.recall"]["passed"]
    (failure,) = r["non_inferiority"]["failures"]
    assert "glaucoma" in failure and "auc" in failure and "0.020" in failure  # names the finding, metric, margin
    assert "cataract" not in failure

    # the verdict is the point difference, as `kclass_comparison`: a margin the point clears but the lower CI
    # bound does not passes (the CI is reported for the reviewer)
    margin = -glaucoma["diff"] + 0.005
    assert glaucoma["ci_low"] < -margin
    loose = _compare(y, p_a, p_b, gated=["per_class.glaucoma.auc"], margin=margin)["non_inferiority"]
    assert loose["entries"][0]["passed"] and loose["failures"] == []


def test_each_model_is_decided_by_its_own_thresholds() -> None:
    """The champion outputs p**2 with thresholds t**2: the same calls as the challenger at t (and the same
    ranking), so every threshold and ranking figure is equal. Scored at the challenger's t it would miss findings."""
    y, p, _ = _data()
    thr_b = {c: t**2 for c, t in THR.items()}
    r = _compare(y, p, p**2, thresholds_champion={c: {"threshold": t, "rule": "f1"} for c, t in thr_b.items()})
    for k, e in r["metrics"].items():
        if not k.endswith("ece"):  # calibration differs (p**2 is another probability), nothing else
            assert e["diff"] == pytest.approx(0.0, abs=1e-12) and e["ci_low"] == e["ci_high"] == 0.0, k
    assert r["confusion"]["challenger"] == r["confusion"]["champion"]
    assert r["thresholds"]["champion"] == pytest.approx(thr_b) and r["thresholds"]["challenger"] == THR
    # the test discriminates: at the challenger's thresholds the champion's recall would drop on every finding
    wrong = _compare(y, p, p**2, n_boot=0)
    assert all(wrong["per_class"][c]["recall"]["diff"] > 0.05 for c in FUNDUS)
    # the plain {finding: threshold} form gives the same comparison as the fitted documents
    plain = _compare(y, p, p**2, thresholds_champion=thr_b)
    assert plain["metrics"] == r["metrics"]


def test_patient_clusters_widen_the_paired_cis() -> None:
    """Each patient's row four times (both eyes, two visits): resampling rows treats 4 copies as independent
    evidence, resampling patients does not; the clustered CI of the difference is wider (about twice)."""
    y0, p_a0, p_b0 = _data(n=60, seed=3)
    rep = 4
    y, p_a, p_b = (np.repeat(x, rep, axis=0) for x in (y0, p_a0, p_b0))
    patients = np.repeat([f"pt{i:03d}" for i in range(len(y0))], rep)
    rows = _compare(y, p_a, p_b, n_boot=150)
    clustered = _compare(y, p_a, p_b, n_boot=150, groups=patients)
    assert clustered["clustered"] and clustered["n_units"] == len(y0) and clustered["n"] == len(y)
    assert "patient" in clustered["non_inferiority"]["source"] and "image" in rows["non_inferiority"]["source"]
    for k in ("macro_auc", "macro_f1", "micro_auc"):
        assert clustered["metrics"][k]["diff"] == rows["metrics"][k]["diff"]  # the point does not move
        assert _width(clustered["metrics"][k]) > 1.4 * _width(rows["metrics"][k]), k
    ratio = [_width(clustered["per_class"][c]["auc"]) / _width(rows["per_class"][c]["auc"]) for c in FUNDUS]
    assert float(np.mean(ratio)) > 1.4, ratio


def test_resamples_are_those_of_evaluate_multilabel() -> None:
    """Against a constant champion (AUC 0.5 in every resample where defined) the paired AUC CI is the challenger's
    own CI of `multilabel.evaluate_multilabel` shifted by 0.5: the same draws, rows or patients."""
    y, p_a, _ = _data(n=120, seed=5)
    patients = np.arange(len(y)) // 2
    const = np.full_like(p_a, 0.5)
    r = _compare(y, p_a, const, n_boot=60, seed=11, groups=patients)
    own = multilabel.evaluate_multilabel(y, p_a, FUNDUS, THR, 60, 11, groups=patients)["test"]
    for k in ("macro_auc", *(f"per_class.{c}.auc" for c in FUNDUS)):
        assert r["metrics"][k]["ci_low"] == pytest.approx(own[k]["ci_low"] - 0.5, abs=1e-12), k
        assert r["metrics"][k]["ci_high"] == pytest.approx(own[k]["ci_high"] - 0.5, abs=1e-12), k


def test_a_finding_absent_from_the_test_set_is_undefined_and_skipped() -> None:
    y, p_a, p_b = _data(n=120)
    y[:, FUNDUS.index("cataract")] = 0  # no cataract among these images: its AUC and AP are undefined
    gated = ["per_class.cataract.auc", "per_class.glaucoma.auc"]
    r = _compare(y, p_a, p_b, gated=gated, n_boot=30)
    text = json.dumps(r, allow_nan=False)  # strict JSON: None, never NaN
    assert "NaN" not in text
    assert r["per_class"]["cataract"]["auc"] == dict.fromkeys(("challenger", "champion", "diff", "ci_low", "ci_high"))
    skipped, checked = r["non_inferiority"]["entries"]
    assert skipped["metric"] == "per_class.cataract.auc" and skipped["skipped"] and "absent" in skipped["note"]
    assert checked["metric"] == "per_class.glaucoma.auc" and "passed" in checked
    assert "1 skipped" in comparison_markdown(r)


def test_inputs_that_do_not_pair_are_refused() -> None:
    y, p_a, p_b = _data(n=40)
    with pytest.raises(ValueError, match="champion's probabilities have shape"):
        _compare(y, p_a, p_b[:-1])
    with pytest.raises(ValueError, match="missing \\['cataract'\\]"):
        _compare(y, p_a, p_b, thresholds_champion={c: t for c, t in THR.items() if c != "cataract"})
    with pytest.raises(ValueError, match="not multi-label figures"):
        _compare(y, p_a, p_b, gated=["per_class.cateract.auc"])  # a typo is no silent skip
    with pytest.raises(ValueError, match="lower-is-better"):
        _compare(y, p_a, p_b, gated=["hamming_loss"])
    with pytest.raises(ValueError, match="n >= 0 resamples"):
        _compare(y, p_a, p_b, n_boot=-1)


def test_comparison_markdown_lists_each_finding_with_its_deltas() -> None:
    y, p_b, _ = _data(n=200)
    p_a = p_b.copy()
    g = FUNDUS.index("glaucoma")
    p_a[:, g] = np.clip(0.5 * p_b[:, g] + 0.5 * np.random.default_rng(1).random(len(y)), 0, 1)
    r = _compare(y, p_a, p_b, gated=["per_class.glaucoma.auc", "macro_auc"], n_boot=40)
    md = comparison_markdown(r)
    lines = md.splitlines()
    assert lines[0].startswith("| finding | AUC challenger | AUC champion | Δ AUC (95 % CI)")
    assert "Δ sensitivity (95 % CI)" in lines[0] and lines[1].count("|") == 8
    glaucoma = r["per_class"]["glaucoma"]
    row = next(line for line in lines if line.startswith("| glaucoma |"))
    auc, sens = glaucoma["auc"], glaucoma["recall"]
    assert f"{auc['diff']:+.3f} ({auc['ci_low']:+.3f} to {auc['ci_high']:+.3f})" in row
    assert f"{sens['diff']:+.3f} ({sens['ci_low']:+.3f} to {sens['ci_high']:+.3f})" in row
    assert all(any(line.startswith(f"| {c} |") for line in lines) for c in FUNDUS)
    assert any(line.startswith("| **macro AUC** |") for line in lines)
    assert "each model at its own per-finding thresholds" in md
    passed = sum(e["passed"] for e in r["non_inferiority"]["entries"])
    assert f"{passed}/2 gated metrics pass" in md
    assert all(f"- {f}" in md for f in r["non_inferiority"]["failures"]) and r["non_inferiority"]["failures"]
