"""evaluate: score the test split once, at a threshold chosen on validation data, and gate the release.

The edge of the stage: it loads the model and the splits through the catalog, predicts, and hands the arrays to
`medclf.evaluation.report` (pure: the threshold from validation only, the test metrics at it and at 0.5 with bootstrap
95% CIs, the plot records), then compares with the current `champion`, gates, draws the figures and the Grad-CAM gallery
and its shortcut check (`medclf.evaluation.shortcut`), saves every file and logs to MLflow. The gates compare the test
metrics with absolute floors and with the champion (non-inferiority on the same test set). Every report is written
before a failed gate raises `GateFailed`, so a failed run still leaves its evidence; `register` reads `gates.json` and
refuses anything that did not pass.

Files (names in `medclf.infra.catalog`, evaluate section): `reports/evaluate.json` is the headline that
`dvc metrics show/diff` reads (test AUC, F1, recall, specificity, threshold, failed gates);
`reports/metrics.json` (every metric with its CI) and `reports/gates.json` (the decision, the champion,
the comparison) are the detail, beside the figures and predictions in `reports/evaluate/`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclf.config import Settings
from medclf.evaluation import external, kclass, metrics, plots, robustness, shortcut, subgroups
from medclf.evaluation.comparison import comparison_png
from medclf.evaluation.gates import evaluate_gates
from medclf.evaluation.report import (
    GALLERY_GROUPS,
    Predictions,
    binary_view,
    champion_comparison,
    ci_table,
    evaluate_predictions,
    gallery_caption,
    headline,
    metrics_document,
    point_metrics,
    run_metrics,
)
from medclf.evaluation.task import TaskSpec
from medclf.imaging.modality import expects_grey
from medclf.infra import catalog
from medclf.infra.io import atomic_dir, file_digest, json_safe, write_json
from medclf.infra.tracking import final_step
from medclf.pipeline import declared

log = logging.getLogger(__name__)


class GateFailed(RuntimeError):
    """The model did not pass the release gates; reports were written, nothing is registered."""

    transient = False  # the same model fails the same gates on every attempt (medclf.cli.is_transient)


class EvaluateError(RuntimeError):
    """Evaluation inputs are missing or inconsistent (the message names the file)."""


# ----------------------------------------------------------------------------- edges
@dataclass(frozen=True, eq=False)
class Inputs:
    """What the stage reads: the model, its classes and training run, and the val/test splits."""

    classes: list[str]
    positive: str
    train_run: dict[str, Any]
    model: Any
    model_sha256: str
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_digest: str


def _inputs(settings: Settings) -> Inputs:
    """Model + class metadata + val/test splits, checked against each other (errors name the file)."""
    from medclf.release.serving import load_keras

    paths = settings.paths
    classes_file, model_file, run_file = (
        catalog.CLASSES.path(paths),
        catalog.MODEL.path(paths),
        catalog.TRAIN_RUN.path(paths),
    )
    for f, stage in ((classes_file, "ingest"), (model_file, "train")):
        if not f.exists():
            raise EvaluateError(f"{f}: missing (run `medclf {stage}` first)")
    meta = catalog.CLASSES.load(paths)
    classes, positive = list(meta["classes"]), meta["positive_class"]
    train_run = catalog.TRAIN_RUN.load(paths) if run_file.exists() else {}
    if train_run.get("classes") and list(train_run["classes"]) != classes:
        raise EvaluateError(f"{run_file}: model classes {train_run['classes']} differ from {classes_file} {classes}")
    model = load_keras(str(model_file))
    k = int(model.output_shape[-1])
    if k != len(classes):
        raise EvaluateError(f"{model_file}: model outputs {k} classes, {classes_file} lists {len(classes)}")
    x_val, y_val = catalog.load_split(paths, "val")
    x_test, y_test = catalog.load_split(paths, "test")
    for split, x in (("val", x_val), ("test", x_test)):
        if len(x) == 0:
            raise EvaluateError(f"{catalog.IMAGES.path(paths, split=split)}: the {split} split is empty")
    digest = file_digest(catalog.IMAGES.path(paths, split="test"), catalog.LABELS.path(paths, split="test"))
    return Inputs(
        classes=classes,
        positive=positive,
        train_run=train_run,
        model=model,
        model_sha256=file_digest(model_file),
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        test_digest=digest,
    )


def predict_proba(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.asarray(model.predict(np.asarray(x), batch_size=batch_size, verbose=0), dtype=np.float64)


def _fig(staging: Path, name: str) -> Path:
    return catalog.inside(catalog.EVALUATE_REPORTS, catalog.FIGURE, staging, name=name)


def _write_gallery(out: Path, inp: Inputs, preds: Predictions, picks: dict[str, list[int]], thr: float, n: int) -> None:
    from medclf.evaluation import plots
    from medclf.modeling import gradcam

    pos = preds.positive
    groups: dict[str, list[dict[str, Any]]] = {}
    for name in GALLERY_GROUPS:
        idx = picks[name]
        images = np.asarray(inp.x_test[idx]) if idx else np.zeros((0,) + inp.x_test.shape[1:], np.uint8)
        heat: np.ndarray | list[np.ndarray] = gradcam.gradcam(inp.model, images, pos) if idx else []
        groups[name] = [
            {
                "overlay": gradcam.overlay(img, h),
                "caption": gallery_caption(int(i), inp.positive, float(preds.proba_test[i, pos]), thr),
            }
            for i, img, h in zip(idx, images, heat, strict=True)
        ]
    plots.gallery_png(
        groups,
        _fig(out, "gradcam"),
        n,
        f"Grad-CAM of the log-odds of '{inp.positive}' on "
        f"{gradcam.split_model(inp.model).layer!r}, threshold {thr:.4f}",
    )


def _shortcut(doc: dict[str, Any], inp: Inputs, seed: int, n: int, fig: Path) -> None:
    """The shortcut check (`medclf.evaluation.shortcut`) into doc["shortcut"], its worst cases into `fig`."""
    doc["shortcut"], worst = shortcut.check_test_set(inp.model, inp.x_test, inp.y_test, inp.classes, seed, n)
    verdict = doc["shortcut"]["warning"] or f"no class over {shortcut.BOUND}x a uniform map's border/corner share"
    plots.gallery_png(worst, fig, n, f"Shortcut check, highest border heat per class: {verdict}")
    if doc["shortcut"]["warning"]:
        log.warning("evaluate: %s", doc["shortcut"]["warning"])


def _external(
    settings: Settings,
    inp: Inputs,
    spec: TaskSpec,
    doc: dict[str, Any],
    gates: dict[str, Any],
    scorer: Any,
    champion_of: Any,
) -> list[dict[str, Any]]:
    """Each `evaluate.external` set (`medclf.evaluation.external`), scored by `scorer` (the candidate at its
    registered decision) and `champion_of` (the champion on the same images), into doc["external"] and gates.json;
    a failed external gate fails the release like any other."""
    if not settings.evaluate.external:
        return []
    from medclf.evaluation import external
    from medclf.sources import scan
    from medclf.sources.decode import decode_all

    manifest, cfg = catalog.MANIFEST.path(settings.paths), settings.ingest

    def load(ext: Any) -> external.ExternalData:  # listed and decoded exactly as ingest does the training data
        scanned = scan(ext.source, inp.classes, None, cfg.label_aliases)
        decoded = decode_all(scanned.records, cfg.model_copy(update={"source": ext.source}))
        return external.from_decoded(
            ext.name, scanned.quarantine, decoded, inp.classes, cfg.max_quarantine_fraction, manifest
        )

    reports = external.evaluate_sets(
        settings.evaluate.external,
        spec,
        load,
        scorer,
        doc["test"],
        champion_of,
    )
    doc["external"] = reports
    failed = external.failures(reports)
    gates["external"] = [{"name": r["name"], "n": r["n"], "passed": r["passed"], "gates": r["gates"]} for r in reports]
    gates["failures"] = [*gates["failures"], *failed]
    gates["passed"] = bool(gates["passed"]) and not failed
    for r in reports:
        shown = ", ".join(f"{k} {r['test'][k]['value']:.3f} (gap {g:+.3f})" for k, g in r["gap"].items())
        log.info("evaluate: external set %s (%d images): %s", r["name"], r["n"], shown)
    return reports


def _robustness(
    settings: Settings, inp: Inputs, gates: dict[str, Any], score: Any, metric: str
) -> dict[str, Any] | None:
    """The robustness report (`medclf.evaluation.robustness`) of the candidate on the test split, at its registered
    decision (`score`), with its optional gate on `metric`'s worst drop; None when `evaluate.robustness` is off."""
    cfg = settings.evaluate.robustness
    if not cfg.enabled:
        return None
    invertible = expects_grey(settings.ingest.modality)
    rep = robustness.robustness_report(
        lambda x: predict_proba(inp.model, x), inp.x_test, inp.y_test, score, settings.evaluate.seed, invertible,
        cfg.perturbations,
    )  # fmt: skip
    rep["metric"], rep["gate"] = metric, robustness.robustness_gate(rep, cfg.max_drop, metric)
    if rep["gate"].get("passed") is False:
        g = rep["gate"]
        gates["failures"] = [*gates["failures"], f"robustness: {metric} drops {g['drop']:.3f} > {g['bound']:g}"]
        gates["passed"] = False
    gates["robustness"] = rep["gate"]
    worst = rep["worst"].get(metric) or {}
    log.info("evaluate: robustness, worst %s drop %s (%s)", metric, worst.get("delta"), worst.get("name"))
    return dict(json_safe(rep))


