"""The evaluation report: a model's validation and test predictions in, every number the evaluate stage writes out.

Pure (no file I/O, no MLflow, no Keras): `medclf.stages.evaluate` loads the model and the splits, predicts, and
hands the arrays here as `Predictions`; `evaluate_predictions` returns the typed `Report` that the stage saves,
draws and logs. Order matters and is enforced by the signatures: the operating threshold is a function of the
validation predictions only (`choose_operating_threshold` takes the validation `Binary` view and nothing else);
test metrics are then reported at that threshold and at 0.5, with bootstrap 95 % CIs.

The task's one-vs-rest view (is the label the positive class, the positive class's probability) is computed once
per split, when `Predictions` is built, and read from there by every metric, curve and pick below.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medclf.config import Evaluate
from medclf.config.vocabulary import HEADLINE
from medclf.evaluation import calibration, metrics
from medclf.evaluation.comparison import paired_differences
from medclf.infra.io import json_safe

DEFAULT_THRESHOLD = 0.5
MIN_VAL_POSITIVES = 50
"""Fewer validation positives than this and the operating point carries a warning: a threshold fitted on ~20 positives
is noise (BreastMNIST: 21 positives, sensitivity 0.95 on them, test specificity 0.18)."""
THRESHOLD_RESAMPLES = 200
"""Bootstrap resamples of the validation split behind the threshold's own 95 % interval (`operating_point`)."""
GALLERY_GROUPS = ("true positives", "false positives", "false negatives")
_HEADLINE_COLUMN = {"roc_auc": "auc"}
_METRIC_NAME = re.compile(
    r"[^\w\-. /]"
)  # what MLflow accepts in a metric name  # `dvc metrics show` column of a HEADLINE metric, where not its key


@dataclass(frozen=True, eq=False)
class Binary:
    """One split's one-vs-rest view: `y` is 1 where the label is the positive class, `p` its probability."""

    y: np.ndarray
    p: np.ndarray


def binary_view(y: np.ndarray, proba: np.ndarray, positive: int) -> Binary:
    """One-vs-rest view of labels `y` and (N, K) probabilities `proba` on class index `positive`."""
    proba = np.asarray(proba, dtype=float)
    return Binary((np.asarray(y) == positive).astype(np.int64), np.clip(proba[:, positive], 0.0, 1.0))


@dataclass(frozen=True, eq=False)
class Predictions:
    """A model's class probabilities on the validation and test splits, with their labels (class indices).

    `positive` (the index of `positive_class`) and the one-vs-rest views `val` and `test` are derived once, here.
    """

    y_val: np.ndarray
    proba_val: np.ndarray
    y_test: np.ndarray
    proba_test: np.ndarray
    classes: Sequence[str]
    positive_class: str
    positive: int = field(init=False)
    val: Binary = field(init=False)
    test: Binary = field(init=False)

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        positive = classes.index(self.positive_class)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "positive", positive)
        object.__setattr__(self, "val", binary_view(self.y_val, self.proba_val, positive))
        object.__setattr__(self, "test", binary_view(self.y_test, self.proba_test, positive))


@dataclass(frozen=True)
class Report:
    """Every number of the evaluation (`metrics_document` turns it into `reports/metrics.json`)."""

    threshold: dict[str, Any]
    """The operating threshold and its validation figures (`metrics.choose_threshold`), and under `operating_point`
    the threshold's bootstrap interval with its warning (`operating_point`): threshold.json."""
    test: dict[str, dict[str, float]]
    """Test metrics at the chosen threshold, each {value, ci_low, ci_high}."""
    test_counts: dict[str, int]
    test_default_threshold: dict[str, dict[str, float]]
    """Test metrics at `DEFAULT_THRESHOLD` (0.5), each {value, ci_low, ci_high}."""
    test_default_counts: dict[str, int]
    n_val: int
    n_test: int
    multiclass: dict[str, Any] | None = None
    """Macro, weighted and per-class figures with CIs (more than two classes only)."""
    calibration: dict[str, float] | None = None
    """Test ECE/Brier before and after the temperature folded into the model (`calibration.effect`); None: none."""
    subgroups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """{subgroup: {category: figures}} (`metrics.subgroup_metrics`); {} without declared subgroups."""
    plots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """DVC plot records (`plot_data`)."""
    calibration_before: list[dict[str, Any]] | None = None
    """The calibration curve with the temperature undone, drawn beside the model's (not a DVC plot)."""
    gallery: dict[str, list[int]] = field(default_factory=dict)
    """Test indices of the Grad-CAM gallery by group (`gallery_indices`); {} when the gallery is off."""

    @property
    def decision_threshold(self) -> float:
        """The operating threshold chosen on validation data."""
        thr: float = self.threshold["threshold"]
        return thr


