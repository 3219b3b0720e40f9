"""The task seam (issue 24): what kind of decision a model makes, and everything that follows from it.

`TaskSpec` is built once from `task`, `ingest.classes` and `ingest.positive_class`. It names the task family and
owns what differs between families:
- the label codec: one class index per image, `classes` in index order (for ordinal tasks, in grade order);
- the head and loss: a softmax head with categorical cross-entropy for every single-label family, sigmoids with
  binary cross-entropy for the multi-label one;
- the score that picks the epoch: the validation macro one-vs-rest AUC (`medclf.training.data.val_scores`);
- the decision rule fitted on validation only (`fit_decision`);
- the metrics and the names of the gateable ones (`medclf.config.vocabulary.gateable_metrics`);
- the one-vs-rest views for curves and explanations;
- the output schema (`output_columns`).

The binary family is today's path: one threshold on `positive_class`, chosen on validation
(`medclf.evaluation.report`). The multi-class family predicts the argmax, always: a critical class (e.g. mel)
raises a *flag* when its probability reaches a threshold fitted on validation for `evaluate.target_sensitivity`,
and the flag never replaces the predicted class. The ordinal family predicts the grade by cut-points on the
expected grade, fitted on validation for the best quadratic weighted kappa (or the argmax), and may add a referable
view, P(grade >= k), with its own validation threshold. The multi-label family (issue 25) has one sigmoid per
finding (`task.labels`), binary cross-entropy with per-finding positive weights, and one threshold per finding
fitted on validation (`medclf.evaluation.multilabel`); labels are then an N×L 0/1 matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medclf.config import Gates, Task
from medclf.config.vocabulary import (
    FAMILY_GATES,
    GATES,
    KCLASS_HEADLINE,
    MULTILABEL_HEADLINE,
    TaskKind,
    canonical_gate,
    gateable_metrics,
)
from medclf.config.vocabulary import (
    OUTPUT_SCHEMA_VERSION as OUTPUT_SCHEMA_VERSION,
)
from medclf.evaluation import kclass, metrics
from medclf.evaluation.gates import check_floors
from medclf.infra.io import json_safe

Kind = TaskKind


@dataclass(frozen=True)
class TaskSpec:
    """The task family and its options, resolved against the classes the data has."""

    kind: Kind
    classes: tuple[str, ...]
    positive: int | None = None
    """binary: the index of the positive class."""
    critical: tuple[int, ...] = ()
    """multiclass: indices of the classes flagged at a validation-fitted threshold."""
    referable_from: int | None = None
    """ordinal: the lowest referable grade index."""
    ordinal_rule: str = "expected_grade"
    head: str = field(default="softmax")
    loss: str = field(default="categorical_crossentropy")

    @classmethod
    def from_settings(cls, task: Task, classes: Sequence[str], positive_class: str | None) -> TaskSpec:
        if task.type == "multilabel":  # the findings are task.labels (ingest writes them as classes.json's classes)
            return cls("multilabel", tuple(task.labels), head="sigmoid", loss="binary_crossentropy")
        classes = tuple(classes)
        kind = task.resolved(len(classes))
        if kind == "binary":
            return cls("binary", classes, positive=classes.index(positive_class or classes[-1]))
        return cls(
            kind,
            classes,
            critical=tuple(classes.index(c) for c in task.critical_classes) if kind == "multiclass" else (),
            referable_from=classes.index(task.referable_from) if task.referable_from else None,
            ordinal_rule=task.ordinal_rule,
        )

    @property
    def critical_names(self) -> list[str]:
        return [self.classes[i] for i in self.critical]

    def gateable(self) -> set[str]:
        return gateable_metrics(self.kind, list(self.classes), self.critical_names, self.referable_from is not None)

    def gates(self, cfg: Gates) -> dict[str, float]:
        """`{canonical metric: floor}`: `evaluate.gates.bounds` if given, else the family's defaults (binary: the
        min_* keys, as `medclf.evaluation.gates` applies them)."""
        if cfg.bounds:
            return {canonical_gate(k): float(v) for k, v in cfg.bounds.items()}
        if self.kind == "binary":
            return {m: float(b) for key, m in GATES.items() if (b := getattr(cfg, key)) is not None}
        return dict(FAMILY_GATES[self.kind])

    def headline(self) -> tuple[str, ...]:
        """The test metrics `dvc metrics show` and the version tags carry."""
        if self.kind == "multilabel":
            return MULTILABEL_HEADLINE
        extra = ("qwk", "mae") if self.kind == "ordinal" else ()
        return KCLASS_HEADLINE + extra + (("referable.auc", "referable.sensitivity") if self.referable_from else ())

    def output_columns(self) -> list[str]:
        """The scoring output of `medclf predict` and the served model, schema `OUTPUT_SCHEMA_VERSION`."""
        if self.kind == "binary":  # schema 1's columns, kept by schema 2
            return [f"p_{c}" for c in self.classes] + ["label", "positive"]
        if self.kind == "multilabel":  # schema 3: each finding's probability, the findings called present
            return [f"p_{c}" for c in self.classes] + ["labels"] + [f"present_{c}" for c in self.classes]
        cols = [f"p_{c}" for c in self.classes] + ["prediction"]
        cols += [f"flag_{c}" for c in self.critical_names]
        if self.referable_from is not None:
            cols += ["p_referable", "referable"]
        return cols


@dataclass(frozen=True)
class Decision:
    """A K-class decision rule fitted on validation: how a probability row becomes a class, and the flags."""

    rule: str
    """The rule in words, as the model card and the version page state it."""
    cutpoints: tuple[float, ...] = ()
    """ordinal expected_grade: K-1 increasing cut-points on E[grade]."""
    flags: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """critical class -> {threshold, val_sensitivity, val_specificity, n_positive}."""
    referable: Mapping[str, float] | None = None
    """ordinal referable view: {from_index, threshold, val_sensitivity, val_specificity, n_positive}."""

    def predict(self, proba: np.ndarray) -> np.ndarray:
        """The class (or grade) index per row: the argmax, or the grade the cut-points give."""
        if self.cutpoints:
            return kclass.apply_cutpoints(proba, list(self.cutpoints))
        return np.asarray(np.asarray(proba).argmax(axis=1), dtype=np.int64)

    def document(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "cutpoints": list(self.cutpoints),
            "flags": {k: dict(v) for k, v in self.flags.items()},
            "referable": dict(self.referable) if self.referable else None,
            "source": "validation",
        }


def referable_score(proba: np.ndarray, from_index: int) -> np.ndarray:
    """P(grade >= from_index): the referable view's score."""
    return np.asarray(np.asarray(proba, dtype=float)[:, from_index:].sum(axis=1))


