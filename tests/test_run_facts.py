"""Issue 27: the key facts of a training run and of its registered version, one name each, readable.

The version's tags are a short deduplicated set (no JSON, at most 4 decimals); the settings that decide a release
are run params, logged once; every split is a dataset input with its own digest and true count; every run metric
is under a group prefix (`train/`, `val/`, `test/`, `test_t050/`, `system/`), so `auc` means one thing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from medclf.config import Settings
from medclf.infra import tracking
from medclf.release import registry, versions
from medclf.stages.register import version_tags

GATES = {
    "passed": True,
    "threshold": 0.2696778178215027,
    "threshold_rule": "target_sensitivity",
    "model_sha256": "a" * 64,
    "test_set_digest": "b" * 64,
    "non_inferiority": {"skipped": False, "entries": [{"metric": "f1", "passed": True}]},
}
TEST = {
    "roc_auc": 0.9912345678,
    "roc_auc_ci_low": 0.98,
    "roc_auc_ci_high": 0.995,
    "f1": 0.93238434163701,
    "recall": 0.95205479452,
    "specificity": 0.80128205128,
    "precision": 0.9,
    "tp": 139,
    "n": 390,
}
DOC = {
    "threshold": GATES["threshold"],
    "val": {"sensitivity": 0.95, "specificity": 0.8, "f1": 0.9, "n": 130},
    "test": TEST,
    "test_default_threshold": {"f1": 0.91, "recall": 0.9, "f1_ci_low": 0.8, "f1_ci_high": 0.95, "threshold": 0.5},
}
META = {"classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA", "image_size": 96, "channels": 1}
TRAIN_RUN = {"run_id": "r" * 32, "backbone": "mobilenet_v2", "git_commit": "4d5eb174"}
PROVENANCE = {
    "raw_data_md5": "c" * 32 + ".dir",
    "raw_data_nfiles": "1441",
    "raw_data": "data/raw/chest_xray",
    "git_commit": "4d5eb174",
    "data_digest": "d" * 32,
    "dvc_md5": "e" * 32 + ".dir",
    "params_hash": "f" * 16,
}
BINARY_TAGS = {
    "train_run_id",
    "model_sha256",
    "test_set_digest",
    "gates",
    "non_inferiority",
    "classes",
    "image_size",
    "channels",
    "backbone",
    "threshold",
    "threshold_rule",
    "positive_class",
    "metric.roc_auc",
    "metric.f1",
    "metric.recall",
    "metric.specificity",
    *PROVENANCE,
}
"""The binary version's tags (23; `create_version` adds `keras_model_uri`): before issue 27 there were 30."""
_LONG_DECIMAL = re.compile(r"\d\.\d{5,}")


def _assert_readable(tags: dict[str, str]) -> None:
    for key, value in tags.items():
        assert not value.lstrip().startswith(("{", "[")), (key, value)  # no JSON: documents are run artifacts
        assert not _LONG_DECIMAL.search(value), (key, value)  # at most 4 decimals


# ----------------------------------------------------------------------------- the version's tags
def test_binary_version_tags_are_one_short_name_per_fact():
    tags = version_tags(GATES, {"test": TEST}, META, TRAIN_RUN, PROVENANCE)
    assert set(tags) == BINARY_TAGS, set(tags) ^ BINARY_TAGS
    # the duplicates of issue 27 are gone: one gate word, one commit, one metric family
    assert not {"gates_passed", "train_git_commit", "auc", "f1", "sensitivity", "specificity"} & set(tags)
    _assert_readable(tags)
    assert tags["threshold"] == "0.2697" and tags["metric.roc_auc"] == "0.9912" and tags["metric.f1"] == "0.9324"
    assert tags["classes"] == "NORMAL,PNEUMONIA" and tags["gates"] == "passed" and tags["git_commit"] == "4d5eb174"


