"""evaluate stage: outputs checked against scikit-learn, threshold provably from validation only,
gates at their exact boundaries, metrics logged into the training run on a real MLflow server.

The model is a real (tiny) Keras model of the train stage's contract structure, fitted a few
epochs on the synthetic phantoms; `build_project` is reused by test_register and test_serve.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from medclf.config import deep_merge
from tests.conftest import free_port, write_params

# ----------------------------------------------------------------------------- shared helpers


def tiny_model(image_size: int, channels: int, k: int, seed: int = 0, backbone: str = "cnn"):
    """input -> Rescaling (+ grey->RGB) -> nested "backbone" -> "pool" -> "dropout" -> "classifier".

    backbone="mobilenet" is keras.applications.MobileNetV2(alpha=0.35, weights=None), the train
    stage's default; "cnn" is a three-block nested CNN of the same contract whose training graph
    traces in seconds instead of ~80 s on a loaded 2-core runner (used wherever a fit is needed).
    """
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((image_size, image_size, channels), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    if channels == 1:
        x = keras.layers.Concatenate(name="to_rgb")([x, x, x])
    if backbone == "mobilenet":
        base = keras.applications.MobileNetV2(
            alpha=0.35, weights=None, include_top=False, input_shape=(image_size, image_size, 3)
        )
        base.name = "backbone"
    else:
        b_in = keras.Input((image_size, image_size, 3))
        h = b_in
        for i, filters in enumerate((8, 16, 32)):
            h = keras.layers.Conv2D(filters, 3, strides=2 if i else 1, padding="same", use_bias=False)(h)
            h = keras.layers.BatchNormalization(momentum=0.5)(h)
            h = keras.layers.ReLU()(h)
        base = keras.Model(b_in, h, name="backbone")
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    out = keras.layers.Dense(k, activation="softmax", name="classifier")(x)
    return keras.Model(inp, out, name="medclf_tiny")


def train_tiny(settings, epochs: int = 5, seed: int = 0) -> Path:
    """Fit the tiny model on the train split and save `model_dir/model.keras` (the train contract)."""
    import keras

    from medclf.infra.catalog import load_split

    meta = json.loads((settings.paths.ingest_dir / "classes.json").read_text())
    x, y = load_split(settings.paths, "train", mmap=False)
    model = tiny_model(meta["image_size"], meta["channels"], len(meta["classes"]), seed)
    # jit_compile=False: XLA compilation of MobileNetV2 costs ~a minute on 2 CPU cores
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", jit_compile=False)
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    settings.paths.model_dir.mkdir(parents=True, exist_ok=True)
    path = settings.paths.model_dir / "model.keras"
    model.save(path)
    return path


def write_train_run(
    settings, tracking_uri: str | None, experiment: str = "medclf-tests", calibration: dict | None = None
) -> dict:
    """What the train stage leaves behind: a (finished) MLflow run and train_run.json pointing to it."""
    meta = json.loads((settings.paths.ingest_dir / "classes.json").read_text())
    from medclf.infra.tracking import data_version, git_commit

    info = {
        "run_id": None,
        "experiment_id": None,
        "tracking_uri": tracking_uri,
        "backbone": "mobilenet_v2",
        **meta,
        "data_version": data_version(settings.paths.ingest_dir),
        "git_commit": git_commit(),
        **({"calibration": calibration} if calibration else {}),
    }
    if tracking_uri:
        from mlflow import MlflowClient

        cl = MlflowClient(tracking_uri=tracking_uri)
        exp = cl.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else cl.create_experiment(experiment)
        run = cl.create_run(exp_id, run_name="tiny-train")
        cl.log_param(run.info.run_id, "backbone", "mobilenet_v2")
        cl.set_terminated(run.info.run_id, "FINISHED")
        info.update(run_id=run.info.run_id, experiment_id=exp_id)
    (settings.paths.model_dir / "train_run.json").write_text(json.dumps(info))
    return info


def build_project(root: Path, tracking_uri: str | None, overrides: dict | None = None, calibrate: bool = False):
    """ingest (real, synthetic phantoms 32x32) + tiny trained model + train run; returns Settings.

    calibrate: as train does, fit a temperature on the val predictions and fold it into model.keras
    (train_run.json records it under `calibration`)."""
    from medclf.config import load_settings
    from medclf.stages import ingest

    base = {
        "evaluate": {"bootstrap": 100, "gradcam_n": 2},
        "register": {"model_name": f"medclf-test-{uuid.uuid4().hex[:8]}"},
        "mlflow": {"tracking_uri": tracking_uri or f"http://127.0.0.1:{free_port()}"},
    }
    root.mkdir(parents=True, exist_ok=True)
    settings = load_settings(write_params(root, deep_merge(base, overrides or {})))
    ingest.run(settings)
    path = train_tiny(settings)
    record = calibrate_tiny(settings, path) if calibrate else None
    write_train_run(settings, tracking_uri, calibration=record)
    return settings


def calibrate_tiny(settings, path: Path) -> dict:
    """What train's `calibrate_export` does, on the tiny model: T from val only, folded into the saved file."""
    from medclf.evaluation import calibration
    from medclf.infra.catalog import load_split
    from medclf.release.serving import load_keras

    model = load_keras(str(path))
    xv, yv = load_split(settings.paths, "val", mmap=False)
    record = calibration.calibrate(yv, np.asarray(model.predict(xv, verbose=0), float))
    calibration.fold_into_classifier(model, record["temperature"])
    model.save(path)
    return record