def fit_decision(spec: TaskSpec, y_val: np.ndarray, proba_val: np.ndarray, target_sensitivity: float) -> Decision:
    """The K-class decision rule, from the validation split only."""
    if spec.kind == "binary":
        raise ValueError("binary tasks keep their threshold rule (medclf.evaluation.report.choose_operating_threshold)")
    y_val, proba_val = np.asarray(y_val, dtype=np.int64), np.asarray(proba_val, dtype=float)
    flags: dict[str, dict[str, float]] = {}
    for i in spec.critical:
        flags[spec.classes[i]] = kclass.fit_class_threshold(y_val == i, proba_val[:, i], target_sensitivity)
    referable = None
    if spec.referable_from is not None:
        k = spec.referable_from
        fit = kclass.fit_class_threshold(y_val >= k, referable_score(proba_val, k), target_sensitivity)
        referable = {"from_index": float(k), **fit}
    cuts: tuple[float, ...] = ()
    if spec.kind == "ordinal" and spec.ordinal_rule == "expected_grade":
        cuts = tuple(kclass.fit_ordinal_cutpoints(y_val, proba_val, len(spec.classes)))
        rule = (
            "grade = the number of cut-points at or below the expected grade sum_k k*p_k; cut-points "
            f"{', '.join(f'{c:.3f}' for c in cuts)} fitted on validation for the best quadratic weighted kappa"
        )
    elif spec.kind == "ordinal":
        rule = "grade = the most probable grade (argmax)"
    else:
        rule = "class = the most probable class (argmax)"
    for name, f in flags.items():
        rule += (
            f"; '{name}' is also flagged when p({name}) >= {f['threshold']:.4f} (fitted on validation for "
            f"sensitivity {target_sensitivity:g}; the flag never changes the predicted class)"
        )
    if referable is not None:
        rule += (
            f"; referable when P(grade >= {spec.classes[spec.referable_from or 0]}) >= {referable['threshold']:.4f} "
            f"(fitted on validation for sensitivity {target_sensitivity:g})"
        )
    return Decision(rule, cuts, flags, referable)