def test_kclass_version_tags_carry_the_task_and_rounded_gated_metrics():
    gates = {
        **{k: v for k, v in GATES.items() if k != "threshold"},
        "task": "ordinal",
        "threshold_rule": "expected_grade",
        "gates": [{"metric": "recall[mel]"}],
    }
    test = {"balanced_accuracy": 0.81234567, "macro_auc": 0.9, "macro_f1": 0.7, "accuracy": 0.8, "qwk": 0.777777}
    test |= {"mae": 0.3333333, "recall[mel]": 0.756789}
    meta = {**META, "classes": ["a", "b", "c"]}
    tags = version_tags(gates, {"test": test}, meta, TRAIN_RUN, PROVENANCE)
    _assert_readable(tags)
    assert {"task", "decision_rule"} <= set(tags) and not {"threshold", "positive_class"} & set(tags)
    metric_tags = {k for k in tags if k.startswith(versions.TAG_METRIC)}
    assert metric_tags == {f"metric.{k}" for k in test}
    assert not {"balanced_accuracy", "qwk", "macro_auc"} & set(tags)  # no bare 3-decimal duplicates
    assert tags["metric.recall[mel]"] == "0.7568" and tags["classes"] == "a,b,c"


def test_champion_reads_rounded_metric_tags_and_both_classes_spellings():
    """The non-inferiority gate reads the 4-decimal `metric.*` tags; an older version's JSON `classes` still reads."""

    class Version:
        def __init__(self, tags: dict[str, str]) -> None:
            self.tags = tags

    tags = version_tags(GATES, {"test": TEST}, META, TRAIN_RUN, PROVENANCE)
    stored = registry.version_metrics(Version(tags))
    assert stored == pytest.approx({k: TEST[k] for k in ("roc_auc", "f1", "recall", "specificity")}, abs=5e-5)
    assert registry._tag_classes(Version(tags)) == META["classes"]
    assert registry._tag_classes(Version({"classes": json.dumps(META["classes"])})) == META["classes"]
    assert registry._tag_classes(Version({})) is None
    # a class name with a comma cannot be told apart when joined: that one tag stays a JSON list
    odd = ["benign", "malignant, high grade"]
    assert versions.read_classes(versions.tag_classes(odd)) == odd


# ----------------------------------------------------------------------------- the run's params and datasets
def test_release_and_ingest_settings_are_params():
    s = Settings()
    params = tracking.release_params(s)
    assert params["evaluate.target_sensitivity"] == str(s.evaluate.target_sensitivity)
    assert params["evaluate.threshold_rule"] == s.evaluate.threshold_rule
    assert params["evaluate.bootstrap"] == str(s.evaluate.bootstrap)
    assert params["evaluate.gates.min_recall"] == str(s.evaluate.gates.min_recall)
    assert params["evaluate.gates.non_inferiority_margin"] == str(s.evaluate.gates.non_inferiority_margin)
    assert {"evaluate.gates.min_f1", "evaluate.gates.min_auc", "evaluate.gates.min_specificity"} <= set(params)
    # a class gate's key is no valid MLflow name as it is: `log_params_once` logs it as this
    assert tracking.param_key("evaluate.gates.bounds.recall[VIRUS (a,b)]") == "evaluate.gates.bounds.recall.VIRUS _a_b_"
    ingest = tracking.ingest_params(s.ingest)
    assert ingest["ingest.splits.seed"] == str(s.ingest.splits.seed)
    assert {"ingest.splits.val_fraction", "ingest.splits.test_fraction", "ingest.image_size"} <= set(ingest)
    assert ingest["ingest.source.patient_id_regex"] == s.ingest.source.patient_id_regex


def test_split_digests_differ_and_counts_are_the_npy_lengths(tmp_path):
    from medclf.training.data import Data, split_counts
    from medclf.training.tracker import run_params

    for split, n in (("train", 7), ("val", 3), ("test", 2)):
        np.save(tmp_path / f"{split}_images.npy", np.zeros((n, 4, 4, 1), np.uint8))
        np.save(tmp_path / f"{split}_labels.npy", np.arange(n) % 2)
    digests = {split: tracking.split_digest(tmp_path, split) for split in ("train", "val", "test")}
    assert len(set(digests.values())) == 3 and all(digests.values())
    assert digests["test"] == versions_digest(tmp_path)  # evaluate's test_set_digest
    assert tracking.split_digest(tmp_path, "missing") == ""
    counts = split_counts(tmp_path)
    assert counts == {"train": 7, "val": 3, "test": 2}
    # augment balanced the 7 real training images to 10 rows, 3 of them synthetic
    data = Data(
        np.zeros((10, 4, 4, 1), np.uint8), np.arange(10) % 2, np.zeros((3, 4, 4, 1)), np.arange(3) % 2,
        ["a", "b"], "b", 4, 1, 3,
    )  # fmt: skip
    s = Settings()
    digest = {"data_digest": "x"}
    params = run_params(s, s.train, data, counts, {"ingest": digest, "augment": digest})
    assert (params["data.n_train"], params["data.n_val"], params["data.n_test"]) == (7, 3, 2)
    assert (params["data.n_train_augmented"], params["data.n_synthetic"]) == (10, 3)
    assert not [k for k in params if k.startswith("ingest.")]  # evaluate logs those: train does not declare them