def with_overrides(settings, root: Path, overrides: dict):
    """The same project (same paths, model name, server) with some params changed."""
    from medclf.config import load_settings

    data = deep_merge(settings.model_dump(mode="json", by_alias=True), overrides)
    path = root / f"params-{uuid.uuid4().hex[:6]}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    return load_settings(path)


def copy_project(settings, root: Path, dest: Path, overrides: dict | None = None):
    """A copy of the ingest output and model under `dest` (to perturb files without side effects)."""
    shutil.copytree(settings.paths.ingest_dir, dest / "data/ingest")
    shutil.copytree(settings.paths.model_dir, dest / "models")
    run_file = dest / "models" / "train_run.json"  # keep the real training run free of these metrics
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "run_id": None}))
    paths = {
        "ingest_dir": str(dest / "data/ingest"),
        "model_dir": str(dest / "models"),
        "reports_dir": str(dest / "reports"),
    }
    return with_overrides(settings, root, deep_merge({"paths": paths}, overrides or {}))


def run_evaluate(settings):
    """evaluate.run, returning (result or the GateFailed, metrics.json, gates.json)."""
    from medclf.stages import evaluate

    try:
        res = evaluate.run(settings)
    except evaluate.GateFailed as err:
        res = err
    rep = settings.paths.reports_dir
    return res, json.loads((rep / "metrics.json").read_text()), json.loads((rep / "gates.json").read_text())


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("evaluate")
    settings = build_project(
        root, mlflow_server, {"evaluate": {"gates": {"min_f1": 0.0, "min_recall": 0.0}}}, calibrate=True
    )
    return root, settings


@pytest.fixture(scope="module")
def first_run(project):
    _root, settings = project
    res, doc, gates = run_evaluate(settings)
    assert not isinstance(res, Exception), res
    return res, doc, gates


