"""What a reviewer reads before promoting: the MLflow version description and the Grad-CAM captions."""

from __future__ import annotations

import pytest

from medclf.release.model_card import version_description

GATES = {
    "threshold": 0.7123258113861084,
    "threshold_rule": "target_sensitivity",
    "gates": [
        {"name": "min_f1", "metric": "f1", "op": ">=", "bound": 0.7, "value": 0.9323843416370107, "passed": True},
        {
            "name": "min_recall",
            "metric": "recall",
            "op": ">=",
            "bound": 0.8,
            "value": 0.8972602739726028,
            "passed": True,
        },
    ],
    "non_inferiority": {
        "margin": 0.02,
        "skipped": False,
        "entries": [
            {
                "metric": "f1",
                "value": 0.9323843416370107,
                "champion": 0.9395017793594306,
                "margin": 0.02,
                "bound": 0.9195017793594306,
                "op": ">=",
                "passed": True,
            },
            {
                "metric": "recall",
                "value": 0.8972602739726028,
                "champion": 0.9041095890410958,
                "margin": 0.02,
                "bound": 0.8841095890410958,
                "op": ">=",
                "passed": True,
            },
        ],
    },
    "champion": {"alias": "champion", "checked": True, "version": "1"},
}
METRICS = {
    "test": {
        "n": 290,
        "roc_auc": 0.99453,
        "roc_auc_ci_low": 0.9871,
        "roc_auc_ci_high": 0.99871,
        "recall": 0.89726,
        "recall_ci_low": 0.8421,
        "recall_ci_high": 0.9437,
        "specificity": 0.97222,
        "f1": 0.93238,
        "precision": 0.97037,
    }
}
PROV = {
    "raw_data_md5": "4deab90289cf8d06502afe821e154304.dir",
    "raw_data_nfiles": "1441",
    "raw_data": "data/raw/chest_xray",
    "git_commit": "4d5eb174",
    "positive_class": "PNEUMONIA",
}


def test_description_gives_cis_champion_operating_point_gates_and_data():
    md = version_description(GATES, METRICS, PROV, "run123")
    assert md.startswith("**Research use only.**")
    assert "| ROC-AUC | **0.995** | 0.987–0.999 |  |" in md
    # the champion's value on the same test set, beside the challenger's
    assert "| sensitivity (recall) | **0.897** | 0.842–0.944 | 0.904 |" in md and "champion v1" in md
    assert "threshold 0.7123 on p(PNEUMONIA)" in md and "validation split (target_sensitivity)" in md
    assert "- pass: f1 0.932 >= 0.700 (min_f1)" in md
    assert "- pass: non-inferiority vs champion v1, recall 0.897 >= 0.904 - 0.02" in md
    assert "`4deab90289cf8d06502afe821e154304.dir` over 1441 files" in md and "`run123`" in md
    assert "16 digits" not in md and "0.9323843416370107" not in md  # rounded for reading


def test_description_without_champion_or_dvc_says_so():
    gates = {
        **GATES,
        "non_inferiority": {"skipped": True, "entries": []},
        "champion": {"note": "no champion registered for m"},
    }
    md = version_description(gates, {"test": {"n": 10, "f1": 0.5}}, {}, "r")
    assert "non-inferiority: not checked (no champion registered for m)" in md
    assert "raw data hash unknown" in md and "ROC-AUC" not in md


def test_gradcam_captions_separate_cases_near_the_threshold():
    from medclf.evaluation.report import gallery_caption

    fn, fp = gallery_caption(3, "PNEUMONIA", 0.0071, 0.0093), gallery_caption(9, "PNEUMONIA", 0.0105, 0.0093)
    assert fn == "#3  p(PNEUMONIA)=0.0071 < 0.0093" and fp == "#9  p(PNEUMONIA)=0.0105 >= 0.0093"


def test_training_runs_are_named_by_backbone_data_and_time():
    from medclf.stages.train import run_name

    name = run_name("mobilenet_v2", {"md5": "b19e20b2ecab44d4555c3ec6b6e1b1cb.dir"}, when=0)
    assert name.startswith("train-mobilenet_v2-b19e20b2-") and name != run_name("mobilenet_v2", {}, when=0)
    assert run_name("resnet50", {}, when=0).startswith("train-resnet50-nodvc-")


