"""A multi-class task through the real stages (issue 24): the 3-class chest X-ray task (normal / bacterial / viral
pneumonia, by file name) on a tiny real subsample is ingested, trained, evaluated by argmax with the family's
gates, and registered with its per-class table, decision rule and task tags. No class's threshold decides it."""

from __future__ import annotations

import json
import re
import shutil
import uuid

import numpy as np
import pytest

from tests.conftest import CHEST_XRAY, KERMANY_REGEX, write_params

pytestmark = pytest.mark.slow
PER_CLASS = 30
CLASSES = ["BACTERIA", "NORMAL", "VIRUS"]


def _label(name: str, folder: str) -> str:
    return "NORMAL" if folder == "NORMAL" else ("VIRUS" if "_virus_" in name else "BACTERIA")


@pytest.fixture(scope="module")
def cxr3(tmp_path_factory, mlflow_server):
    """The project: PER_CLASS images of each class, a manifest `path,label,patient_id`, real ingest/augment/train."""
    if not (CHEST_XRAY / "train").is_dir():
        pytest.skip(f"{CHEST_XRAY}/train absent (../shared/data, see its README)")
    from medclf.config import load_settings
    from medclf.stages import augment, ingest, train, validate

    root = tmp_path_factory.mktemp("cxr3")
    raw = root / "raw"
    (raw / "img").mkdir(parents=True)
    rows, taken = ["path,label,patient_id"], dict.fromkeys(CLASSES, 0)
    for folder in ("NORMAL", "PNEUMONIA"):
        for f in sorted((CHEST_XRAY / "train" / folder).iterdir()):
            label = _label(f.name, folder)
            if taken[label] >= PER_CLASS:
                continue
            taken[label] += 1
            shutil.copy2(f, raw / "img" / f.name)
            pid = re.match(KERMANY_REGEX, f.name)
            rows.append(f"img/{f.name},{label},{pid.group(1) if pid else f.stem}")
    (raw / "labels.csv").write_text("\n".join(rows) + "\n")
    overrides = {
        "paths": {"raw_data": str(raw)},
        "ingest": {
            "source": {"kind": "manifest", "uri": str(raw / "labels.csv")},
            "classes": CLASSES,
            "image_size": 32,
            "splits": {"val_fraction": 0.25, "test_fraction": 0.25},
        },
        "task": {"type": "multiclass", "critical_classes": ["VIRUS"]},
        "validate": {"severity": {"prevalence_gap": "warn", "prevalence_bounds": "warn"}},
        "train": {"head_epochs": 1, "finetune_epochs": 1, "batch_size": 16, "early_stopping_patience": 0},
        "evaluate": {
            "bootstrap": 50,
            "gradcam_n": 0,
            "target_sensitivity": 0.8,
            "gates": {"bounds": {"balanced_accuracy": 0.0, "recall[VIRUS]": 0.0}},
        },
        "register": {"model_name": f"cxr3-{uuid.uuid4().hex[:8]}"},
        "mlflow": {"tracking_uri": mlflow_server},
    }
    settings = load_settings(write_params(root, overrides))
    ingest.run(settings)
    validate.run(settings)
    augment.run(settings)
    train.run(settings)
    return settings


