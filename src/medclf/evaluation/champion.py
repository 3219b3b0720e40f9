"""Scoring the current champion on this test set: its probabilities in, the reference the gates compare with out.

`medclf.release.registry.champion_reference` (binary) and `kclass_champion` (multi-class, ordinal) find the champion
version, load its model and run it on the test images; what those probabilities mean for the non-inferiority gate
and the challenger-versus-champion report is decided here. A K-class champion is scored by its own registered
decision (`kclass_decision`: the argmax or its cut-points, its flag and referable thresholds), never the
challenger's. Arrays in, numbers out: nothing here loads a model or talks to MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medclf.config.vocabulary import NON_INFERIORITY, TaskKind
from medclf.evaluation import metrics
from medclf.evaluation.task import Decision, TaskSpec, evaluate_kclass

FROM_TAGS = "version tags (same test set)"
"""`source` of a reference whose metrics are the champion version's own `metric.*` tags."""
RESCORED = "re-scored on this test set at its registered threshold"
"""`source` of a reference whose metrics were computed here from the champion's probabilities."""
RESCORED_KCLASS = "re-scored on this test set by its registered decision rule"
"""`source` of a K-class reference computed here from the champion's probabilities and its own decision."""


def tags_suffice(stored: dict[str, float], tagged_digest: str | None, test_digest: str) -> bool:
    """The champion's stored `metric.*` tags can stand for it on this test set: they were measured on the same
    test set (same `test_set_digest`) and hold every metric the non-inferiority gate reads."""
    return tagged_digest == test_digest and set(NON_INFERIORITY) <= stored.keys()


def positive_proba(proba: Any, positive_index: int) -> np.ndarray:
    """The positive-class column of a model's (n, k) class probabilities, clipped to [0, 1]."""
    p_pos: np.ndarray = np.clip(np.asarray(proba)[:, positive_index], 0, 1)
    return p_pos


def score_champion(
    y_test: Any, proba: Any, positive_index: int, threshold: float, rescore: bool = True
) -> dict[str, Any]:
    """The champion's scores on this test set: `proba` (its positive-class probabilities) and `threshold` (its own
    registered one), and with `rescore` also `metrics`, the binary test metrics at that threshold.

    `y_test` holds class indices; a label is positive when it equals `positive_index` (the champion's own
    positive class, whose column of `proba` is read).
    """
    p_pos = positive_proba(proba, positive_index)
    scores: dict[str, Any] = {}
    if rescore:
        y = (np.asarray(y_test) == positive_index).astype(int)
        scores["metrics"] = metrics.binary_metrics(y, p_pos, threshold)
    return {**scores, "proba": p_pos, "threshold": float(threshold)}  # the reference's key order: metrics first


def kclass_decision(
    rule: str,
    classes: Sequence[str],
    cutpoints: Sequence[float] = (),
    flags: Mapping[str, float] | None = None,
    referable_from: int | None = None,
    referable_threshold: float | None = None,
) -> Decision:
    """A registered K-class model's own decision, from what its model stores (the `ServingConfig` task keys:
    cut-points, critical class -> flag threshold, the referable grade and threshold); `rule` is its words (the
    version's `decision_rule` tag)."""
    flags = dict(flags or {})
    unknown = set(flags) - set(classes)
    if unknown:
        raise ValueError(f"flags for classes {sorted(unknown)} not in {list(classes)}")
    referable = None
    if referable_from is not None:
        if referable_threshold is None:
            raise ValueError("a referable view needs its threshold")
        referable = {"from_index": float(referable_from), "threshold": float(referable_threshold)}
    return Decision(
        rule=rule,
        cutpoints=tuple(float(c) for c in cutpoints),
        flags={str(c): {"threshold": float(t)} for c, t in flags.items()},
        referable=referable,
    )


def score_kclass_champion(
    kind: TaskKind, classes: Sequence[str], y_test: Any, proba: Any, decision: Decision
) -> dict[str, Any]:
    """A K-class champion on this test set by its own `decision`: ``metrics`` (every test metric under its
    metrics.json name, point values, NaN where undefined), ``proba`` (its (N, K) probabilities, float64) and
    ``decision`` (its document), the reference `medclf.evaluation.kclass_comparison` pairs with the challenger."""
    classes = tuple(classes)
    referable = decision.referable
    spec = TaskSpec(
        kind,
        classes,
        critical=tuple(classes.index(c) for c in decision.flags),
        referable_from=int(referable["from_index"]) if referable else None,
    )
    p = np.asarray(proba, dtype=np.float64)
    result = evaluate_kclass(spec, decision, np.asarray(y_test), p, 0, 0)  # points only: the CIs are the pair's
    return {
        "metrics": {k: float(v["value"]) for k, v in result["test"].items()},
        "proba": p,
        "decision": decision.document(),
    }


def score_multilabel_champion(
    labels: Sequence[str], y_test: Any, proba: Any, thresholds: Mapping[str, float], rule: str
) -> dict[str, Any]:
    """A multi-label champion on this test set by its own per-finding thresholds (its served `model_config`):
    ``metrics`` (point test figures under their metrics.json names), ``proba`` ((N, L), float64) and ``decision``
    (``{"rule", "thresholds", "source"}``), the reference `medclf.evaluation.multilabel_comparison` pairs."""
    from medclf.evaluation import multilabel
    from medclf.evaluation.kclass import flatten_report

    p = np.asarray(proba, dtype=np.float64)
    point = multilabel.multilabel_report(np.asarray(y_test), p, list(labels), dict(thresholds))
    return {
        "metrics": {k: v for k, v in flatten_report(point).items() if k != "n"},
        "proba": p,
        "decision": {"rule": rule, "thresholds": {c: {"threshold": float(t)} for c, t in thresholds.items()}},
    }