# ----------------------------------------------------------------------------- challenger versus champion
def _two_models(n: int = 400, seed: int = 3):
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    strong = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)  # overlapping classes: no metric is saturated
    weak = np.clip(0.1 * y + 0.9 * rng.random(n), 0, 1)
    return y, strong, weak


def test_paired_difference_is_exactly_the_loop_over_the_same_resamples():
    """The vectorised paired bootstrap equals the plain loop: same resamples for both models, A minus B."""
    import numpy as np

    from medclf.evaluation import metrics

    y, a, b = _two_models()
    got = metrics.paired_difference_ci(y, a, 0.5, b, 0.4, ["roc_auc", "recall", "specificity"], n_boot=60, seed=5)
    for key in ("roc_auc", "recall", "specificity"):
        diffs = [
            metrics.binary_metrics(y[i], a[i], 0.5)[key] - metrics.binary_metrics(y[i], b[i], 0.4)[key]
            for i in metrics._resample_indices(len(y), 60, 5)
        ]
        lo, hi = np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)
        assert got[key]["ci_low"] == pytest.approx(lo, abs=1e-12) and got[key]["ci_high"] == pytest.approx(
            hi, abs=1e-12
        )
        assert got[key]["diff"] == pytest.approx(
            metrics.binary_metrics(y, a, 0.5)[key] - metrics.binary_metrics(y, b, 0.4)[key]
        )
    assert got["roc_auc"]["ci_low"] > 0.1  # the strong model is clearly better on ranking
    assert 0.7 < metrics.binary_metrics(y, a, 0.5)["roc_auc"] < 0.99  # not saturated: resamples do differ
    same = metrics.paired_difference_ci(y, a, 0.5, a, 0.5, ["roc_auc"], n_boot=50, seed=0)["roc_auc"]
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0  # paired: identical models never differ


def test_description_shows_the_paired_comparison_validation_warnings_links_and_limitations():
    from medclf.evaluation.comparison import paired_differences
    from medclf.release.model_card import run_links

    y, a, b = _two_models()
    gates = {**GATES, "comparison": paired_differences(y, a, 0.5, b, 0.4, n_boot=200, seed=0)}
    links = run_links("http://127.0.0.1:5000", "7", "run123")
    md = version_description(
        gates,
        {"test": {**METRICS["test"], "ece": 0.0412, "brier": 0.0571}},
        {**PROV, "dvc_md5": "aa11.dir"},
        "run123",
        {"warnings": ["near_duplicates"], "offending": {"near_duplicates": 39}},
        links,
    )
    roc = gates["comparison"]["roc_auc"]
    assert (
        f"| ROC-AUC | {roc['challenger']:.3f} | {roc['champion']:.3f} | **{roc['diff']:+.3f}** | "
        f"{roc['ci_low']:+.3f} to {roc['ci_high']:+.3f} |"
    ) in md
    assert "Challenger vs champion v1, both on these test images" in md
    assert "**Calibration:** ECE 0.041, Brier 0.057" in md
    assert "processed dataset (data/ingest) DVC md5 `aa11.dir`" in md
    assert "Validation passed with 1 warning(s): `near_duplicates` (39)" in md
    assert "[training run](#/experiments/7/runs/run123)" in md
    assert "[Grad-CAM gallery](#/experiments/7/runs/run123/artifacts/evaluate/gradcam.png)" in md
    assert "**Limitations:**" in md and "internal, patient-level split" in md
    assert "[all training runs](#/experiments/7?workflowType=machine_learning)" in md
    assert run_links("file:///tmp/mlruns", "7", "r") == {}  # no UI to link to