def versions_digest(ingest) -> str:
    from medclf.infra.io import file_digest

    return file_digest(ingest / "test_images.npy", ingest / "test_labels.npy")


def test_params_are_logged_once_and_a_changed_setting_becomes_a_tag(mlflow_server):
    """`dvc repro` re-running evaluate with another target sensitivity on the same training run: MLflow params are
    immutable, so the first value stays the param and the value used now is a tag of the same name."""
    import mlflow

    cl = mlflow.MlflowClient(mlflow_server)
    run_id = cl.create_run(cl.create_experiment("run-facts-params")).info.run_id
    s = Settings()
    s = s.model_copy(update={"evaluate": s.evaluate.model_copy(update={"gates": s.evaluate.gates.model_copy(
        update={"bounds": {"recall[mel]": 0.7}})})})  # fmt: skip
    assert tracking.log_params_once(cl, run_id, tracking.release_params(s)) == {}
    assert cl.get_run(run_id).data.params["evaluate.gates.bounds.recall.mel"] == "0.7"
    changed = s.model_copy(update={"evaluate": s.evaluate.model_copy(update={"target_sensitivity": 0.9})})
    assert tracking.log_params_once(cl, run_id, tracking.release_params(changed)) == {
        "evaluate.target_sensitivity": "0.9"
    }
    run = cl.get_run(run_id)
    assert run.data.params["evaluate.target_sensitivity"] == "0.95"
    assert run.data.tags["evaluate.target_sensitivity"] == "0.9"
    assert run.data.params["evaluate.gates.min_recall"] == str(s.evaluate.gates.min_recall)
    tracking.log_params_once(cl, run_id, tracking.release_params(s))  # back to the param's value: no tag
    assert "evaluate.target_sensitivity" not in cl.get_run(run_id).data.tags


# ----------------------------------------------------------------------------- the run's metric names
_VALID_METRIC = re.compile(r"^[\w\-. /]+$")


def _assert_grouped(keys: list[str]) -> None:
    for key in keys:
        assert key.startswith(tracking.METRIC_PREFIXES), key
        assert _VALID_METRIC.match(key), key


def test_every_run_metric_is_under_a_group_prefix():
    from medclf.evaluation.report import run_metrics
    from medclf.training.tracker import epoch_metrics, summary_metrics

    row = {
        "epoch": 3,
        "phase": 2,
        "loss": 0.2,
        "auc": 0.988,
        "val_loss": 0.3,
        "val_auc": 0.97,
        "lr": 1e-4,
        "data_wait_fraction": 0.1,
        "seconds": 4.2,
        "images_per_second": 180.0,
        "attempt": 1,
    }
    epoch = epoch_metrics(row)
    assert epoch == {
        "train/loss": 0.2,
        "train/auc": 0.988,
        "train/lr": 1e-4,
        "val/loss": 0.3,
        "val/auc": 0.97,
        "system/epoch_seconds": 4.2,
        "system/epoch_data_wait_fraction": 0.1,
        "system/epoch_images_per_second": 180.0,
    }
    result = {"best_val_auc": 0.97, "epochs_run": 4, "data_wait_fraction": 0.1, "images_per_second": 181.0}
    summary = summary_metrics(result | {"time_to_first_step_s": 9.0, "seconds": 30.0}, {"temperature": 1.3})
    evaluate = [tracking.evaluate_metric_key(k) for k in run_metrics(DOC)]
    _assert_grouped([*epoch, *summary, *evaluate])
    assert len(set(evaluate)) == len(evaluate)
    # `auc` means one thing per group: the test AUC is `test/roc_auc`, the last epoch's training AUC `train/auc`
    assert {"test/roc_auc", "test/f1", "test/threshold", "test_t050/f1", "val/sensitivity"} <= set(evaluate)
    assert "auc" not in {k.rsplit("/", 1)[-1] for k in evaluate}
    assert summary["val/best_auc"] == 0.97 and summary["system/images_per_second"] == 181.0
