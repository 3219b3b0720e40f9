"""The evaluate stage's multi-label branch (issue 25): one threshold per finding fitted on validation, test CIs.

Called by `medclf.stages.evaluate.run` when `task.type: multilabel`. The model outputs one sigmoid probability per
finding (`task.labels`); the labels are an N×L 0/1 matrix. Each finding is called present when its own probability
reaches its own threshold, fitted on the validation split only (`task.label_rule` / `task.label_rules`:
`evaluate.target_sensitivity`, that finding's own target, or the best F1); the test split is used once, for the
figures. The gates are the family's floors (`evaluate.gates.bounds`, e.g. `auc[glaucoma]: 0.8`, or the defaults)
and non-inferiority against the champion's stored figures on the same test set. The files are the other branches':
metrics.json, gates.json, evaluate.json, per-finding ROC/PR and reliability figures, the test predictions, the
robustness report; every one is written before a failed gate raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medclf.evaluation import multilabel, plots, subgroups
from medclf.infra import catalog
from medclf.infra.io import atomic_dir, write_json

if TYPE_CHECKING:
    from medclf.config import Settings
    from medclf.evaluation.task import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Edge:
    """What the evaluate stage (`medclf.stages.evaluate`) lends this branch: its predictions, figure paths, MLflow
    logging, robustness report, reachability probe and gate failure (passed in: this module never imports it)."""

    predict: Callable[[Any, np.ndarray], np.ndarray]
    fig: Callable[[Path, str], Path]
    log_to_mlflow: Callable[..., str]
    robustness: Callable[..., dict[str, Any] | None]
    write_robustness: Callable[[Path, dict[str, Any] | None, float | None], None]
    reachable: Callable[[str], bool]
    gate_failed: type[Exception]
    champion: Callable[..., dict[str, Any]]
    """`medclf.release.registry.kclass_champion`: the champion of the same task and findings."""
    served: Callable[[np.ndarray, list[str], dict[str, Any]], Any]
    """(test probabilities, findings, gates.json) -> the served model's output frame (`medclf.release.serving`)."""


def _predictions_csv(path: Path, labels: list[str], y: np.ndarray, served: Any, manifest: Path) -> None:
    """test_predictions.csv keyed by the manifest id (no paths, no patient data): the true findings (`truth`,
    ";"-joined), then the served columns (`p_<finding>`, `labels`)."""
    import pandas as pd

    served.insert(0, "truth", [";".join(c for c, v in zip(labels, row, strict=True) if v) for row in y])
    if manifest.exists():
        m = pd.read_parquet(manifest, columns=["id", "split", "row"])
        ids = m[m.split == "test"].sort_values("row")["id"].tolist()
        if len(ids) == len(served):
            served.insert(0, "id", ids)
    served.to_csv(path, index_label="test_row")


def run_multilabel(settings: Settings, inp: Any, spec: TaskSpec, t0: float, edge: Edge) -> dict[str, Any]:
    """The multi-label evaluate: decision on validation, test metrics with patient-clustered CIs, gates, evidence.
    `inp` is the stage's `Inputs` (model, val/test splits, digests)."""
    from medclf.evaluation import task as tasks

    predict_proba, _fig = edge.predict, edge.fig

    cfg, paths, labels = settings.evaluate, settings.paths, list(spec.classes)
    y_val, y_test = np.asarray(inp.y_val), np.asarray(inp.y_test)
    if y_val.ndim != 2 or y_test.ndim != 2 or y_test.shape[1] != len(labels):
        raise ValueError(
            f"{catalog.LABELS.path(paths, split='test')}: a multilabel task needs N×{len(labels)} 0/1 labels "
            f"({labels}); got shape {y_test.shape}: rerun `medclf ingest` with task.type: multilabel"
        )
    proba_val, proba_test = predict_proba(inp.model, inp.x_val), predict_proba(inp.model, inp.x_test)
    task = settings.task
    thresholds = multilabel.fit_thresholds(
        y_val, proba_val, labels, task.label_rule, dict(task.label_rules), cfg.target_sensitivity
    )
    manifest = catalog.MANIFEST.path(paths)
    patients = subgroups.patients_of_test_split(manifest, len(y_test))
    result = multilabel.evaluate_multilabel(y_test, proba_test, labels, thresholds, cfg.bootstrap, cfg.seed, patients)
    doc = multilabel.metrics_document(labels, thresholds, result, len(y_val))
    rule = doc["decision"]["rule"]
    online = edge.reachable(settings.mlflow.resolved_uri())
    # the champion's stored test figures when it was evaluated on this same test set (no re-scoring yet)
    champion = edge.champion(settings, inp.test_digest, labels, spec.kind, reachable=online, rescore=False)
    gates = tasks.check_gates(spec, doc, cfg.gates, champion.get("metrics"))
    gates.update(
        {
            "task": spec.kind,
            "decision": doc["decision"],
            "threshold_rule": rule,
            "threshold_source": "validation",
            "model_sha256": inp.model_sha256,
            "test_set_digest": inp.test_digest,
            "train_run_id": inp.train_run.get("run_id"),
            "champion": {k: v for k, v in champion.items() if k not in ("metrics", "proba")},
        }
    )
    if champion.get("note") and gates["non_inferiority"].get("skipped"):
        gates["non_inferiority"]["note"] = champion["note"]
    if settings.evaluate.external:
        doc["external_note"] = "evaluate.external is not yet scored for multilabel tasks"
        log.warning("evaluate: %s", doc["external_note"])

    def shifted(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:  # by the registered thresholds
        point = multilabel.multilabel_report(y, proba, labels, thresholds)
        return {k: float(point[k]) for k in ("macro_auc", "map", "macro_f1")}

    robust = edge.robustness(settings, inp, gates, shifted, "macro_auc")
    doc.update({"robustness": {"worst": robust["worst"], "gate": robust["gate"]}} if robust else {})
    report_dir = catalog.EVALUATE_REPORTS.path(paths)
    with atomic_dir(report_dir) as tmp:
        plots.multilabel_pngs(doc, y_test, proba_test, lambda name: _fig(tmp, name))
        served = edge.served(proba_test, labels, gates)  # the served model's columns, per-finding thresholds
        _predictions_csv(
            catalog.inside(catalog.EVALUATE_REPORTS, catalog.TEST_PREDICTIONS, tmp), labels, y_test, served, manifest
        )
        write_json(catalog.inside(catalog.EVALUATE_REPORTS, catalog.THRESHOLD, tmp), doc["decision"])
        edge.write_robustness(tmp, robust, cfg.robustness.max_drop)
    catalog.METRICS.save(paths, doc)
    catalog.GATES.save(paths, gates)
    catalog.EVALUATE_METRICS.save(paths, tasks.headline(spec, doc, gates))
    mlflow_note = edge.log_to_mlflow(settings, inp.train_run, doc, gates, report_dir, online)
    log.info("evaluate: multilabel, %s; gates %s", rule, "passed" if gates["passed"] else "FAILED")
    if not gates["passed"]:
        raise edge.gate_failed(
            "release gates failed: " + "; ".join(gates["failures"]) + f" (see {catalog.GATES.path(paths)})"
        )
    return {
        "passed": True,
        "task": spec.kind,
        "decision": rule,
        **{k: doc["test"].get(k) for k in spec.headline()},
        "failures": [],
        "champion": gates["champion"],
        "mlflow": mlflow_note,
        "seconds": round(time.perf_counter() - t0, 1),
    }
