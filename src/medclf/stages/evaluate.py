"""evaluate: score the test split once, at a threshold chosen on validation data, and gate the release.

Order matters and is enforced by the code's shape: the operating threshold is a function of the
validation predictions only (`choose_operating_threshold` never sees test data); test metrics
are then reported at that threshold and at 0.5, with bootstrap 95% CIs. The gates compare the
test metrics with absolute floors and with the current `champion` (non-inferiority on the same
test set). Every report is written before a failed gate raises `GateFailed`, so a failed run
still leaves its evidence; `register` reads `gates.json` and refuses anything that did not pass.

Files (names in `medclf.catalog`, evaluate section): `reports/evaluate.json` is the headline that
`dvc metrics show/diff` reads (test AUC, F1, recall, specificity, threshold, failed gates);
`reports/metrics.json` (every metric with its CI) and `reports/gates.json` (the decision, the champion,
the comparison) are the detail, beside the figures and predictions in `reports/evaluate/`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from medclf import calibration, subgroups
from medclf import catalog as c
from medclf import metrics as M
from medclf.comparison import comparison_png, paired_differences
from medclf.config import Evaluate, Settings
from medclf.gates import evaluate_gates
from medclf.io import atomic_dir, file_digest, write_json
from medclf.model_card import CI_TABLE_ARTIFACT
from medclf.pipeline import declared
from medclf.tracking import final_step

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
GALLERY_GROUPS = ("true positives", "false positives", "false negatives")


class GateFailed(RuntimeError):
    """The model did not pass the release gates; reports were written, nothing is registered."""

    transient = False  # the same model fails the same gates on every attempt (medclf.cli.is_transient)


class EvaluateError(RuntimeError):
    """Evaluation inputs are missing or inconsistent (the message names the file)."""


# ----------------------------------------------------------------------------- pure core
def binary_view(y: np.ndarray, proba: np.ndarray, positive: int) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest view: (is positive class, probability of the positive class)."""
    proba = np.asarray(proba, dtype=float)
    return (np.asarray(y) == positive).astype(np.int64), np.clip(proba[:, positive], 0.0, 1.0)


def choose_operating_threshold(y_val: np.ndarray, proba_val: np.ndarray, positive: int,
                               cfg: Evaluate) -> dict[str, Any]:
    """The decision threshold, from VALIDATION predictions only (the signature admits nothing else)."""
    yb, pb = binary_view(y_val, proba_val, positive)
    return M.choose_threshold(yb, pb, cfg.threshold_rule, cfg.target_sensitivity)


def evaluate_predictions(y_val: np.ndarray, proba_val: np.ndarray, y_test: np.ndarray, proba_test: np.ndarray,
                         classes: list[str], positive_class: str, cfg: Evaluate) -> dict[str, Any]:
    """Every number of the evaluation, from predictions (pure; the stage adds I/O around it)."""
    pos = classes.index(positive_class)
    choice = choose_operating_threshold(y_val, proba_val, pos, cfg)
    yb, pb = binary_view(y_test, proba_test, pos)
    thr = choice["threshold"]
    report: dict[str, Any] = {
        "threshold": choice,
        "test": M.metrics_with_ci(yb, pb, thr, cfg.bootstrap, cfg.seed),
        "test_counts": {k: v for k, v in M.binary_metrics(yb, pb, thr).items() if k in M.COUNTS},
        "test_default_threshold": M.metrics_with_ci(yb, pb, DEFAULT_THRESHOLD, cfg.bootstrap, cfg.seed),
        "test_default_counts": {k: v for k, v in M.binary_metrics(yb, pb, DEFAULT_THRESHOLD).items()
                                if k in M.COUNTS},
        "n_val": len(y_val), "n_test": len(y_test),
    }
    if len(classes) > 2:
        report["multiclass"] = M.multiclass_with_ci(y_test, proba_test, classes, cfg.bootstrap, cfg.seed)
    return report


