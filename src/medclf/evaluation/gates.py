"""The release gates: absolute quality floors plus non-inferiority to the current champion.

Pure (no I/O): `medclf evaluate` applies them to the test metrics of `medclf.evaluation.metrics` and writes the result
to `reports/gates.json`, which `medclf register` requires to have passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from medclf.config.vocabulary import GATES, NON_INFERIORITY, canonical_gate


def _fmt_pair(value: float, bound: float) -> tuple[str, str]:
    """3-decimal strings, or full precision when rounding would hide why a gate failed."""
    a, b = f"{value:.3f}", f"{bound:.3f}"
    return (repr(float(value)), repr(float(bound))) if a == b else (a, b)


def evaluate_gates(
    metrics: Mapping[str, float], gates: Mapping[str, Any] | Any, champion: Mapping[str, float] | None
) -> dict[str, Any]:
    """Release decision of a binary task: absolute quality floors plus non-inferiority to the current champion.

    ``gates`` is a mapping (or a pydantic ``Gates`` object) with min_f1, min_recall, optional
    min_auc / min_specificity (None = not gated), non_inferiority_margin and optional ``bounds``
    (`{metric: floor}`, more floors by name). A gate passes when ``value >= bound`` (exactly at the bound
    passes); a NaN or missing value fails, because an undefined metric cannot demonstrate quality.
    Non-inferiority requires ``value >= champion - margin`` for f1 and recall, and is skipped when there
    is no champion.
    """
    g = gates.model_dump() if hasattr(gates, "model_dump") else dict(gates)
    floors = [(name, metric, g.get(name)) for name, metric in GATES.items()]  # None bound: not gated
    floors += [(name, canonical_gate(name), bound) for name, bound in (g.get("bounds") or {}).items()]
    return check_floors(metrics, floors, NON_INFERIORITY, float(g.get("non_inferiority_margin") or 0.0), champion)


def check_floors(
    metrics: Mapping[str, float],
    floors: Sequence[tuple[str, str, float | None]],
    non_inferiority: Sequence[str],
    margin: float,
    champion: Mapping[str, float] | None,
) -> dict[str, Any]:
    """Every task family's gates: each (gate name, metric, floor) with a floor passes when the metric is at least
    it; each metric of `non_inferiority` must be at least the champion's minus `margin` (skipped with no
    champion, noted where the champion lacks the metric)."""
    results, failures = [], []
    for name, metric, bound in floors:
        if bound is None:
            continue
        value = float(metrics.get(metric, math.nan))
        ok = bool(value >= float(bound))  # False for NaN
        results.append(
            {"name": name, "metric": metric, "value": value, "bound": float(bound), "op": ">=", "passed": ok}
        )
        if not ok:
            v, b = _fmt_pair(value, float(bound))
            failures.append(f"{metric} {v} < {name} {b}")
    entries: list[dict[str, Any]] = []
    if champion:
        for metric in non_inferiority:
            value, champ = float(metrics.get(metric, math.nan)), float(champion.get(metric, math.nan))
            if math.isnan(champ):
                entries.append({"metric": metric, "skipped": True, "note": "champion lacks this metric"})
                continue
            bound = champ - margin
            ok = bool(value >= bound)
            entries.append(
                {
                    "metric": metric,
                    "value": value,
                    "champion": champ,
                    "margin": margin,
                    "bound": bound,
                    "op": ">=",
                    "passed": ok,
                }
            )
            if not ok:
                v, b = _fmt_pair(value, bound)
                failures.append(f"{metric} {v} < champion {champ:.3f} - margin {margin:.3f} = {b} (non-inferiority)")
    ni = (
        {"skipped": False, "margin": margin, "entries": entries}
        if champion
        else {"skipped": True, "note": "no champion registered"}
    )
    return {"passed": not failures, "gates": results, "non_inferiority": ni, "failures": failures}