def _test_proba(settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model probabilities on val/test computed here, independently of the stage."""
    from medclf.infra.catalog import load_split
    from medclf.release.serving import load_keras

    model = load_keras(str(settings.paths.model_dir / "model.keras"))
    xv, yv = load_split(settings.paths, "val", mmap=False)
    xt, yt = load_split(settings.paths, "test", mmap=False)
    return yv, np.asarray(model.predict(xv, verbose=0), float), (yt, np.asarray(model.predict(xt, verbose=0), float))


def assert_threshold_from_validation(settings, threshold: float) -> None:
    """`threshold` is what the configured rule picks on the VALIDATION predictions (recomputed here from
    the model file, with medclf.evaluation.metrics), and not what the same rule would pick on the test split."""
    from medclf.evaluation.metrics import choose_threshold

    meta = json.loads((settings.paths.ingest_dir / "classes.json").read_text())
    pos = meta["classes"].index(meta["positive_class"])
    yv, pv, (yt, pt) = _test_proba(settings)
    cfg = settings.evaluate
    on_val = choose_threshold((yv == pos).astype(int), pv[:, pos], cfg.threshold_rule, cfg.target_sensitivity)
    on_test = choose_threshold((yt == pos).astype(int), pt[:, pos], cfg.threshold_rule, cfg.target_sensitivity)
    # candidates are the split's own scores, so the two differ on any real data; check that they do here
    assert abs(on_val["threshold"] - on_test["threshold"]) > 1e-5, "val and test pick the same threshold"
    assert threshold == pytest.approx(on_val["threshold"], abs=1e-6), (threshold, on_val, on_test)


# ----------------------------------------------------------------------------- tests: stage outputs
@pytest.mark.slow
def test_stage_metrics_match_sklearn(project, first_run):
    _root, settings = project
    _res, doc, _gates = first_run
    yv, pv, (yt, pt) = _test_proba(settings)
    classes = json.loads((settings.paths.ingest_dir / "classes.json").read_text())
    pos = classes["classes"].index(classes["positive_class"])
    # threshold: recomputed from validation predictions only, by the rule's definition
    thr = doc["threshold"]
    ybv, pbv = (yv == pos).astype(int), pv[:, pos]
    assert (pbv[ybv == 1] >= thr).mean() >= settings.evaluate.target_sensitivity - 1e-12
    higher = np.unique(pbv[pbv > thr])
    assert all((pbv[ybv == 1] >= t).mean() < settings.evaluate.target_sensitivity for t in higher)
    # test metrics at that threshold and at 0.5, against scikit-learn
    yb, pb = (yt == pos).astype(int), pt[:, pos]
    for section, t in (("test", thr), ("test_default_threshold", 0.5)):
        pred = (pb >= t).astype(int)
        m = doc[section]
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(yb, pred), abs=1e-6)
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(yb, pred), abs=1e-6)
        assert m["precision"] == pytest.approx(skm.precision_score(yb, pred, zero_division=0), abs=1e-6)
        assert m["recall"] == pytest.approx(skm.recall_score(yb, pred, zero_division=0), abs=1e-6)
        assert m["specificity"] == pytest.approx(skm.recall_score(yb, pred, pos_label=0, zero_division=0), abs=1e-6)
        assert m["f1"] == pytest.approx(skm.f1_score(yb, pred, zero_division=0), abs=1e-6)
        assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(yb, pred), abs=1e-6)
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(yb, pb), abs=1e-6)
        assert m["pr_auc"] == pytest.approx(skm.average_precision_score(yb, pb), abs=1e-6)
        assert m["brier"] == pytest.approx(skm.brier_score_loss(yb, pb), abs=1e-6)
        tn, fp, fn, tp = skm.confusion_matrix(yb, pred, labels=[0, 1]).ravel()
        assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
        for k in ("f1", "recall", "roc_auc", "ece"):
            assert m[f"{k}_ci_low"] <= m[k] + 1e-9 and m[k] <= m[f"{k}_ci_high"] + 1e-9, k
    assert doc["test_default_threshold"]["threshold"] == 0.5
    assert doc["test"]["n"] == len(yt) and doc["val"]["n"] == len(yv)
    # the headline `dvc metrics show` reads: the same numbers at 3 decimals, no CIs, no 0.5-threshold block
    head = json.loads((settings.paths.reports_dir / "evaluate.json").read_text())
    assert head == {
        "auc": round(skm.roc_auc_score(yb, pb), 3),
        "f1": round(skm.f1_score(yb, pb >= thr), 3),
        "recall": round(skm.recall_score(yb, pb >= thr), 3),
        "specificity": round(skm.recall_score(yb, pb >= thr, pos_label=0), 3),
        "threshold": thr,
        "failed": 0,
    }, head
    # DVC plot files: one confusion record per test image agreeing with the counts
    plots = settings.paths.reports_dir / "plots"
    conf = json.loads((plots / "confusion.json").read_text())
    assert len(conf) == len(yt)
    pos_name = classes["positive_class"]
    called_pos = sum(r["predicted"] == pos_name for r in conf)
    assert called_pos == doc["test"]["tp"] + doc["test"]["fp"]
    roc = json.loads((plots / "roc.json").read_text())
    assert {"fpr", "tpr"} <= roc[0].keys() and roc[0]["fpr"] == 0 and roc[-1]["tpr"] == 1
    assert {"recall", "precision"} <= json.loads((plots / "pr.json").read_text())[0].keys()
    cal = json.loads((plots / "calibration.json").read_text())
    assert sum(r["count"] for r in cal) == len(yt)
    # calibration: the model outputs softmax(log p_raw / T) for the T train_run.json records, T is the val-NLL
    # optimum (refitting on the val raw probabilities gives it back; on test it would not), and metrics.json
    # holds test ECE/Brier of p_raw = softmax(T log p) (before) and of the model's output (after)
    from medclf.evaluation import calibration

    t = json.loads((settings.paths.model_dir / "train_run.json").read_text())["calibration"]["temperature"]
    cal_doc = doc["calibration"]
    assert cal_doc["temperature"] == t and abs(np.log(t)) > 0.05, cal_doc  # the tiny net is not calibrated
    assert calibration.fit_temperature(yv, calibration.rescale(pv, 1 / t)) == pytest.approx(t, rel=1e-3)
    assert abs(calibration.fit_temperature(yt, calibration.rescale(pt, 1 / t)) - t) > 1e-2
    raw = calibration.rescale(pt, 1 / t)[:, pos]
    assert cal_doc["brier_after"] == pytest.approx(m["brier"], abs=1e-9) and cal_doc["ece_after"] == pytest.approx(
        doc["test"]["ece"], abs=1e-9
    )
    assert cal_doc["brier_before"] == pytest.approx(skm.brier_score_loss(yb, raw), abs=1e-6)
    from medclf.evaluation.metrics import binary_metrics

    assert cal_doc["ece_before"] == pytest.approx(binary_metrics(yb, raw, 0.5)["ece"], abs=1e-9)
    # the per-image CSV holds the same probabilities as the model, keyed by manifest id
    import pandas as pd

    csv = pd.read_csv(settings.paths.reports_dir / "evaluate" / "test_predictions.csv")
    np.testing.assert_allclose(csv[f"p_{pos_name}"].to_numpy(), pb, atol=1e-6)
    assert csv["id"].str.len().eq(16).all()


@pytest.mark.slow
def test_pictures_and_reports_written(project, first_run):
    from PIL import Image

    _root, settings = project
    res, _doc, gates = first_run
    out = settings.paths.reports_dir / "evaluate"
    for name in ("confusion", "roc", "pr", "calibration", "gradcam"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100, name
    assert set(res["gradcam"]) == {"true positives", "false positives", "false negatives"}
    assert all(n <= settings.evaluate.gradcam_n for n in res["gradcam"].values())
    assert_threshold_from_validation(settings, gates["threshold"])  # not the literal "threshold_source" tag
    assert gates["passed"] is True and gates["failures"] == []
    assert gates["non_inferiority"]["skipped"] is True
    assert "no champion" in gates["non_inferiority"]["note"]
    assert not list(out.parent.glob(".evaluate*staging"))  # atomic: no leftovers


@pytest.mark.slow
def test_metrics_and_pictures_logged_to_training_run(project, first_run):
    from mlflow import MlflowClient

    _root, settings = project
    _res, doc, _gates = first_run
    run_id = json.loads((settings.paths.model_dir / "train_run.json").read_text())["run_id"]
    cl = MlflowClient(tracking_uri=settings.mlflow.resolved_uri())
    run = cl.get_run(run_id)
    assert run.data.metrics["test/f1"] == pytest.approx(doc["test"]["f1"])
    assert run.data.metrics["test/threshold"] == pytest.approx(doc["threshold"])
    assert run.data.tags["evaluate.gates_passed"] == "true"
    names = {a.path for a in cl.list_artifacts(run_id, "evaluate")}
    assert {
        "evaluate/roc.png",
        "evaluate/gradcam.png",
        "evaluate/metrics.json",
        "evaluate/gates.json",
        "evaluate/evaluate.json",
    } <= names


# ----------------------------------------------------------------------------- threshold: validation only
def _synthetic_preds(seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, np.column_stack([1 - p1, p1])


@pytest.mark.parametrize("rule", ["target_sensitivity", "max_f1", "youden"])
def test_threshold_ignores_test_predictions_and_follows_validation(rule):
    from medclf.config import Evaluate
    from medclf.evaluation.report import Predictions, evaluate_predictions

    cfg = Evaluate(threshold_rule=rule, bootstrap=0)
    yv, pv = _synthetic_preds(1)
    yt, pt = _synthetic_preds(2)
    base = evaluate_predictions(Predictions(yv, pv, yt, pt, ["neg", "pos"], "pos"), cfg)
    yt2, pt2 = _synthetic_preds(3)
    perturbed_test = evaluate_predictions(Predictions(yv, pv, yt2, pt2[::-1], ["neg", "pos"], "pos"), cfg)
    assert perturbed_test.threshold == base.threshold
    assert perturbed_test.test["f1"]["value"] != base.test["f1"]["value"]  # test data did change
    yv2, pv2 = _synthetic_preds(4)
    perturbed_val = evaluate_predictions(Predictions(yv2, pv2, yt, pt, ["neg", "pos"], "pos"), cfg)
    assert perturbed_val.threshold["threshold"] != base.threshold["threshold"]


@pytest.mark.slow
def test_stage_threshold_unchanged_when_test_split_replaced(project, first_run, tmp_path):
    """End to end on files: scramble the test images/labels -> same threshold; scramble val -> new one."""
    root, settings = project
    _res, doc, _gates = first_run
    s2 = copy_project(settings, root, tmp_path / "proj", {"evaluate": {"gradcam_n": 0, "bootstrap": 0}})
    ing = s2.paths.ingest_dir
    rng = np.random.default_rng(5)
    for split in ("test",):
        x = np.load(ing / f"{split}_images.npy")
        np.save(ing / f"{split}_images.npy", rng.integers(0, 256, x.shape, dtype=np.uint8))
        y = np.load(ing / f"{split}_labels.npy")
        np.save(ing / f"{split}_labels.npy", rng.permutation(y))
    import pandas as pd  # a declared subgroup (ingest.subgroups) as ingest writes it: evaluate scores each category

    m = pd.read_parquet(ing / "manifest.parquet")
    m["subgroup_site"] = np.where(m["row"] % 3 == 0, "A", "B")
    m.to_parquet(ing / "manifest.parquet", index=False)
    _r, doc_t, _g = run_evaluate(s2)
    assert doc_t["threshold"] == doc["threshold"]
    y_test = np.load(ing / "test_labels.npy")
    sites = doc_t["subgroups"]["site"]
    assert (sites["A"]["n"], sites["B"]["n"]) == (len(y_test[::3]), len(y_test) - len(y_test[::3]))
    pos = json.loads((ing / "classes.json").read_text())
    pos = pos["classes"].index(pos["positive_class"])
    assert sites["A"]["positives"] == int((y_test[::3] == pos).sum())
    assert doc_t["test"]["roc_auc"] != doc["test"]["roc_auc"]
    x = np.load(ing / "val_images.npy")
    np.save(ing / "val_images.npy", np.ascontiguousarray(255 - x[:, ::-1]))
    _r, doc_v, _g = run_evaluate(s2)
    assert doc_v["threshold"] != doc["threshold"]


# ----------------------------------------------------------------------------- gates at their boundaries
@pytest.fixture(scope="module")
def hard(project, first_run, tmp_path_factory):
    """The project with two test labels flipped (one confident hit of each class), so that F1,
    recall, specificity and AUC are all < 1 and every gate has a failing bound just above its value."""
    root, settings = project
    s2 = copy_project(settings, root, tmp_path_factory.mktemp("hard"), {"evaluate": {"gradcam_n": 0, "bootstrap": 0}})
    meta = json.loads((s2.paths.ingest_dir / "classes.json").read_text())
    pos = meta["classes"].index(meta["positive_class"])
    _yv, _pv, (yt, pt) = _test_proba(settings)
    labels = np.load(s2.paths.ingest_dir / "test_labels.npy")
    neg_idx, pos_idx = np.flatnonzero(yt != pos), np.flatnonzero(yt == pos)
    labels[neg_idx[np.argmin(pt[neg_idx, pos])]] = pos  # a sure negative labelled positive -> FN
    labels[pos_idx[np.argmax(pt[pos_idx, pos])]] = 1 - pos  # a sure positive labelled negative -> FP
    np.save(s2.paths.ingest_dir / "test_labels.npy", labels)
    res, doc, _gates = run_evaluate(s2)
    assert not isinstance(res, Exception), res
    assert doc["threshold"] == first_run[1]["threshold"]  # labels of the test split do not move it
    return root, s2, doc


@pytest.mark.slow
@pytest.mark.parametrize(
    "gate,metric",
    [("min_f1", "f1"), ("min_recall", "recall"), ("min_auc", "roc_auc"), ("min_specificity", "specificity")],
)
def test_gate_passes_at_bound_and_fails_just_above(hard, gate, metric):
    from medclf.stages import evaluate

    root, settings, doc = hard
    value = doc["test"][metric]
    assert 0 < value < 1, (metric, value)
    at = with_overrides(settings, root, {"evaluate": {"gates": {gate: value}}})
    res, _d, gates = run_evaluate(at)
    assert not isinstance(res, Exception), res
    entry = next(g for g in gates["gates"] if g["name"] == gate)
    assert (entry["value"], entry["bound"], entry["passed"]) == (value, value, True)
    above = with_overrides(settings, root, {"evaluate": {"gates": {gate: float(np.nextafter(value, 2))}}})
    with pytest.raises(evaluate.GateFailed, match=metric):
        evaluate.run(above)
    gates = json.loads((settings.paths.reports_dir / "gates.json").read_text())
    assert gates["passed"] is False and any(metric in f for f in gates["failures"])
    entry = next(g for g in gates["gates"] if g["name"] == gate)
    assert entry["passed"] is False
    assert json.loads((settings.paths.reports_dir / "metrics.json").read_text())["test"][metric] == value
    assert json.loads((settings.paths.reports_dir / "evaluate.json").read_text())["failed"] == 1  # the verdict


@pytest.mark.slow
def test_unreachable_server_skips_non_inferiority_with_note(project, monkeypatch):
    root, settings = project
    # MLFLOW_TRACKING_URI wins over params.yaml (and mlflow.set_tracking_uri exports it): set both
    dead_uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead_uri)
    dead = with_overrides(
        settings, root, {"mlflow": {"tracking_uri": dead_uri}, "evaluate": {"gradcam_n": 0, "bootstrap": 0}}
    )
    res, _doc, gates = run_evaluate(dead)
    assert not isinstance(res, Exception), res
    assert gates["non_inferiority"]["skipped"] is True
    assert "unreachable" in gates["non_inferiority"]["note"]
    assert gates["champion"]["server_reachable"] is False and gates["champion"]["version"] is None
    assert "not logged" in res["mlflow"]


# ----------------------------------------------------------------------------- pure pieces
def test_multiclass_report_has_macro_weighted_per_class_with_ci():
    from medclf.config import Evaluate
    from medclf.evaluation.report import Predictions, evaluate_predictions, metrics_document

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 2.0 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    preds = Predictions(y[:60], proba[:60], y[60:], proba[60:], ["a", "b", "c"], "c")
    rep = evaluate_predictions(preds, Evaluate(bootstrap=50))
    doc = metrics_document(rep)
    mc = doc["multiclass"]
    yt, pt = y[60:], proba[60:]
    assert mc["macro_f1"] == pytest.approx(skm.f1_score(yt, pt.argmax(1), average="macro"))
    assert mc["weighted_f1"] == pytest.approx(skm.f1_score(yt, pt.argmax(1), average="weighted"))
    assert mc["macro_f1_ci_low"] <= mc["macro_f1"] <= mc["macro_f1_ci_high"]
    assert set(mc["per_class"]) == {"a", "b", "c"}
    assert doc["test"]["recall"] == pytest.approx(skm.recall_score(yt == 2, pt[:, 2] >= doc["threshold"]))
    json.dumps(doc, allow_nan=False)  # strict JSON: NaN would have become null