def choose_operating_threshold(val: Binary, cfg: Evaluate) -> dict[str, Any]:
    """The decision threshold, from VALIDATION predictions only (the signature admits nothing else)."""
    return metrics.choose_threshold(val.y, val.p, cfg.threshold_rule, cfg.target_sensitivity)


def threshold_resamples(
    val: Binary, cfg: Evaluate, patients: np.ndarray | None = None, n: int = THRESHOLD_RESAMPLES
) -> np.ndarray:
    """The threshold re-fitted by `cfg`'s rule on `n` bootstrap resamples of the validation split, drawn from
    `cfg.seed`: of rows, or with `patients` (one id per validation row) of whole patients. A resample that lacks a
    class has no threshold and is skipped."""
    rows = np.arange(val.y.size)
    if patients is None:
        inverse, n_units = rows, rows.size
    else:
        g = np.asarray(patients)
        if g.shape != val.y.shape:
            raise ValueError(f"patients must hold one id per validation row ({val.y.size}); got shape {g.shape}")
        uniq, inverse = np.unique(g, return_inverse=True)
        n_units = uniq.size
    rng, out = np.random.default_rng(cfg.seed), []
    for _ in range(n):
        idx = np.repeat(rows, np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)[inverse])
        y = val.y[idx]
        if 0 < y.sum() < y.size:
            out.append(metrics.choose_threshold(y, val.p[idx], cfg.threshold_rule, cfg.target_sensitivity)["threshold"])
    return np.asarray(out, dtype=float)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def operating_point(
    val: Binary, test: Binary, choice: dict[str, Any], cfg: Evaluate, patients: np.ndarray | None = None
) -> dict[str, Any]:
    """How far the validation-chosen threshold can be trusted: its 2.5/97.5 percentiles over `threshold_resamples`
    (none when `cfg.bootstrap` is 0), the test sensitivity and specificity those two thresholds give (ascending
    [low, high]), and a warning (None when `MIN_VAL_POSITIVES` or more validation positives back it). Strict JSON."""
    thr, n_pos = float(choice["threshold"]), int(val.y.sum())
    boot = threshold_resamples(val, cfg, patients) if cfg.bootstrap else np.empty(0)
    lo, hi = (float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))) if boot.size else (None, None)
    spec: list[float | None] = [None, None]
    sens: list[float | None] = [None, None]
    if lo is not None and hi is not None:  # a lower threshold calls more positive: more sensitive, less specific
        at_lo, at_hi = (json_safe(metrics.binary_metrics(test.y, test.p, t)) for t in (lo, hi))
        spec, sens = [at_lo["specificity"], at_hi["specificity"]], [at_hi["recall"], at_lo["recall"]]
    warning = None
    if n_pos < MIN_VAL_POSITIVES:
        rule = choice["rule"] + (f" {choice['target_sensitivity']:g}" if "target_sensitivity" in choice else "")
        interval = (
            f"95 % interval {_fmt(lo, '.3g')}–{_fmt(hi, '.3g')}); test specificity would range "
            f"{_fmt(spec[0], '.2f')}–{_fmt(spec[1], '.2f')} and sensitivity {_fmt(sens[0], '.2f')}–"
            f"{_fmt(sens[1], '.2f')} over that interval"
            if lo is not None
            else "no bootstrap interval: evaluate.bootstrap is 0)"
        )
        warning = (
            f"the operating point rests on {n_pos} validation positives (fewer than {MIN_VAL_POSITIVES}): "
            f"threshold {thr:.3g} by {rule} ({interval}"
        )
    out: dict[str, Any] = json_safe(
        {
            "threshold": thr,
            "ci_low": lo,
            "ci_high": hi,
            "val_positives": n_pos,
            "val_negatives": int(val.y.size - n_pos),
            "test_specificity_range": spec,
            "test_sensitivity_range": sens,
            "resamples": int(boot.size),
            "clustered_by_patient": patients is not None,
            "warning": warning,
        }
    )
    return out


