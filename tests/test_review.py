"""What a reviewer reads before promoting: the MLflow version description and the Grad-CAM captions."""

from __future__ import annotations

from medclf.stages.register import version_description

GATES = {
    "threshold": 0.7123258113861084, "threshold_rule": "target_sensitivity",
    "gates": [{"name": "min_f1", "metric": "f1", "op": ">=", "bound": 0.7, "value": 0.9323843416370107,
               "passed": True},
              {"name": "min_recall", "metric": "recall", "op": ">=", "bound": 0.8, "value": 0.8972602739726028,
               "passed": True}],
    "non_inferiority": {"margin": 0.02, "skipped": False, "entries": [
        {"metric": "f1", "value": 0.9323843416370107, "champion": 0.9395017793594306, "margin": 0.02,
         "bound": 0.9195017793594306, "op": ">=", "passed": True},
        {"metric": "recall", "value": 0.8972602739726028, "champion": 0.9041095890410958, "margin": 0.02,
         "bound": 0.8841095890410958, "op": ">=", "passed": True}]},
    "champion": {"alias": "champion", "checked": True, "version": "1"},
}
METRICS = {"test": {"n": 290, "roc_auc": 0.99453, "roc_auc_ci_low": 0.9871, "roc_auc_ci_high": 0.99871,
                    "recall": 0.89726, "recall_ci_low": 0.8421, "recall_ci_high": 0.9437, "specificity": 0.97222,
                    "f1": 0.93238, "precision": 0.97037}}
PROV = {"raw_data_md5": "4deab90289cf8d06502afe821e154304.dir", "raw_data_nfiles": "1441",
        "raw_data": "data/raw/chest_xray", "git_commit": "4d5eb174", "positive_class": "PNEUMONIA"}


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
    gates = {**GATES, "non_inferiority": {"skipped": True, "entries": []},
             "champion": {"note": "no champion registered for m"}}
    md = version_description(gates, {"test": {"n": 10, "f1": 0.5}}, {}, "r")
    assert "non-inferiority: not checked (no champion registered for m)" in md
    assert "raw data hash unknown" in md and "ROC-AUC" not in md


def test_gradcam_captions_separate_cases_near_the_threshold():
    from medclf.stages.evaluate import gallery_caption

    fn, fp = gallery_caption(3, "PNEUMONIA", 0.0071, 0.0093), gallery_caption(9, "PNEUMONIA", 0.0105, 0.0093)
    assert fn == "#3  p(PNEUMONIA)=0.0071 < 0.0093" and fp == "#9  p(PNEUMONIA)=0.0105 >= 0.0093"


def test_training_runs_are_named_by_backbone_data_and_time():
    from medclf.stages.train import run_name

    name = run_name("mobilenet_v2", {"md5": "b19e20b2ecab44d4555c3ec6b6e1b1cb.dir"}, when=0)
    assert name.startswith("train-mobilenet_v2-b19e20b2-") and name != run_name("mobilenet_v2", {}, when=0)
    assert run_name("resnet50", {}, when=0).startswith("train-resnet50-nodvc-")