def point_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Test metrics at the chosen threshold, {name: value}: what the gates and the registry read."""
    return {k: v["value"] for k, v in report["test"].items()}


def _num(v: Any) -> Any:
    """JSON-safe number: NaN/inf become null (strict JSON readers, DVC's included, choke on NaN)."""
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _flat(with_ci: dict[str, dict[str, float]], counts: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in with_ci.items():
        out[k], out[f"{k}_ci_low"], out[f"{k}_ci_high"] = _num(v["value"]), _num(v["ci_low"]), _num(v["ci_high"])
    out.update({k: int(c) for k, c in counts.items()})
    return out


def metrics_document(report: dict[str, Any]) -> dict[str, Any]:
    """`reports/metrics.json`: numbers only, nested one level, so `dvc metrics diff` compares them."""
    ch = report["threshold"]
    doc: dict[str, Any] = {
        "threshold": _num(ch["threshold"]),
        "val": {"sensitivity": _num(ch["val_sensitivity"]), "specificity": _num(ch["val_specificity"]),
                "f1": _num(ch["val_f1"]), "n": report["n_val"]},
        "test": {**_flat(report["test"], report["test_counts"]), "n": report["n_test"]},
        "test_default_threshold": {**_flat(report["test_default_threshold"], report["test_default_counts"]),
                                   "threshold": DEFAULT_THRESHOLD},
    }
    doc.update({"calibration": {k: _num(v) for k, v in report["calibration"].items()}} if report.get("calibration") else {})
    doc.update({"subgroups": report["subgroups"]} if report.get("subgroups") else {})  # medclf.subgroups
    if "multiclass" in report:
        mc = dict(report["multiclass"])
        per_class = mc.pop("per_class")
        doc["multiclass"] = {**{k: _num(v) for k, v in mc.items()},
                             "per_class": {name: {k: _num(v) for k, v in d.items()} for name, d in per_class.items()}}
    return doc


HEADLINE = ("roc_auc", "f1", "recall", "specificity")


def headline(doc: dict[str, Any], gates: dict[str, Any]) -> dict[str, Any]:
    """`reports/evaluate.json`, the stage's line in `dvc metrics show`: the test split's AUC, F1, recall
    and specificity at the chosen threshold (3 decimals, as the registry shows them), the threshold, and
    how many release gates failed (0 = passed; the column validate's headline uses for failed checks).
    CIs, the 0.5-threshold figures, per-class values and the champion stay in metrics.json / gates.json."""
    test = doc["test"]
    out: dict[str, Any] = {("auc" if k == "roc_auc" else k): None if test.get(k) is None else round(test[k], 3)
                           for k in HEADLINE}
    return {**out, "threshold": doc["threshold"], "failed": len(gates["failures"])}


def champion_comparison(y_test: np.ndarray, proba_test: np.ndarray, positive: int, threshold: float,
                        champion: dict[str, Any], cfg: Evaluate) -> dict[str, Any] | None:
    """Challenger minus champion on the same test images, each at its own threshold (None without one)."""
    if champion.get("proba") is None:
        return None
    yb, pb = binary_view(y_test, proba_test, positive)
    return paired_differences(yb, pb, threshold, np.asarray(champion["proba"]), float(champion["threshold"]),
                              cfg.bootstrap, cfg.seed)


def plot_data(y_test: np.ndarray, proba_test: np.ndarray, classes: list[str], positive: int,
              threshold: float) -> dict[str, list[dict[str, Any]]]:
    """DVC plot records: curves for the positive class, and one {actual, predicted} row per test image."""
    yb, pb = binary_view(y_test, proba_test, positive)
    pred = M.thresholded_labels(proba_test, positive, threshold)
    return {"roc": M.roc_points(yb, pb), "pr": M.pr_points(yb, pb), "calibration": M.calibration_curve_points(yb, pb),
            "confusion": [{"actual": classes[int(a)], "predicted": classes[int(b)]} for a, b in zip(y_test, pred)]}


def gallery_indices(y_test: np.ndarray, proba_test: np.ndarray, positive: int, threshold: float,
                    n: int) -> dict[str, list[int]]:
    """Up to `n` test indices per group, the most confident mistakes/hits first (most instructive)."""
    yb, pb = binary_view(y_test, proba_test, positive)
    called = pb >= threshold
    groups = {"true positives": (yb == 1) & called, "false positives": (yb == 0) & called,
              "false negatives": (yb == 1) & ~called}
    out = {}
    for name, mask in groups.items():
        idx = np.flatnonzero(mask)
        order = np.argsort(pb[idx] if name == "false negatives" else -pb[idx], kind="stable")
        out[name] = [int(i) for i in idx[order][:n]]
    return out


# ----------------------------------------------------------------------------- edges
def _inputs(settings: Settings) -> dict[str, Any]:
    """Model + class metadata + val/test splits, checked against each other (errors name the file)."""
    from medclf.serving import load_keras

    paths = settings.paths
    classes_file, model_file, run_file = c.CLASSES.path(paths), c.MODEL.path(paths), c.TRAIN_RUN.path(paths)
    for f, stage in ((classes_file, "ingest"), (model_file, "train")):
        if not f.exists():
            raise EvaluateError(f"{f}: missing (run `medclf {stage}` first)")
    meta = c.CLASSES.load(paths)
    classes, positive = list(meta["classes"]), meta["positive_class"]
    train_run = c.TRAIN_RUN.load(paths) if run_file.exists() else {}
    if train_run.get("classes") and list(train_run["classes"]) != classes:
        raise EvaluateError(f"{run_file}: model classes {train_run['classes']} differ from {classes_file} {classes}")
    model = load_keras(str(model_file))
    k = int(model.output_shape[-1])
    if k != len(classes):
        raise EvaluateError(f"{model_file}: model outputs {k} classes, {classes_file} lists {len(classes)}")
    x_val, y_val = c.load_split(paths, "val")
    x_test, y_test = c.load_split(paths, "test")
    for split, x in (("val", x_val), ("test", x_test)):
        if len(x) == 0:
            raise EvaluateError(f"{c.IMAGES.path(paths, split=split)}: the {split} split is empty")
    digest = file_digest(c.IMAGES.path(paths, split="test"), c.LABELS.path(paths, split="test"))
    return {"meta": meta, "classes": classes, "positive": positive, "train_run": train_run, "model": model,
            "model_sha256": file_digest(model_file), "x_val": x_val, "y_val": y_val, "x_test": x_test,
            "y_test": y_test, "test_digest": digest}


def predict_proba(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.asarray(model.predict(np.asarray(x), batch_size=batch_size, verbose=0), dtype=np.float64)


def _fig(staging: Path, name: str) -> Path:
    return c.inside(c.EVALUATE_REPORTS, c.FIGURE, staging, name=name)


def _write_pictures(out: Path, data: dict[str, Any], report: dict[str, Any], classes: list[str],
                    before: list[dict[str, Any]] | None = None) -> None:
    from medclf import plots

    thr = report["threshold"]["threshold"]
    cm = M.confusion([classes.index(r["actual"]) for r in data["confusion"]],
                     [classes.index(r["predicted"]) for r in data["confusion"]], len(classes))
    plots.confusion_png(cm, classes, _fig(out, "confusion"), f"test set, threshold {thr:.4f} (from validation)")
    t = report["test"]
    op = {"fpr": 1 - t["specificity"]["value"], "tpr": t["recall"]["value"],
          "recall": t["recall"]["value"], "precision": t["precision"]["value"]}
    plots.curve_png(data["roc"], "fpr", "tpr", _fig(out, "roc"),
                    f"ROC (AUC {t['roc_auc']['value']:.3f})", diagonal=True, marker=op)
    plots.curve_png(data["pr"], "recall", "precision", _fig(out, "pr"),
                    f"Precision-recall (AP {t['pr_auc']['value']:.3f})", marker=op)
    plots.curve_png(data["calibration"], "mean_predicted", "fraction_positive", _fig(out, "calibration"),
                    f"Calibration (ECE {t['ece']['value']:.3f}, Brier {t['brier']['value']:.3f})"
                    + (f"; T={cal['temperature']:.3f}, ECE {cal['ece_before']:.3f} before"
                       if (cal := report.get("calibration")) else ""),
                    diagonal=True, xlabel="mean predicted probability", ylabel="fraction positive", before=before)


def gallery_caption(index: int, positive: str, p: float, threshold: float) -> str:
    """Enough digits to tell each case from the threshold (a FN at 0.0071 and a FP at 0.0105 both read
    "0.01" at two decimals beside "threshold 0.009"), and which side of it the case fell on."""
    side = ">=" if p >= threshold else "<"
    return f"#{index}  p({positive})={p:.4f} {side} {threshold:.4f}"


def _write_gallery(out: Path, inp: dict[str, Any], proba: np.ndarray, thr: float, n: int) -> dict[str, int]:
    from medclf import gradcam, plots

    pos = inp["classes"].index(inp["positive"])
    picks = gallery_indices(inp["y_test"], proba, pos, thr, n)
    groups: dict[str, list[dict[str, Any]]] = {}
    for name in GALLERY_GROUPS:
        idx = picks[name]
        images = np.asarray(inp["x_test"][idx]) if idx else np.zeros((0,) + inp["x_test"].shape[1:], np.uint8)
        heat: np.ndarray | list[np.ndarray] = gradcam.gradcam(inp["model"], images, pos) if idx else []
        groups[name] = [{"overlay": gradcam.overlay(img, h),
                         "caption": gallery_caption(int(i), inp["positive"], float(proba[i, pos]), thr)}
                        for i, img, h in zip(idx, images, heat)]
    plots.gallery_png(groups, _fig(out, "gradcam"), n, f"Grad-CAM of the log-odds of '{inp['positive']}' on "
                      f"{gradcam.split_model(inp['model']).layer!r}, threshold {thr:.4f}")
    return {k: len(v) for k, v in picks.items()}


def _predictions_csv(path: Path, inp: dict[str, Any], proba: np.ndarray, thr: float, manifest: Path) -> None:
    """Per-image test predictions keyed by the manifest id (no paths, no patient data)."""
    import pandas as pd

    classes, pos = inp["classes"], inp["classes"].index(inp["positive"])
    df = pd.DataFrame(proba, columns=[f"p_{c}" for c in classes])
    df.insert(0, "label", [classes[int(i)] for i in inp["y_test"]])
    if manifest.exists():
        m = pd.read_parquet(manifest, columns=["id", "split", "row"])
        ids = m[m.split == "test"].sort_values("row")["id"].tolist()
        if len(ids) == len(df):
            df.insert(0, "id", ids)
    df["predicted"] = [classes[i] for i in M.thresholded_labels(proba, pos, thr)]
    df.to_csv(path, index_label="test_row")


def run_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """Point values only, for the run's metrics (the 95 % CIs go to a table, see `ci_table`)."""
    out: dict[str, float] = {"decision_threshold": float(doc["threshold"])}
    for sec, prefix in (("test", "test_"), ("test_default_threshold", "test_t050_"), ("val", "val_")):
        for k, v in doc[sec].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("_ci_low", "_ci_high")):
                out[prefix + k] = float(v)
    return out


def ci_table(doc: dict[str, Any]) -> dict[str, list[Any]]:
    """One row per test metric: value and 95 % bootstrap CI, at the registered and at the 0.5 threshold."""
    rows: dict[str, list[Any]] = {"metric": [], "threshold": [], "value": [], "ci_low": [], "ci_high": []}
    for sec, thr in (("test", "registered"), ("test_default_threshold", "0.5")):
        for k, v in doc[sec].items():
            if f"{k}_ci_low" in doc[sec]:
                rows["metric"].append(k)
                rows["threshold"].append(thr)
                rows["value"].append(v)
                rows["ci_low"].append(doc[sec][f"{k}_ci_low"])
                rows["ci_high"].append(doc[sec][f"{k}_ci_high"])
    return rows


def reachable(uri: str) -> bool:
    """One quick reachability probe per run (2 attempts): evaluation must work offline too."""
    from medclf.tracking import TrackingUnavailable, wait_for_server

    try:
        wait_for_server(uri, attempts=2)
        return True
    except TrackingUnavailable:
        return False


def _log_to_mlflow(settings: Settings, inp: dict[str, Any], doc: dict[str, Any], gates: dict[str, Any],
                   report_dir: Path, online: bool) -> str:
    """Metrics + pictures into the training run; a note (not a failure) when that is impossible."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    run_id = inp["train_run"].get("run_id")
    if not run_id:
        return "no train_run.json run_id: metrics not logged to MLflow"
    uri = settings.mlflow.resolved_uri()
    if not online:
        return f"not logged to MLflow: server at {uri} unreachable"
    cl, now = MlflowClient(tracking_uri=uri), int(time.time() * 1000)
    step = final_step(inp["train_run"])
    ms = [Metric(k, float(v), now, step) for k, v in run_metrics(doc).items()]
    tags = [RunTag("evaluate.gates_passed", str(gates["passed"]).lower()),
            RunTag("evaluate.threshold_rule", str(settings.evaluate.threshold_rule))]
    for i in range(0, len(ms), 500):
        cl.log_batch(run_id, metrics=ms[i:i + 500], tags=tags if i == 0 else [])
    cl.log_table(run_id, data=ci_table(doc), artifact_file=CI_TABLE_ARTIFACT)
    # the figures land under the run's `evaluate/` as under reports/ (the version page links them so)
    cl.log_artifacts(run_id, str(report_dir), c.EVALUATE_REPORTS.rel)
    for art in (c.EVALUATE_METRICS, c.METRICS, c.GATES):
        cl.log_artifact(run_id, str(art.path(settings.paths)), c.EVALUATE_REPORTS.rel)
    cl.log_artifacts(run_id, str(c.PLOTS_DIR.path(settings.paths)), f"{c.EVALUATE_REPORTS.rel}/plots")
    return f"logged to run {run_id}"


@declared
def run(settings: Settings) -> dict[str, Any]:
    from medclf.registry import champion_reference

    cfg, paths, t0 = settings.evaluate, settings.paths, time.perf_counter()
    inp = _inputs(settings)
    classes, pos = inp["classes"], inp["classes"].index(inp["positive"])
    proba_val = predict_proba(inp["model"], inp["x_val"])
    proba_test = predict_proba(inp["model"], inp["x_test"])
    report = evaluate_predictions(inp["y_val"], proba_val, inp["y_test"], proba_test, classes, inp["positive"], cfg)
    thr = report["threshold"]["threshold"]
    online = reachable(settings.mlflow.resolved_uri())
    champion = champion_reference(settings, inp["test_digest"], inp["x_test"], inp["y_test"], classes,
                                  reachable=online, rescore=True)
    comparison = champion_comparison(inp["y_test"], proba_test, pos, thr, champion, cfg)
    gates = evaluate_gates(point_metrics(report), cfg.gates, champion.get("metrics"))
    gates.update({"threshold": thr, "threshold_rule": cfg.threshold_rule, "threshold_source": "validation",
                  "model_sha256": inp["model_sha256"], "test_set_digest": inp["test_digest"],
                  "train_run_id": inp["train_run"].get("run_id"),
                  "champion": {k: v for k, v in champion.items() if k not in ("metrics", "proba")},
                  **({"comparison": comparison} if comparison else {})})
    if champion.get("note") and gates["non_inferiority"].get("skipped"):
        gates["non_inferiority"]["note"] = champion["note"]
    t_cal = (inp["train_run"].get("calibration") or {}).get("temperature")  # folded into the model by train
    report["calibration"] = calibration.effect(inp["y_test"], proba_test, pos, t_cal) if t_cal else None
    yb, pb = binary_view(inp["y_test"], proba_test, pos)
    groups = subgroups.groups_of_test_split(c.MANIFEST.path(paths), len(yb))  # ingest.subgroups' columns
    report["subgroups"] = M.subgroup_metrics(yb, pb, groups, thr, cfg.bootstrap, cfg.seed) if groups else {}
    doc = metrics_document(report)
    data = plot_data(inp["y_test"], proba_test, classes, pos, thr)  # before: drawn beside, not a DVC plot
    before = plot_data(inp["y_test"], calibration.rescale(proba_test, 1 / t_cal), classes, pos, thr) if t_cal else {}

    report_dir = c.EVALUATE_REPORTS.path(paths)
    with atomic_dir(report_dir) as tmp:
        _write_pictures(tmp, data, report, classes, before.get("calibration"))
        gallery = _write_gallery(tmp, inp, proba_test, thr, cfg.gradcam_n) if cfg.gradcam_n else {}
        _predictions_csv(c.inside(c.EVALUATE_REPORTS, c.TEST_PREDICTIONS, tmp), inp, proba_test, thr,
                         c.MANIFEST.path(paths))
        write_json(c.inside(c.EVALUATE_REPORTS, c.THRESHOLD, tmp), report["threshold"])
        if comparison:
            comparison_png(yb, pb, thr, champion["proba"], champion["threshold"],
                           (f"not {inp['positive']}" if len(classes) > 2 else classes[1 - pos], inp["positive"]),
                           _fig(tmp, "champion_comparison"), f"champion v{champion['version']}")
            write_json(c.inside(c.EVALUATE_REPORTS, c.CHAMPION_COMPARISON, tmp), comparison)
    for name, records in data.items():
        c.PLOTS.save(paths, records, name=name)
    c.METRICS.save(paths, doc)
    c.GATES.save(paths, gates)
    c.EVALUATE_METRICS.save(paths, headline(doc, gates))
    mlflow_note = _log_to_mlflow(settings, inp, doc, gates, report_dir, online)
    result = {"passed": gates["passed"], "threshold": thr, "f1": doc["test"]["f1"], "recall": doc["test"]["recall"],
              "roc_auc": doc["test"]["roc_auc"], "failures": gates["failures"], "gradcam": gallery,
              "champion": gates["champion"], "mlflow": mlflow_note,
              "seconds": round(time.perf_counter() - t0, 1)}
    log.info("evaluate: threshold %.4f (%s on validation), test F1 %.3f recall %.3f, gates %s",
             thr, cfg.threshold_rule, doc["test"]["f1"] or math.nan, doc["test"]["recall"] or math.nan,
             "passed" if gates["passed"] else "FAILED")
    if not gates["passed"]:
        raise GateFailed("release gates failed: " + "; ".join(gates["failures"])
                         + f" (see {c.GATES.path(paths)})")
    return result