def test_multiclass_is_evaluated_by_argmax_with_per_class_cis_and_the_familys_gates(cxr3):
    from medclf.evaluation import kclass
    from medclf.infra.catalog import load_split
    from medclf.release.serving import load_keras
    from medclf.stages import evaluate

    settings = cxr3
    out = evaluate.run(settings)
    reports = settings.paths.reports_dir
    doc, gates = json.loads((reports / "metrics.json").read_text()), json.loads((reports / "gates.json").read_text())
    assert doc["task"] == gates["task"] == out["task"] == "multiclass" and doc["classes"] == CLASSES
    test = doc["test"]
    for name in (
        "balanced_accuracy",
        "macro_auc",
        "macro_f1",
        "mcc",
        "per_class.VIRUS.recall",
        "critical.VIRUS.sensitivity",
    ):
        assert test[f"{name}_ci_low"] <= test[name] <= test[f"{name}_ci_high"], name
    # the decision is the argmax: recompute the test predictions from the model file itself
    model = load_keras(str(settings.paths.model_dir / "model.keras"))
    x, y = load_split(settings.paths, "test", mmap=False)
    proba = np.asarray(model.predict(x, verbose=0), dtype=float)
    expect = kclass.multiclass_report(y, proba, CLASSES)  # pred = argmax
    assert test["balanced_accuracy"] == pytest.approx(expect["balanced_accuracy"], abs=1e-9)
    assert test["per_class.VIRUS.recall"] == pytest.approx(expect["per_class"]["VIRUS"]["recall"], abs=1e-9)
    assert doc["confusion"]["counts"] == expect["confusion"]["counts"]
    # the gates are the declared map, and the VIRUS flag's threshold came from validation
    assert {g["metric"] for g in gates["gates"]} == {"balanced_accuracy", "per_class.VIRUS.recall"}
    assert gates["decision"]["flags"]["VIRUS"]["threshold"] > 0 and "argmax" in gates["threshold_rule"]
    assert "threshold" not in json.loads((reports / "evaluate.json").read_text())  # no binary threshold headline


def test_multiclass_version_carries_task_rule_and_per_class_table(cxr3):
    from mlflow import MlflowClient

    from medclf.stages import evaluate, register

    settings = cxr3
    evaluate.run(settings)
    out = register.run(settings)
    uri = settings.mlflow.resolved_uri()
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(out["model_name"], str(out["version"]))
    assert mv.tags["task"] == "multiclass" and "argmax" in mv.tags["decision_rule"]
    assert "threshold" not in mv.tags and "positive_class" not in mv.tags
    assert float(mv.tags["metric.balanced_accuracy"]) == pytest.approx(
        json.loads((settings.paths.reports_dir / "metrics.json").read_text())["test"]["balanced_accuracy"], abs=5e-5
    )
    desc = mv.description
    assert "| class | precision | recall (95 % CI) |" in desc and "| VIRUS |" in desc
    assert "**Decision rule (multiclass):**" in desc and "critical-class flag" in desc
    assert "per_class.VIRUS.recall" in desc  # the gate, by the name metrics.json uses


def test_a_kclass_champion_is_rescored_by_its_own_rule_and_compared_paired(cxr3):
    """v1 (registered above, no champion then: its page links no comparison) is promoted; evaluating the same model
    again re-scores the champion from the registry on this test set by its own registered rule, and the paired
    comparison (one set of patient resamples for both) gives every difference as exactly 0 with a [0, 0] CI."""
    from mlflow import MlflowClient

    from medclf.release.registry import promote
    from medclf.stages import evaluate

    settings = cxr3
    uri, name = settings.mlflow.resolved_uri(), settings.registry.model_name
    v1 = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(name, "1")
    assert "[challenger vs champion" not in v1.description and "[Grad-CAM gallery" not in v1.description  # gradcam_n 0
    promote(settings, version=1, by="kclass-test")
    evaluate.run(settings)
    reports = settings.paths.reports_dir
    gates = json.loads((reports / "gates.json").read_text())
    comparison = json.loads((reports / "evaluate" / "champion_comparison.json").read_text())
    assert str(gates["champion"]["version"]) == "1" and comparison["decisions"]["champion"]["rule"]
    assert (reports / "evaluate" / "champion_comparison.png").stat().st_size > 1000
    ni = gates["non_inferiority"]
    assert ni["paired"] and not ni.get("skipped") and gates["passed"], ni
    assert {e["metric"] for e in ni["entries"]} == {"balanced_accuracy", "per_class.VIRUS.recall"}
    for metric in ("balanced_accuracy", "per_class.VIRUS.recall", "macro_auc", "per_class.NORMAL.f1"):
        e = comparison["metrics"][metric]
        assert e["diff"] == e["ci_low"] == e["ci_high"] == 0.0, (metric, e)
    assert comparison["confusion"]["challenger"] == comparison["confusion"]["champion"]
    assert (
        comparison["clustered"] and comparison["n"] == json.loads((reports / "metrics.json").read_text())["test"]["n"]
    )