def test_run_metrics_are_point_values_and_the_cis_go_to_one_table():
    from medclf.evaluation.report import ci_table, run_metrics
    from medclf.infra.tracking import final_step

    doc = {
        "threshold": 0.31,
        "val": {"f1": 0.8, "n": 50},
        "test": {"f1": 0.9, "f1_ci_low": 0.8, "f1_ci_high": 0.95, "tp": 40, "n": 100},
        "test_default_threshold": {"f1": 0.7, "f1_ci_low": 0.6, "f1_ci_high": 0.8, "threshold": 0.5},
    }
    m = run_metrics(doc)
    assert m == {
        "decision_threshold": 0.31,
        "val_f1": 0.8,
        "val_n": 50.0,
        "test_f1": 0.9,
        "test_tp": 40.0,
        "test_n": 100.0,
        "test_t050_f1": 0.7,
        "test_t050_threshold": 0.5,
    }
    assert ci_table(doc) == {
        "metric": ["f1", "f1"],
        "threshold": ["registered", "0.5"],
        "value": [0.9, 0.7],
        "ci_low": [0.8, 0.6],
        "ci_high": [0.95, 0.8],
    }
    assert final_step({"epochs_run": 7}) == 7 and final_step({}) == 0


# ----------------------------------------------------------------------------- against a real MLflow server
def test_experiment_opens_on_training_runs_and_splits_are_dataset_inputs(mlflow_server, tmp_path):
    import mlflow
    import numpy as np

    from medclf.infra.io import file_digest
    from medclf.infra.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, configure
    from medclf.stages.train import Tracker, split_counts

    exp_id = configure(mlflow_server, "review-kind")
    cl = mlflow.MlflowClient(mlflow_server)
    assert cl.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    for split, n in (("train", 5), ("val", 3), ("test", 2)):
        np.save(ingest / f"{split}_images.npy", np.full((n, 4, 4, 1), n, np.uint8))
        np.save(ingest / f"{split}_labels.npy", np.zeros(n, np.int64))
    tracker = Tracker()
    tracker.mlflow, tracker.uri = mlflow, mlflow_server
    with mlflow.start_run(experiment_id=exp_id) as run:
        tracker.datasets(ingest, split_counts(ingest))
    inputs = cl.get_run(run.info.run_id).inputs.dataset_inputs
    got = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(got) == {"training", "validation", "testing"}
    assert got["training"].name == "ingest/train (5 images)" and got["testing"].name == "ingest/test (2 images)"
    # each split its own digest: the test split's is the start of evaluate's test_set_digest
    assert len({d.digest for d in got.values()}) == 3
    test_digest = file_digest(ingest / "test_images.npy", ingest / "test_labels.npy")
    assert got["testing"].digest == test_digest[:32]
    assert f"{ingest}/val_images.npy" in got["validation"].source


def test_identical_model_bytes_and_inputs_from_another_run_are_not_registered_again(mlflow_server):
    """Registry hygiene: a forced rerun that reproduced the same file from the same data finds the old version."""
    import mlflow

    from medclf.release.versions import find_version

    cl, name = mlflow.MlflowClient(mlflow_server, mlflow_server), "review-dedupe"
    cl.create_registered_model(name)
    exp = cl.create_experiment("review-dedupe")
    run1, run2 = cl.create_run(exp).info.run_id, cl.create_run(exp).info.run_id
    inputs = {"test_set_digest": "t1", "raw_data_md5": "r1.dir", "data_digest": "d1"}
    v1 = cl.create_model_version(name, source=f"runs:/{run1}/m", run_id=run1, tags={"model_sha256": "abc", **inputs})
    assert find_version(cl, name, run2, "abc", inputs).version == v1.version  # another run, same bytes and inputs
    assert find_version(cl, name, run1, "abc").version == v1.version  # the same run: reused as before
    assert find_version(cl, name, run2, "abc", {**inputs, "raw_data_md5": "r2.dir"}) is None  # new data
    assert find_version(cl, name, run2, "other", inputs) is None  # different bytes
    assert find_version(cl, name, run2, "abc") is None  # no inputs to compare: never merged across runs


def test_comparison_is_strict_json_when_a_metric_is_undefined():
    """gates.json is a DVC metrics file: an AUC undefined on a one-class test set is null, never NaN."""
    import json

    import numpy as np

    from medclf.evaluation.comparison import comparison_rows, paired_differences

    y, p = np.zeros(20, int), np.linspace(0, 1, 20)
    d = paired_differences(y, p, 0.5, p[::-1], 0.5, n_boot=30, seed=0)
    assert d["roc_auc"] == {"challenger": None, "champion": None, "diff": None, "ci_low": None, "ci_high": None}
    json.dumps(d, allow_nan=False)  # raises on NaN
    assert "| ROC-AUC | n/a | n/a | **n/a** | n/a to n/a |" in comparison_rows(d, "champion v1")


