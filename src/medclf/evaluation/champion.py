"""Scoring the current champion on this test set: its probabilities in, the reference the gates compare with out.

`medclf.release.registry.champion_reference` finds the champion version, loads its model and runs it on the test
images; what those probabilities mean for the non-inferiority gate and the challenger-versus-champion report is
decided here. Arrays in, numbers out: nothing here loads a model or talks to MLflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medclf.config.vocabulary import NON_INFERIORITY
from medclf.evaluation import metrics

FROM_TAGS = "version tags (same test set)"
"""`source` of a reference whose metrics are the champion version's own `metric.*` tags."""
RESCORED = "re-scored on this test set at its registered threshold"
"""`source` of a reference whose metrics were computed here from the champion's probabilities."""


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
