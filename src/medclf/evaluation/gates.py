"""The release gates: absolute quality floors plus non-inferiority to the current champion.

Pure (no I/O): `medclf evaluate` applies them to the test metrics of `medclf.evaluation.metrics` and writes the result
to `reports/gates.json`, which `medclf register` requires to have passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from medclf.config.vocabulary import GATES, NON_INFERIORITY


def _fmt_pair(value: float, bound: float) -> tuple[str, str]:
    """3-decimal strings, or full precision when rounding would hide why a gate failed."""
    a, b = f"{value:.3f}", f"{bound:.3f}"
    return (repr(float(value)), repr(float(bound))) if a == b else (a, b)


def evaluate_gates(
    metrics: Mapping[str, float], gates: Mapping[str, Any] | Any, champion: Mapping[str, float] | None
) -> dict[str, Any]:
    """Release decision: absolute quality floors plus non-inferiority to the current champion.

    ``gates`` is a mapping (or a pydantic ``Gates`` object) with min_f1, min_recall, optional
    min_auc / min_specificity (None = not gated) and non_inferiority_margin. A gate passes when
    ``value >= bound`` (exactly at the bound passes); a NaN or missing value fails, because an
    undefined metric cannot demonstrate quality. Non-inferiority requires
    ``value >= champion - margin`` for f1 and recall, and is skipped when there is no champion.
    """
    g = gates.model_dump() if hasattr(gates, "model_dump") else dict(gates)
    results, failures = [], []
    for name, metric in GATES.items():  # optional gates are skipped when their bound is None
        bound = g.get(name)
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
    margin, entries = float(g.get("non_inferiority_margin") or 0.0), []
    if champion:
        for metric in NON_INFERIORITY:
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
