"""A multi-label task through the real stages (issue 25): fundus findings of a tiny real ODIR subsample (both eyes
of each patient, per-eye 0/1 columns) are ingested by patient, validated, augmented, trained with one sigmoid per
finding, evaluated with one validation-fitted threshold per finding, and registered with the per-finding table."""

from __future__ import annotations

import csv
import json
import shutil
import uuid

import numpy as np
import pytest

from tests.conftest import SHARED, write_params

pytestmark = pytest.mark.slow
ODIR = SHARED / "data" / "fundus_odir"
LABELS = ["normal", "diabetic_retinopathy", "cataract", "glaucoma"]
PER_LABEL = 16  # patients picked for each finding (some eyes carry several)


@pytest.fixture(scope="module")
def odir(tmp_path_factory, mlflow_server):
    if not (ODIR / "labels.csv").is_file():
        pytest.skip(f"{ODIR}/labels.csv absent (../shared/data, see its README)")
    from medclf.config import load_settings
    from medclf.stages import augment, ingest, train, validate

    with open(ODIR / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    chosen: list[str] = []
    for label in LABELS:  # the first PER_LABEL patients with an eye carrying it (both eyes kept)
        have = [p for p, eyes in by_patient.items() if any(e[label] == "1" for e in eyes) and p not in chosen]
        chosen += have[:PER_LABEL]
    root = tmp_path_factory.mktemp("odir")
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    fields = list(rows[0])
    with open(raw / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for p in chosen:
            for eye in by_patient[p]:
                shutil.copy2(ODIR / eye["path"], raw / eye["path"])
                w.writerow(eye)
    overrides = {
        "paths": {"raw_data": str(raw)},
        "ingest": {
            "source": {"kind": "manifest", "uri": str(raw / "labels.csv"), "group_column": "patient_id"},
            "image_size": 32,
            "channels": 3,
            "modality": "fundus",
            "splits": {"val_fraction": 0.25, "test_fraction": 0.25},
        },
        "task": {"type": "multilabel", "labels": LABELS, "label_rules": {"cataract": "f1"}},
        "validate": {"severity": {"prevalence_gap": "warn", "prevalence_bounds": "warn"}},
        "augment": {"balance": False},
        "train": {"head_epochs": 1, "finetune_epochs": 1, "batch_size": 16, "early_stopping_patience": 0},
        "evaluate": {
            "bootstrap": 50,
            "gradcam_n": 0,
            "target_sensitivity": 0.8,
            "robustness": {"enabled": False},
            "gates": {"bounds": {"macro_auc": 0.0, "auc[cataract]": 0.0}},
        },
        "register": {"model_name": f"odir-{uuid.uuid4().hex[:8]}"},
        "mlflow": {"tracking_uri": mlflow_server},
    }
    settings = load_settings(write_params(root, overrides))
    ingest.run(settings)
    validate.run(settings)
    augment.run(settings)
    train.run(settings)
    return settings, raw


def test_ingest_keeps_each_eyes_findings_and_each_patient_in_one_split(odir):
    import pandas as pd

    from medclf.infra import catalog

    settings, raw = odir
    meta = catalog.CLASSES.load(settings.paths)
    assert meta["classes"] == LABELS and meta.get("task") == "multilabel"
    m = pd.read_parquet(catalog.MANIFEST.path(settings.paths))
    assert m.groupby("patient_hash")["split"].nunique().max() == 1  # both eyes of a patient in one split
    for split in ("train", "val", "test"):
        y = catalog.LABELS.load(settings.paths, split=split)
        assert y.shape == (int((m.split == split).sum()), len(LABELS)) and set(np.unique(y)) <= {0, 1}
        strings = m[m.split == split].sort_values("row")["label"].tolist()
        assert strings == [";".join(c for c, v in zip(LABELS, row, strict=True) if v) for row in y]


def test_evaluate_fits_one_threshold_per_finding_on_validation_and_reports_cis(odir):
    import pandas as pd

    from medclf.evaluation import multilabel
    from medclf.infra.catalog import load_split
    from medclf.release.serving import load_keras
    from medclf.stages import evaluate

    settings, _ = odir
    out = evaluate.run(settings)
    reports = settings.paths.reports_dir
    doc, gates = json.loads((reports / "metrics.json").read_text()), json.loads((reports / "gates.json").read_text())
    assert doc["task"] == gates["task"] == out["task"] == "multilabel" and doc["classes"] == LABELS
    test = doc["test"]
    for name in ("macro_auc", "map", "macro_f1", "per_class.cataract.auc", "per_class.glaucoma.recall"):
        assert test[f"{name}_ci_low"] <= test[name] <= test[f"{name}_ci_high"], name
    thr = doc["decision"]["thresholds"]
    assert sorted(thr) == sorted(LABELS) and thr["cataract"]["rule"] == "f1" and thr["glaucoma"]["target"] == 0.8
    # the thresholds are the validation split's (recomputed from the model file), each applied to its own column
    model = load_keras(str(settings.paths.model_dir / "model.keras"))
    xv, yv = load_split(settings.paths, "val", mmap=False)
    pv = evaluate.predict_proba(model, xv)  # as evaluate batches them: a barely trained model's scores tie closely
    again = multilabel.fit_thresholds(yv, pv, LABELS, "target_sensitivity", {"cataract": "f1"}, 0.8)
    assert {c: round(t["threshold"], 5) for c, t in again.items()} == {
        c: round(t["threshold"], 5) for c, t in thr.items()
    }
    x, y = load_split(settings.paths, "test", mmap=False)
    p = evaluate.predict_proba(model, x)
    point = multilabel.multilabel_report(y, p, LABELS, [thr[c]["threshold"] for c in LABELS])
    assert test["macro_auc"] == pytest.approx(point["macro_auc"], abs=1e-6)
    preds = pd.read_csv(reports / "evaluate" / "test_predictions.csv")
    called = preds["labels"].fillna("").tolist()
    assert called == [
        ";".join(c for j, c in enumerate(LABELS) if p[i, j] >= thr[c]["threshold"]) for i in range(len(p))
    ]
    assert (reports / "evaluate" / "roc.png").exists() and (reports / "evaluate" / "pr.png").exists()


def test_register_creates_a_multilabel_version_with_its_rule_and_table(odir):
    from mlflow import MlflowClient

    from medclf.stages import evaluate, register

    settings, _ = odir
    evaluate.run(settings)
    out = register.run(settings)
    uri = settings.mlflow.resolved_uri()
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(out["model_name"], str(out["version"]))
    assert mv.tags["task"] == "multilabel" and "cataract" in mv.tags["decision_rule"]
    assert "metric.macro_auc" in mv.tags and "metric.map" in mv.tags
    assert "glaucoma" in mv.description and "threshold" in mv.description