def test_model_card_states_the_recipe_as_it_ran_and_the_json_carries_the_same_facts():
    """The card quotes the training recipe with a `train.tune` choice applied (not params.yaml's value), says
    whether the final fit reproduced the chosen trial, and its JSON twin holds the unrounded figures."""
    from medclf.release.model_card import model_card, model_card_json

    meta = {"classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA", "image_size": 96, "channels": 1}
    train = {
        "backbone": "mobilenet_v2",
        "head_lr": 0.001,
        "dropout": 0.2,
        "seed": 1234,
        "tune": {"trials": 20},
        "input_size": "auto",
    }
    tune = {
        "params": {"head_lr": 0.0042},
        "study": "train-abc",
        "trials": {"complete": 18, "pruned": 2, "fail": 0},
        "best_trial_val_auc": 0.981,
        "final_val_auc": 0.979,
    }
    train_run = {
        "backbone": "mobilenet_v2",
        "weights": "torch",
        "tune": tune,
        "calibration": {"temperature": 1.7},
        "input_size": 128,
    }
    md = model_card("DESCRIPTION", meta, PROV, train_run, {"train": 800, "val": 100, "test": 100}, train)
    assert "input_size `auto (128 px)`" in md  # the size the backbone saw, not just "auto"
    assert "head_lr `0.0042`" in md and "head_lr `0.001`" not in md and "dropout `0.2`" in md
    assert "study `train-abc`" in md and "chosen trial val AUC 0.981, final fit 0.979" in md
    assert "regulatory clearance" in md and md.rstrip().endswith("DESCRIPTION")
    doc = model_card_json(
        meta,
        PROV,
        train_run,
        {"train": 800},
        train,
        GATES,
        METRICS,
        {"warnings": ["cross_split_duplicates"], "offending": {"cross_split_duplicates": 2}},
    )
    assert doc["training_recipe"]["head_lr"] == 0.0042 and doc["training_recipe"]["tuned"]["keys"] == ["head_lr"]
    assert doc["metrics"]["roc_auc"] == {"value": 0.99453, "ci95": [0.9871, 0.99871]} and doc["metrics"]["n"] == 290
    assert doc["operating_point"] == {
        "threshold": GATES["threshold"],
        "rule": "target_sensitivity",
        "chosen_on": "validation",
    }
    assert doc["data"]["validation_warnings"] == {"cross_split_duplicates": 2}
    assert [g["passed"] for g in doc["gates"]] == [True, True] and doc["limitations"]
    assert "tune" not in doc["training_recipe"] and "seed" in doc["training_recipe"]


def test_a_kclass_subgroup_table_has_the_task_figures_not_binary_positives():
    """A multi-class or ordinal task's subgroups (`task.subgroup_metrics`) have no `positives`: the version page's
    table showed them by the binary columns and register failed with KeyError 'positives'."""
    from medclf.release.tables import subgroup_rows

    row = {"n": 40, "support": {"a": 20, "b": 20}, "accuracy": 0.8, "accuracy_ci_low": 0.7, "accuracy_ci_high": 0.9}
    row |= {"balanced_accuracy": 0.75, "macro_auc": None, "qwk": 0.61, "mae": 0.4}
    small = {"n": 9, "support": {"a": 9, "b": 0}, "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_auc": None}
    small |= {"qwk": None, "mae": 0.0, "note": "n < 20: point figures only, no CI"}
    rows = subgroup_rows({"site": {"A": row, "B": small}})
    assert rows[0] == "| subgroup | category | n | accuracy | balanced accuracy | macro ROC-AUC | QWK | MAE | note |"
    assert rows[1].count("|") == rows[0].count("|")
    assert rows[2].startswith("| site | A | 40 | 0.800 (0.700–0.900) | 0.750 |"), rows[2]
    assert rows[3].endswith("| n < 20: point figures only, no CI |") and "positives" not in "\n".join(rows)