def evaluate_kclass(
    spec: TaskSpec,
    decision: Decision,
    y: np.ndarray,
    proba: np.ndarray,
    n_boot: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Test metrics of a K-class decision with 95 % bootstrap CIs (clustered by `groups` when given).

    Returns {"test": {name: {value, ci_low, ci_high}}, "report": the point report with per-class table and
    confusion matrix, "critical": per flag {sensitivity, specificity} with CIs}."""
    y, proba = np.asarray(y, dtype=np.int64), np.asarray(proba, dtype=float)
    pred = decision.predict(proba)
    classes = list(spec.classes)
    kw: dict[str, Any] = {"classes": classes, "pred": pred}
    if spec.kind == "ordinal":
        fn: Any = kclass.ordinal_report
        if decision.referable is not None:
            kw.update(referable_from=spec.referable_from, referable_threshold=decision.referable["threshold"])
    else:
        fn = kclass.multiclass_report
    point = fn(y, proba, **kw)
    test = kclass.bootstrap_report_ci(fn, y, proba, n_boot, seed, groups=groups, **kw)
    for name, f in decision.flags.items():
        i = classes.index(name)
        flag_ci = kclass.bootstrap_report_ci(
            _flag_report, y == i, proba[:, i], n_boot, seed, groups=groups, threshold=f["threshold"]
        )
        test.update({f"critical.{name}.{k}": v for k, v in flag_ci.items()})
    return {"test": test, "report": point}


def _flag_report(is_class: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of a critical-class flag (p >= threshold)."""
    is_class, flagged = np.asarray(is_class, dtype=bool), np.asarray(p) >= threshold
    pos, neg = is_class.sum(), (~is_class).sum()
    return {
        "sensitivity": float((flagged & is_class).sum() / pos) if pos else float("nan"),
        "specificity": float((~flagged & ~is_class).sum() / neg) if neg else float("nan"),
    }


def metrics_document(spec: TaskSpec, decision: Decision, result: Mapping[str, Any], n_val: int) -> dict[str, Any]:
    """`reports/metrics.json` of a K-class task: every test metric with its CI under its own name
    (`balanced_accuracy`, `macro_auc`, `qwk`, `per_class.<class>.recall`, `referable.sensitivity`, ...), the
    per-class table, the confusion matrix (counts and row-normalised) and the decision rule."""
    test: dict[str, Any] = {}
    for name, v in result["test"].items():
        test[name], test[f"{name}_ci_low"], test[f"{name}_ci_high"] = v["value"], v["ci_low"], v["ci_high"]
    report = result["report"]
    doc: dict[str, Any] = json_safe(
        {
            "task": spec.kind,
            "classes": list(spec.classes),
            "decision": decision.document(),
            "val": {"n": n_val},
            "test": {**test, "n": int(sum(c["support"] for c in report["per_class"].values()))},
            "per_class": report["per_class"],
            "confusion": report["confusion"],
        }
    )
    return doc


def headline(spec: TaskSpec, doc: Mapping[str, Any], gates: Mapping[str, Any]) -> dict[str, Any]:
    """`reports/evaluate.json` (`dvc metrics show`): the task's headline test metrics at 3 decimals and the number
    of failed gates."""
    test = doc["test"]
    out = {k: None if test.get(k) is None else round(float(test[k]), 3) for k in spec.headline()}
    return {**out, "failed": len(gates["failures"])}


def check_gates(
    spec: TaskSpec,
    doc: Mapping[str, Any],
    cfg: Gates,
    champion: Mapping[str, float] | None,
    paired: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The family's floors (`TaskSpec.gates`) on the test metrics, and non-inferiority on every gated metric.

    Non-inferiority is the paired-bootstrap verdict `paired` when given (the ``non_inferiority`` of
    `medclf.evaluation.kclass_comparison.kclass_comparison`, champion re-scored on this test set; it must hold an
    entry for every gated metric), else the point comparison with the `champion`'s metrics (value >= champion -
    margin; skipped without a champion)."""
    floors = spec.gates(cfg)
    values = {k: float(v) for k, v in doc["test"].items() if isinstance(v, (int, float)) and v is not None}
    named = [(name, name, bound) for name, bound in floors.items()]
    margin = float(cfg.non_inferiority_margin)
    if paired is None:
        return check_floors(values, named, list(floors), margin, champion)
    missing = set(floors) - {e["metric"] for e in paired.get("entries", [])}
    if missing:
        raise ValueError(f"the paired champion comparison lacks the gated metric(s) {sorted(missing)}")
    out = check_floors(values, named, [], margin, None)
    failures = [*out["failures"], *paired.get("failures", [])]
    ni = {k: v for k, v in paired.items() if k != "failures"}
    return {**out, "non_inferiority": ni, "failures": failures, "passed": not failures}


SUBGROUP_FIGURES = ("accuracy", "balanced_accuracy", "macro_auc")
"""The figures of each category of a K-class task (`subgroup_metrics`; ordinal adds `qwk` and `mae`)."""
_PARTS = (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))


def subgroup_metrics(
    spec: TaskSpec,
    decision: Decision,
    y: np.ndarray,
    proba: np.ndarray,
    groups: dict[str, np.ndarray],
    patients: np.ndarray | None,
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{column: {category: {n, support: {class: n}, accuracy, balanced_accuracy, macro_auc (ordinal: qwk, mae),
    each with _ci_low/_ci_high}}}: a K-class task's decision per category of each declared subgroup (`groups`, from
    `groups_of_test_split`), as `metrics.subgroup_metrics` does for a binary one. The bootstrap is clustered by
    `patients` where given; a category under `metrics.SUBGROUP_MIN_N` images gets its point figures and a note, no
    CI; a figure a category cannot define (the macro AUC with a class absent) is None (strict JSON)."""
    fn: Any = kclass.ordinal_report if spec.kind == "ordinal" else kclass.multiclass_report
    kw: dict[str, Any] = {"classes": list(spec.classes)}
    if spec.kind == "ordinal" and decision.referable is not None:  # the view `task.evaluate_kclass` reports
        kw.update(referable_from=spec.referable_from, referable_threshold=decision.referable["threshold"])
    names = SUBGROUP_FIGURES + (("qwk", "mae") if spec.kind == "ordinal" else ())
    y, pred = np.asarray(y, dtype=np.int64), decision.predict(proba)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for column, cats in groups.items():
        cats, out[column] = np.asarray(cats).astype(str), {}
        for cat in sorted(set(cats.tolist())):
            idx = np.flatnonzero(cats == cat)
            few = idx.size < metrics.SUBGROUP_MIN_N
            cluster = None if patients is None else patients[idx]
            boot = 0 if few else n_boot
            figures = kclass.bootstrap_report_ci(fn, y[idx], proba[idx], boot, seed, cluster, pred=pred[idx], **kw)
            row: dict[str, Any] = {
                "n": int(idx.size),
                "support": {c: int((y[idx] == i).sum()) for i, c in enumerate(spec.classes)},
            }
            for m in names:
                row.update({m + suffix: figures[m][part] for suffix, part in _PARTS})
            if few:
                row["note"] = f"n < {metrics.SUBGROUP_MIN_N}: point figures only, no CI"
            out[column][cat] = json_safe(row)
    return out