def _counts(b: Binary, threshold: float) -> dict[str, int]:
    return {k: int(v) for k, v in metrics.binary_metrics(b.y, b.p, threshold).items() if k in metrics.COUNTS}


def evaluate_predictions(
    preds: Predictions,
    cfg: Evaluate,
    temperature: float | None = None,
    groups: Mapping[str, np.ndarray] | None = None,
    val_patients: np.ndarray | None = None,
) -> Report:
    """Every number of the evaluation, from predictions. `temperature`: the one train folded into the model
    (train_run.json's `calibration`), for the before/after figures; `groups`: each declared subgroup's category
    per test image (`medclf.evaluation.subgroups.groups_of_test_split`); `val_patients`: the patient of each
    validation image, for a threshold interval over whole patients (None: over rows)."""
    choice = choose_operating_threshold(preds.val, cfg)
    b, thr = preds.test, choice["threshold"]
    choice["operating_point"] = operating_point(preds.val, b, choice, cfg, val_patients)
    multiclass = (
        metrics.multiclass_with_ci(preds.y_test, preds.proba_test, list(preds.classes), cfg.bootstrap, cfg.seed)
        if len(preds.classes) > 2
        else None
    )
    return Report(
        threshold=choice,
        test=metrics.metrics_with_ci(b.y, b.p, thr, cfg.bootstrap, cfg.seed),
        test_counts=_counts(b, thr),
        test_default_threshold=metrics.metrics_with_ci(b.y, b.p, DEFAULT_THRESHOLD, cfg.bootstrap, cfg.seed),
        test_default_counts=_counts(b, DEFAULT_THRESHOLD),
        n_val=len(preds.y_val),
        n_test=len(preds.y_test),
        multiclass=multiclass,
        calibration=calibration.effect(preds.y_test, preds.proba_test, preds.positive, temperature)
        if temperature
        else None,
        subgroups=metrics.subgroup_metrics(b.y, b.p, groups, thr, cfg.bootstrap, cfg.seed) if groups else {},
        plots=plot_data(preds, thr),
        calibration_before=uncalibrated_curve(preds, temperature),
        gallery=gallery_indices(preds, thr, cfg.gradcam_n) if cfg.gradcam_n else {},
    )


def point_metrics(report: Report) -> dict[str, float]:
    """Test metrics at the chosen threshold, {name: value}: what the gates and the registry read."""
    return {k: v["value"] for k, v in report.test.items()}