def _write_robustness(tmp: Path, rep: dict[str, Any] | None, max_drop: float | None) -> None:
    if rep is not None:
        write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.ROBUSTNESS, tmp), rep)
        robustness.robustness_png(rep, _fig(tmp, "robustness"), rep["metric"], max_drop)


def _predictions_csv(staging: Path, classes: Sequence[str], y: np.ndarray, df: Any, manifest: Path) -> None:
    """test_predictions.csv, keyed by the manifest id (no paths, no patient data): the label, then `df`."""
    import pandas as pd

    df.insert(0, "label", [classes[int(i)] for i in y])
    if manifest.exists():
        m = pd.read_parquet(manifest, columns=["id", "split", "row"])
        ids = m[m.split == "test"].sort_values("row")["id"].tolist()
        if len(ids) == len(df):
            df.insert(0, "id", ids)
    df.to_csv(catalog.inside(catalog.EVALUATE_REPORTS, catalog.TEST_PREDICTIONS, staging), index_label="test_row")


def _binary_columns(preds: Predictions, thr: float) -> Any:
    """p_<class>, then `predicted`: the class the registered threshold on the positive class gives."""
    import pandas as pd

    df = pd.DataFrame(preds.proba_test, columns=[f"p_{c}" for c in preds.classes])
    df["predicted"] = [preds.classes[i] for i in metrics.thresholded_labels(preds.proba_test, preds.positive, thr)]
    return df


