"""Subgroup metrics (issue 13, point 5): declared manifest columns, checked at the source, carried by ingest,
scored per category on the test split at the registered threshold, and shown on the model card."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from medclf.evaluation.metrics import subgroup_metrics
from medclf.evaluation.subgroups import SubgroupError, groups_of_test_split
from medclf.release.model_card import version_description
from medclf.sources.base import SourceError
from medclf.sources.manifest import scan_manifest


def test_subgroup_metrics_match_sklearn_per_category_and_say_too_few():
    """Per category, at the fixed threshold: AUC, sensitivity, specificity and F1 equal scikit-learn's on that
    category's rows, with a bootstrap CI around each; a category under 20 images gets its counts and "too few"
    only; the version page (and so the model card) shows one table row per category."""
    rng = np.random.default_rng(0)
    n = 300
    site = np.array(["A"] * 160 + ["B"] * 128 + ["C"] * 12)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 * y + rng.normal(0.25, 0.2 + 0.4 * (site == "B"), n), 0, 1)  # site B is noisier
    thr = 0.45
    doc = subgroup_metrics(y, p, {"site": site, "sex": np.where(np.arange(n) % 2, "F", "M")}, thr, 200, 0)
    assert list(doc["site"]) == ["A", "B", "C"] and list(doc["sex"]) == ["F", "M"]
    for cat in ("A", "B"):
        m, row = site == cat, doc["site"][cat]
        yt, called = y[m], p[m] >= thr
        assert (row["n"], row["positives"]) == (m.sum(), yt.sum())
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(yt, p[m]))
        assert row["sensitivity"] == pytest.approx(skm.recall_score(yt, called))
        assert row["specificity"] == pytest.approx(skm.recall_score(1 - yt, ~called))
        assert row["f1"] == pytest.approx(skm.f1_score(yt, called))
        for key in ("roc_auc", "sensitivity", "specificity", "f1"):
            assert row[f"{key}_ci_low"] <= row[key] <= row[f"{key}_ci_high"], (cat, key, row)
    assert doc["site"]["A"]["roc_auc"] > doc["site"]["B"]["roc_auc"] + 0.05  # the noisier site is visibly worse
    small = doc["site"]["C"]
    assert small["n"] == 12 and small["note"].startswith("too few") and "roc_auc" not in small
    json.dumps(doc, allow_nan=False)

    md = version_description({"threshold": thr, "gates": []}, {"test": {"n": n}, "subgroups": doc}, {}, "run1")
    a = doc["site"]["A"]
    assert (
        f"| site | A | 160 | {a['positives']} | {a['roc_auc']:.3f} ({a['roc_auc_ci_low']:.3f}–"
        f"{a['roc_auc_ci_high']:.3f}) |"
    ) in md
    assert f"| site | C | 12 | {small['positives']} | too few" in md and "| sex | F | 150 |" in md


def _manifest(tmp_path, **columns) -> str:
    n = 24
    df = pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(n)],
            "label": ["a", "b"] * (n // 2),
            "patient_id": [f"P{i:03d}" for i in range(n)],
            **columns,
        }
    )
    df.to_csv(tmp_path / "labels.csv", index=False)
    return str(tmp_path / "labels.csv")


def test_declared_subgroups_are_checked_at_the_source_manifest(tmp_path):
    """A declared column the manifest lacks is a config error naming the column and the manifest; the patient id
    and identifier-like columns (one value per row) are refused, so only categories are carried."""
    uri = _manifest(tmp_path, sex=["F", "M", ""] * 8, mrn=[f"{100000 + i}" for i in range(24)])
    scan = scan_manifest(uri, None, "image", subgroups=["sex"])
    assert [r.subgroups for r in scan.records[:3]] == [{"sex": "F"}, {"sex": "M"}, {"sex": None}]
    with pytest.raises(SourceError, match=r"column 'site', which the manifest .*labels\.csv lacks"):
        scan_manifest(uri, None, "image", subgroups=["sex", "site"])
    with pytest.raises(SourceError, match=r"'patient_id' cannot be a subgroup"):
        scan_manifest(uri, None, "image", subgroups=["patient_id"])
    with pytest.raises(SourceError, match=r"column 'mrn' .* 24 distinct values in 24 rows: an identifier"):
        scan_manifest(uri, None, "image", subgroups=["mrn"])


def test_test_split_subgroups_follow_the_test_arrays_row_order(tmp_path):
    """Evaluate pairs each test prediction with its category by the manifest's `row`, not by file order."""
    m = pd.DataFrame(
        {
            "split": ["test", "train", "test", "test", None],
            "status": ["ok"] * 4 + ["quarantined"],
            "row": [2, 0, 0, 1, -1],
            "subgroup_site": ["C", "A", "A", None, "Z"],
        }
    )
    m.to_parquet(tmp_path / "manifest.parquet")
    groups = groups_of_test_split(tmp_path / "manifest.parquet", 3)
    assert list(groups) == ["site"] and list(groups["site"]) == ["A", "unknown", "C"]
    with pytest.raises(SubgroupError, match="rerun `medclf ingest`"):
        groups_of_test_split(tmp_path / "manifest.parquet", 4)
    assert groups_of_test_split(tmp_path / "absent.parquet", 3) == {}