def _flat(with_ci: dict[str, dict[str, float]], counts: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in with_ci.items():
        out[k], out[f"{k}_ci_low"], out[f"{k}_ci_high"] = (
            json_safe(v[part]) for part in ("value", "ci_low", "ci_high")
        )
    out.update({k: int(c) for k, c in counts.items()})
    return out


def metrics_document(report: Report) -> dict[str, Any]:
    """`reports/metrics.json`: numbers only (NaN as null), nested one level, so `dvc metrics diff` compares them."""
    ch = report.threshold
    doc: dict[str, Any] = {
        "threshold": json_safe(ch["threshold"]),
        "val": {
            "sensitivity": json_safe(ch["val_sensitivity"]),
            "specificity": json_safe(ch["val_specificity"]),
            "f1": json_safe(ch["val_f1"]),
            "n": report.n_val,
        },
        "test": {**_flat(report.test, report.test_counts), "n": report.n_test},
        "test_default_threshold": {
            **_flat(report.test_default_threshold, report.test_default_counts),
            "threshold": DEFAULT_THRESHOLD,
        },
    }
    doc.update({"operating_point": ch["operating_point"]} if "operating_point" in ch else {})
    doc.update({"calibration": json_safe(report.calibration)} if report.calibration else {})
    doc.update({"subgroups": report.subgroups} if report.subgroups else {})  # medclf.evaluation.subgroups
    if report.multiclass is not None:
        mc = dict(report.multiclass)
        per_class = mc.pop("per_class")
        doc["multiclass"] = {**json_safe(mc), "per_class": json_safe(per_class)}
    return doc


def headline(doc: dict[str, Any], gates: dict[str, Any]) -> dict[str, Any]:
    """`reports/evaluate.json`, the stage's line in `dvc metrics show`: the test split's AUC, F1, recall
    and specificity at the chosen threshold (3 decimals, as the registry shows them), the threshold, and
    how many release gates failed (0 = passed; the column validate's headline uses for failed checks).
    CIs, the 0.5-threshold figures, per-class values and the champion stay in metrics.json / gates.json."""
    test = doc["test"]
    out: dict[str, Any] = {
        _HEADLINE_COLUMN.get(k, k): None if test.get(k) is None else round(test[k], 3) for k in HEADLINE
    }
    return {**out, "threshold": doc["threshold"], "failed": len(gates["failures"])}


def champion_comparison(
    preds: Predictions, threshold: float, champion: dict[str, Any], cfg: Evaluate
) -> dict[str, Any] | None:
    """Challenger minus champion on the same test images, each at its own threshold (None without one)."""
    if champion.get("proba") is None:
        return None
    b = preds.test
    return paired_differences(
        b.y, b.p, threshold, np.asarray(champion["proba"]), float(champion["threshold"]), cfg.bootstrap, cfg.seed
    )


def plot_data(preds: Predictions, threshold: float) -> dict[str, list[dict[str, Any]]]:
    """DVC plot records: curves for the positive class, and one {actual, predicted} row per test image."""
    b, classes = preds.test, preds.classes
    pred = metrics.thresholded_labels(preds.proba_test, preds.positive, threshold)
    return {
        "roc": metrics.roc_points(b.y, b.p),
        "pr": metrics.pr_points(b.y, b.p),
        "calibration": metrics.calibration_curve_points(b.y, b.p),
        "confusion": [
            {"actual": classes[int(a)], "predicted": classes[int(c)]} for a, c in zip(preds.y_test, pred, strict=True)
        ],
    }


def uncalibrated_curve(preds: Predictions, temperature: float | None) -> list[dict[str, Any]] | None:
    """The test calibration curve of softmax(T log p), the model's scores before its temperature (None without)."""
    if not temperature:
        return None
    b = binary_view(preds.y_test, calibration.rescale(preds.proba_test, 1 / temperature), preds.positive)
    return metrics.calibration_curve_points(b.y, b.p)


def gallery_indices(preds: Predictions, threshold: float, n: int) -> dict[str, list[int]]:
    """Up to `n` test indices per group, the most confident mistakes/hits first (most instructive)."""
    yb, pb = preds.test.y, preds.test.p
    called = pb >= threshold
    groups = {
        "true positives": (yb == 1) & called,
        "false positives": (yb == 0) & called,
        "false negatives": (yb == 1) & ~called,
    }
    out = {}
    for name, mask in groups.items():
        idx = np.flatnonzero(mask)
        order = np.argsort(pb[idx] if name == "false negatives" else -pb[idx], kind="stable")
        out[name] = [int(i) for i in idx[order][:n]]
    return out


def gallery_caption(index: int, positive: str, p: float, threshold: float) -> str:
    """Enough digits to tell each case from the threshold (a FN at 0.0071 and a FP at 0.0105 both read
    "0.01" at two decimals beside "threshold 0.009"), and which side of it the case fell on."""
    side = ">=" if p >= threshold else "<"
    return f"#{index}  p({positive})={p:.4f} {side} {threshold:.4f}"


def run_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """Point values only, for the run's metrics (the 95 % CIs go to a table, see `ci_table`)."""
    out: dict[str, float] = {"decision_threshold": float(doc["threshold"])} if "threshold" in doc else {}
    for sec, prefix in (("test", "test_"), ("test_default_threshold", "test_t050_"), ("val", "val_")):
        for k, v in (doc.get(sec) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("_ci_low", "_ci_high")):
                out[_METRIC_NAME.sub("_", prefix + k)] = float(v)  # a class name may hold `,` or `(`
    return out


def ci_table(doc: dict[str, Any]) -> dict[str, list[Any]]:
    """One row per test metric: value and 95 % bootstrap CI, at the registered and at the 0.5 threshold."""
    rows: dict[str, list[Any]] = {"metric": [], "threshold": [], "value": [], "ci_low": [], "ci_high": []}
    for sec, thr in (("test", "registered"), ("test_default_threshold", "0.5")):
        for k, v in (doc.get(sec) or {}).items():
            if f"{k}_ci_low" in doc[sec]:
                rows["metric"].append(k)
                rows["threshold"].append(thr)
                rows["value"].append(v)
                rows["ci_low"].append(doc[sec][f"{k}_ci_low"])
                rows["ci_high"].append(doc[sec][f"{k}_ci_high"])
    return rows