def reachable(uri: str) -> bool:
    """One quick reachability probe per run (2 attempts): evaluation must work offline too."""
    from medclf.infra.tracking import TrackingUnavailable, wait_for_server

    try:
        wait_for_server(uri, attempts=2)
        return True
    except TrackingUnavailable:
        return False


def _log_to_mlflow(
    settings: Settings,
    train_run: dict[str, Any],
    doc: dict[str, Any],
    gates: dict[str, Any],
    report_dir: Path,
    online: bool,
) -> str:
    """Metrics + pictures into the training run; a note (not a failure) when that is impossible.

    The metrics are grouped (`medclf.infra.tracking.METRIC_PREFIXES`: `test/roc_auc`, `test_t050/f1`, `val/f1`,
    `test/threshold`), at the step after the last epoch. The settings that decide the release (threshold rule,
    target sensitivity, gate bounds, bootstrap: `tracking.release_params`; the ingest split settings:
    `tracking.ingest_params`) are run params, logged once: when this
    training run was already evaluated with other values, the params keep the first ones and the values used now
    are tags of the same names (`tracking.log_params_once`)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from medclf.infra.tracking import evaluate_metric_key, ingest_params, log_params_once, release_params

    run_id = train_run.get("run_id")
    if not run_id:
        return "no train_run.json run_id: metrics not logged to MLflow"
    uri = settings.mlflow.resolved_uri()
    if not online:
        return f"not logged to MLflow: server at {uri} unreachable"
    cl, now = MlflowClient(tracking_uri=uri), int(time.time() * 1000)
    step = final_step(train_run)
    ms = [Metric(evaluate_metric_key(k), float(v), now, step) for k, v in run_metrics(doc).items()]
    tags = [RunTag("evaluate.gates_passed", str(gates["passed"]).lower())]  # the rule: the evaluate.* params
    for i in range(0, len(ms), 500):
        cl.log_batch(run_id, metrics=ms[i : i + 500], tags=tags if i == 0 else [])
    log_params_once(cl, run_id, release_params(settings) | ingest_params(settings.ingest))
    cl.log_table(run_id, data=ci_table(doc), artifact_file=catalog.RUN_CI_TABLE)
    # the figures land under the run's `evaluate/` as under reports/ (the version page links them so)
    cl.log_artifacts(run_id, str(report_dir), catalog.EVALUATE_REPORTS.rel)
    for art in (catalog.EVALUATE_METRICS, catalog.METRICS, catalog.GATES):
        cl.log_artifact(run_id, str(art.path(settings.paths)), catalog.EVALUATE_REPORTS.rel)
    cl.log_artifacts(run_id, str(catalog.PLOTS_DIR.path(settings.paths)), f"{catalog.EVALUATE_REPORTS.rel}/plots")
    return f"logged to run {run_id}"


@declared
def run(settings: Settings) -> dict[str, Any]:
    from medclf.release.registry import champion_reference

    cfg, paths, t0 = settings.evaluate, settings.paths, time.perf_counter()
    inp = _inputs(settings)
    classes = inp.classes
    spec = TaskSpec.from_settings(settings.task, classes, inp.positive)
    if spec.kind == "multilabel":
        from medclf.evaluation.multilabel_branch import Edge, run_multilabel
        from medclf.release.registry import kclass_champion
        from medclf.release.serving import ServingConfig, decisions, task_keys

        def served(proba: np.ndarray, labels: list[str], gates: dict[str, Any]) -> Any:
            return decisions(proba, ServingConfig(labels, labels[-1], 0.5, 1, 1, **task_keys(gates)))

        edge = Edge(
            predict_proba, _fig, _log_to_mlflow, _robustness, _write_robustness, reachable, GateFailed,
            kclass_champion, served,
        )  # fmt: skip
        return run_multilabel(settings, inp, spec, t0, edge)
    if spec.kind != "binary":
        return _run_kclass(settings, inp, spec, t0)
    preds = Predictions(
        inp.y_val,
        predict_proba(inp.model, inp.x_val),
        inp.y_test,
        predict_proba(inp.model, inp.x_test),
        classes,
        inp.positive,
    )
    t_cal = (inp.train_run.get("calibration") or {}).get("temperature")  # folded into the model by train
    groups = subgroups.groups_of_test_split(catalog.MANIFEST.path(paths), len(inp.y_test))  # ingest.subgroups'
    val_patients = subgroups.patients_of_split(catalog.MANIFEST.path(paths), "val", len(inp.y_val))
    report = evaluate_predictions(preds, cfg, t_cal, groups, val_patients)
    thr = report.decision_threshold
    online = reachable(settings.mlflow.resolved_uri())
    champion = champion_reference(
        settings, inp.test_digest, inp.x_test, inp.y_test, classes, reachable=online, rescore=True
    )
    comparison = champion_comparison(preds, thr, champion, cfg)
    gates = evaluate_gates(point_metrics(report), cfg.gates, champion.get("metrics"))
    gates.update(
        {
            "threshold": thr,
            "threshold_rule": cfg.threshold_rule,
            "threshold_source": "validation",
            "model_sha256": inp.model_sha256,
            "test_set_digest": inp.test_digest,
            "train_run_id": inp.train_run.get("run_id"),
            "champion": {k: v for k, v in champion.items() if k not in ("metrics", "proba")},
            **({"comparison": comparison} if comparison else {}),
        }
    )
    if champion.get("note") and gates["non_inferiority"].get("skipped"):
        gates["non_inferiority"]["note"] = champion["note"]
    doc = metrics_document(report)

    def scored(d: Any) -> Any:  # the candidate at its registered threshold
        return external.score_binary(
            d.y, binary_view(d.y, predict_proba(inp.model, d.x), pos).p, thr, cfg.bootstrap, cfg.seed
        )

    def champion_of(d: Any) -> dict[str, Any] | None:
        ref = champion_reference(settings, d.digest, d.x, d.y, classes, reachable=online, rescore=True)
        return None if ref.get("version") is None else {"version": int(ref["version"]), "metrics": ref.get("metrics")}

    pos = preds.positive
    externals = _external(settings, inp, spec, doc, gates, scored, champion_of)

    def shifted(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:  # at the registered threshold
        m = metrics.binary_metrics((y == pos).astype(int), proba[:, pos], thr)
        return {k: m[k] for k in ("roc_auc", "recall", "specificity")}

    robust = _robustness(settings, inp, gates, shifted, "roc_auc")
    doc.update({"robustness": {"worst": robust["worst"], "gate": robust["gate"]}} if robust else {})

    report_dir = catalog.EVALUATE_REPORTS.path(paths)
    with atomic_dir(report_dir) as tmp:
        plots.report_pngs(report, classes, lambda name: _fig(tmp, name))
        if cfg.gradcam_n:
            _write_gallery(tmp, inp, preds, report.gallery, thr, cfg.gradcam_n)
            _shortcut(doc, inp, cfg.seed, cfg.gradcam_n, _fig(tmp, "shortcut"))
        _predictions_csv(tmp, classes, preds.y_test, _binary_columns(preds, thr), catalog.MANIFEST.path(paths))
        write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.THRESHOLD, tmp), report.threshold)
        if comparison:
            pos = preds.positive
            comparison_png(
                preds.test.y,
                preds.test.p,
                thr,
                champion["proba"],
                champion["threshold"],
                (f"not {inp.positive}" if len(classes) > 2 else classes[1 - pos], inp.positive),
                _fig(tmp, "champion_comparison"),
                f"champion v{champion['version']}",
            )
            write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.CHAMPION_COMPARISON, tmp), comparison)
        if externals:
            write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.EXTERNAL_REPORT, tmp), externals)
        _write_robustness(tmp, robust, cfg.robustness.max_drop)
    for name, records in report.plots.items():
        catalog.PLOTS.save(paths, records, name=name)
    catalog.METRICS.save(paths, doc)
    catalog.GATES.save(paths, gates)
    catalog.EVALUATE_METRICS.save(paths, headline(doc, gates))
    mlflow_note = _log_to_mlflow(settings, inp.train_run, doc, gates, report_dir, online)
    result = {
        "passed": gates["passed"],
        "threshold": thr,
        "f1": doc["test"]["f1"],
        "recall": doc["test"]["recall"],
        "roc_auc": doc["test"]["roc_auc"],
        "failures": gates["failures"],
        "gradcam": {k: len(v) for k, v in report.gallery.items()},
        "champion": gates["champion"],
        "mlflow": mlflow_note,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info(
        "evaluate: threshold %.4f (%s on validation), test F1 %.3f recall %.3f, gates %s",
        thr,
        cfg.threshold_rule,
        doc["test"]["f1"] or math.nan,
        doc["test"]["recall"] or math.nan,
        "passed" if gates["passed"] else "FAILED",
    )
    if not gates["passed"]:
        raise GateFailed(
            "release gates failed: " + "; ".join(gates["failures"]) + f" (see {catalog.GATES.path(paths)})"
        )
    return result


def _run_kclass(settings: Settings, inp: Inputs, spec: TaskSpec, t0: float) -> dict[str, Any]:
    """A multi-class or ordinal task (`medclf.evaluation.task`): the decision fitted on validation, test metrics with
    CIs (clustered by patient where known), the family's gates, and the evidence: per-class ROC/PR, confusion matrix,
    reliability, subgroups, predictions, per-class Grad-CAM. The prediction is the argmax (or the ordinal cut-points),
    never one class's threshold."""
    from medclf.evaluation import task as tasks
    from medclf.evaluation.comparison import kclass_comparison_png
    from medclf.evaluation.kclass_comparison import kclass_comparison
    from medclf.modeling import gradcam
    from medclf.release.registry import kclass_champion
    from medclf.release.serving import ServingConfig, decisions, task_keys

    cfg, paths = settings.evaluate, settings.paths
    proba_val, proba_test = predict_proba(inp.model, inp.x_val), predict_proba(inp.model, inp.x_test)
    decision = tasks.fit_decision(spec, inp.y_val, proba_val, cfg.target_sensitivity)
    pred = decision.predict(proba_test)  # the argmax or the ordinal cut-points' grade
    manifest = catalog.MANIFEST.path(paths)
    patients = subgroups.patients_of_test_split(manifest, len(inp.y_test))
    result = tasks.evaluate_kclass(spec, decision, inp.y_test, proba_test, cfg.bootstrap, cfg.seed, patients)
    doc = tasks.metrics_document(spec, decision, result, len(inp.y_val))
    if declared_groups := subgroups.groups_of_test_split(manifest, len(inp.y_test)):  # ingest.subgroups'
        doc["subgroups"] = tasks.subgroup_metrics(
            spec, decision, inp.y_test, proba_test, declared_groups, patients, cfg.bootstrap, cfg.seed
        )
    online = reachable(settings.mlflow.resolved_uri())
    champion = kclass_champion(
        settings, inp.test_digest, inp.classes, spec.kind, reachable=online, x_test=inp.x_test, y_test=inp.y_test
    )
    margin, comparison = float(cfg.gates.non_inferiority_margin), None
    if champion.get("proba") is not None:  # re-scored on this test set by its own rule: the paired comparison
        comparison = kclass_comparison(
            spec, inp.y_test, proba_test, decision, champion["proba"], champion["decision"],
            list(spec.gates(cfg.gates)), margin, cfg.bootstrap, cfg.seed, patients,
        )  # fmt: skip
    paired = comparison["non_inferiority"] if comparison else None
    gates = tasks.check_gates(spec, doc, cfg.gates, champion.get("metrics"), paired=paired)
    gates.update(
        {
            "task": spec.kind,
            "decision": decision.document(),
            "threshold_rule": decision.rule,
            "threshold_source": "validation",
            "model_sha256": inp.model_sha256,
            "test_set_digest": inp.test_digest,
            "train_run_id": inp.train_run.get("run_id"),
            "champion": {k: v for k, v in champion.items() if k not in ("metrics", "proba")},
            **({"comparison": comparison["metrics"]} if comparison else {}),
        }
    )
    if champion.get("note") and gates["non_inferiority"].get("skipped"):
        gates["non_inferiority"]["note"] = champion["note"]

    def scored(d: Any) -> Any:  # the candidate by its registered decision rule
        return external.score_kclass(
            spec, decision, d.y, predict_proba(inp.model, d.x), cfg.bootstrap, cfg.seed, d.patients
        )

    def champion_of(d: Any) -> dict[str, Any] | None:
        ref = kclass_champion(settings, d.digest, inp.classes, spec.kind, reachable=online, x_test=d.x, y_test=d.y)
        return None if ref.get("version") is None else {"version": int(ref["version"]), "metrics": ref.get("metrics")}

    externals = _external(settings, inp, spec, doc, gates, scored, champion_of)
    fn: Any = kclass.ordinal_report if spec.kind == "ordinal" else kclass.multiclass_report
    ref_kw: dict[str, Any] = {}
    if spec.kind == "ordinal" and decision.referable is not None:  # the view `task.evaluate_kclass` reports
        ref_kw = {"referable_from": spec.referable_from, "referable_threshold": decision.referable["threshold"]}

    def shifted(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:  # by the registered decision rule
        flat = kclass.flatten_report(fn(y, proba, classes=inp.classes, pred=decision.predict(proba), **ref_kw))
        return {k: flat[k] for k in ("macro_auc", "balanced_accuracy", "macro_f1")}

    robust = _robustness(settings, inp, gates, shifted, "macro_auc")
    doc.update({"robustness": {"worst": robust["worst"], "gate": robust["gate"]}} if robust else {})
    report_dir = catalog.EVALUATE_REPORTS.path(paths)
    gallery: dict[str, dict[str, int]] = {}
    with atomic_dir(report_dir) as tmp:
        plots.kclass_pngs(doc, inp.y_test, proba_test, lambda name: _fig(tmp, name))
        keys = task_keys({"task": spec.kind, "decision": decision.document()})  # the served model's columns, flags too
        served = decisions(proba_test, ServingConfig(inp.classes, inp.classes[-1], 0.5, 1, 1, **keys))
        served["prediction"] = [inp.classes[i] for i in pred]  # the decision evaluated (serving applies the same rule)
        _predictions_csv(tmp, inp.classes, inp.y_test, served, manifest)
        if n := cfg.gradcam_n:
            cams = gradcam.class_gallery(inp.model, inp.x_test, inp.y_test, pred, proba_test, inp.classes, n)
            title = f"{gradcam.split_model(inp.model).layer!r}; {spec.kind}: {decision.rule}"
            gallery = plots.class_gallery_pngs(cams, inp.classes, lambda name: _fig(tmp, name), n, title)
            _shortcut(doc, inp, cfg.seed, n, _fig(tmp, "shortcut"))
        write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.THRESHOLD, tmp), decision.document())
        if comparison:
            v, names = champion["version"], ("challenger", f"champion v{champion['version']}")
            cms = comparison["confusion"]
            kclass_comparison_png(
                cms["challenger"], cms["champion"], inp.classes, comparison["per_class"],
                _fig(tmp, "champion_comparison"), f"challenger vs champion v{v}, same {comparison['n']} test images",
                names=names, margin=margin,
            )  # fmt: skip
            write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.CHAMPION_COMPARISON, tmp), comparison)
        if externals:
            write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.EXTERNAL_REPORT, tmp), externals)
        _write_robustness(tmp, robust, cfg.robustness.max_drop)
    catalog.METRICS.save(paths, doc)
    catalog.GATES.save(paths, gates)
    catalog.EVALUATE_METRICS.save(paths, tasks.headline(spec, doc, gates))
    mlflow_note = _log_to_mlflow(settings, inp.train_run, doc, gates, report_dir, online)
    log.info("evaluate: %s, decision %s; gates %s", spec.kind, decision.rule, "passed" if gates["passed"] else "FAILED")
    if not gates["passed"]:
        raise GateFailed(
            "release gates failed: " + "; ".join(gates["failures"]) + f" (see {catalog.GATES.path(paths)})"
        )
    return {
        "passed": True,
        "task": spec.kind,
        "decision": decision.rule,
        **{k: doc["test"].get(k) for k in spec.headline()},
        "failures": [],
        "gradcam": gallery,
        "champion": gates["champion"],
        "mlflow": mlflow_note,
        "seconds": round(time.perf_counter() - t0, 1),
    }
