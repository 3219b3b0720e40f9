"""Challenger versus champion for a multi-class or ordinal task (issue 24), on the same test images.

Both models are scored by their own decision rule (`medclf.evaluation.task.Decision`: the argmax or the ordinal
cut-points, the critical-class flag thresholds, the referable threshold), each fitted on validation when that model
was evaluated. Every metric of the metrics document is compared as challenger minus champion, with a paired
percentile-bootstrap CI: each resample draws the same test images for both models, and with patient groups it draws
whole patients (every image of a patient enters a resample together, as `kclass.bootstrap_report_ci` does). The
resamples are those `kclass.bootstrap_report_ci` draws for the same seed and groups, so each model's own values match
its metrics document.

Non-inferiority (every gated metric): the challenger passes a metric when the lower CI bound of its paired
difference is at least minus `evaluate.gates.non_inferiority_margin`. Without a CI (no resamples) the point
difference is tested instead, as the binary gate does.

Pure: arrays in, a strict-JSON dict out (undefined values are None, never NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medclf.evaluation import kclass
from medclf.evaluation.metrics import _check_boot, _percentile_ci
from medclf.evaluation.task import Decision, TaskSpec

PER_CLASS_COMPARED = ("recall", "precision", "f1", "auc")
"""The per-class figures of the comparison's `per_class` table and figure."""
LOWER_IS_BETTER = ("ece", "brier", "mae")
"""Compared metrics where a negative difference is the challenger's gain."""
_SAME_FOR_BOTH = ("support", "prevalence")  # properties of the test set, not of a model
NI_RULE = (
    "the lower bound of the 95 % CI of the paired, {unit}-clustered bootstrap difference (challenger - champion) "
    ">= -margin; without resamples, the point difference >= -margin"
)

Entry = dict[str, float | None]


def as_decision(decision: Decision | Mapping[str, Any]) -> Decision:
    """A `Decision`, or one rebuilt from its `document()` (as gates.json and `registry.kclass_champion` hold it)."""
    if isinstance(decision, Decision):
        return decision
    ref = decision.get("referable")
    return Decision(
        rule=str(decision.get("rule", "")),
        cutpoints=tuple(float(c) for c in decision.get("cutpoints") or ()),
        flags={str(c): {k: float(v) for k, v in f.items()} for c, f in (decision.get("flags") or {}).items()},
        referable={k: float(v) for k, v in ref.items()} if ref else None,
    )


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class _Model:
    """One model's decision on the test rows, in the terms `kclass._weighted` evaluates under resample weights."""

    def __init__(self, spec: TaskSpec, y: np.ndarray, proba: np.ndarray, decision: Decision) -> None:
        ordinal = spec.kind == "ordinal"
        self.y, self.p, self.pred, self.classes = kclass._check_inputs(
            y, proba, spec.classes, decision.predict(proba), min_k=3 if ordinal else 2
        )
        self.ordinal, self.decision = ordinal, decision
        ref = decision.referable
        k = spec.referable_from
        # a referable view of another grade than the task's measures something else: that model lacks the metrics
        self.referable = (k, float(ref["threshold"])) if k is not None and ref and int(ref["from_index"]) == k else None
        self.flags = {
            name: (spec.classes.index(name), float(decision.flags[name]["threshold"]))
            for name in spec.critical_names
            if name in decision.flags
        }

    def stats(self, w: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """({flat metric name: (B,) values}, (B, K, K) confusion counts) for the B rows of weights `w`."""
        raw = kclass._weighted(self.y, self.p, self.pred, w, self.ordinal, self.referable)
        vals = kclass._named(raw, self.classes)
        for name, (i, thr) in self.flags.items():
            is_c, flagged = (self.y == i).astype(float), self.p[:, i] >= thr
            pos, neg = w @ is_c, w @ (1 - is_c)
            tp, tn = w @ (is_c * flagged), w @ ((1 - is_c) * ~flagged)
            vals[f"critical.{name}.sensitivity"] = np.divide(tp, pos, out=np.full(pos.shape, np.nan), where=pos > 0)
            vals[f"critical.{name}.specificity"] = np.divide(tn, neg, out=np.full(neg.shape, np.nan), where=neg > 0)
        return vals, raw["counts"]


def _units(groups: Sequence[Any] | np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.ndim != 1 or g.size != n:
        raise ValueError(f"groups must be 1-D with one id per test row ({n}); got shape {g.shape}")
    uniq, inverse = np.unique(g, return_inverse=True)
    return inverse, int(uniq.size)


def _compared(name: str) -> bool:
    return name.rsplit(".", 1)[-1] not in _SAME_FOR_BOTH


def kclass_comparison(
    spec: TaskSpec,
    y: Sequence[int] | np.ndarray,
    proba_challenger: np.ndarray,
    decision_challenger: Decision | Mapping[str, Any],
    proba_champion: np.ndarray,
    decision_champion: Decision | Mapping[str, Any],
    gated: Sequence[str],
    margin: float,
    n_boot: int,
    seed: int,
    groups: Sequence[Any] | np.ndarray | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Challenger minus champion on the same test rows, each by its own decision, with paired bootstrap CIs.

    `gated`: the gated metrics by their metrics.json names (`TaskSpec.gates`' keys: `balanced_accuracy`,
    `per_class.mel.recall`, `critical.mel.sensitivity`, ...); `margin`: `evaluate.gates.non_inferiority_margin`;
    `groups`: a patient id per test row (None: rows are resampled). Returns (strict JSON):

    * ``metrics``: ``{name: {challenger, champion, diff, ci_low, ci_high}}`` for every metric of the metrics
      document but the support (the binary `comparison.paired_differences` shape); a metric one model lacks (a
      flag or referable view its decision does not have) has ``champion`` (or ``challenger``) None;
    * ``per_class``: ``{class: {recall|precision|f1|auc: the same entry}}``, the per-class view of ``metrics``;
    * ``confusion``: ``labels`` and both models' K x K ``challenger`` / ``champion`` counts (rows = actual);
    * ``non_inferiority``: `medclf.evaluation.gates.check_floors`' shape (``skipped``, ``margin``, ``entries``)
      plus ``rule``, ``paired`` and ``failures`` (the lines a failed gate reports); each entry is ``{metric,
      value, champion, diff, ci_low, ci_high, margin, bound (= -margin), op, tested ("diff": the point
      difference passes or fails, as for a binary task; the CI is reported), passed}``, or ``{metric, skipped,
      note}`` where the champion lacks the metric;
    * ``n``, ``n_units`` (patients, or rows), ``clustered``, ``n_boot``, ``seed``, ``alpha``, ``lower_is_better``
      and both ``decisions`` (their documents).
    """
    _check_boot(n_boot, alpha)
    new = _Model(spec, np.asarray(y), proba_challenger, as_decision(decision_challenger))
    if np.shape(proba_champion) != new.p.shape:
        raise ValueError(
            f"the champion's probabilities have shape {np.shape(proba_champion)}, the challenger's {new.p.shape}"
        )
    old = _Model(spec, np.asarray(y), proba_champion, as_decision(decision_champion))
    y_int = new.y
    inverse, n_units = _units(groups, y_int.size)

    (a, cm_a), (b, cm_b) = new.stats(np.ones((1, y_int.size))), old.stats(np.ones((1, y_int.size)))
    names = [k for k in dict.fromkeys([*a, *b]) if _compared(k)]
    nan = np.full(1, np.nan)
    boot: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for w in kclass._unit_weights(inverse, n_units, n_boot, seed):  # ONE draw, the same rows for both models
        wa, wb = new.stats(w)[0], old.stats(w)[0]
        missing = np.full(w.shape[0], np.nan)
        for k in names:
            boot[k].append(wa.get(k, missing) - wb.get(k, missing))
    metrics: dict[str, Entry] = {}
    for k in names:
        va, vb = float(a.get(k, nan)[0]), float(b.get(k, nan)[0])
        lo, hi = _percentile_ci(np.concatenate(boot[k]), alpha) if n_boot else (math.nan, math.nan)
        metrics[k] = {
            "challenger": _finite(va),
            "champion": _finite(vb),
            "diff": _finite(va - vb),
            "ci_low": _finite(lo),
            "ci_high": _finite(hi),
        }
    unit = "patient" if groups is not None else "image"
    return {
        "task": spec.kind,
        "classes": list(spec.classes),
        "n": int(y_int.size),
        "n_units": n_units,
        "clustered": groups is not None,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "alpha": float(alpha),
        "lower_is_better": [k for k in LOWER_IS_BETTER if k in metrics],
        "decisions": {"challenger": new.decision.document(), "champion": old.decision.document()},
        "metrics": metrics,
        "per_class": {c: {m: metrics[f"per_class.{c}.{m}"] for m in PER_CLASS_COMPARED} for c in spec.classes},
        "confusion": {
            "labels": list(spec.classes),
            "challenger": np.rint(cm_a[0]).astype(np.int64).tolist(),
            "champion": np.rint(cm_b[0]).astype(np.int64).tolist(),
        },
        "non_inferiority": non_inferiority(metrics, gated, margin, NI_RULE.format(unit=unit)),
    }


def non_inferiority(metrics: Mapping[str, Entry], gated: Sequence[str], margin: float, rule: str) -> dict[str, Any]:
    """The paired verdict on each gated metric (`kclass_comparison`'s ``non_inferiority``). A metric the
    challenger lacks or leaves undefined fails, as an undefined floor does; one the champion lacks is skipped."""
    entries: list[dict[str, Any]] = []
    failures: list[str] = []
    for metric in gated:
        e = metrics.get(metric) or {}
        value, champ, diff, lo = e.get("challenger"), e.get("champion"), e.get("diff"), e.get("ci_low")
        if champ is None:
            entries.append({"metric": metric, "skipped": True, "note": "champion lacks this metric"})
            continue
        # the point difference on the same test rows, as the binary gate (`gates.check_floors`): a lower-CI-bound
        # test would refuse an equal model on a small test set (300 images: -0.07 at equal sensitivity); the
        # paired 95 % CI is reported beside it, for the reviewer
        tested, stat = "diff", diff
        ok = stat is not None and value is not None and stat >= -margin
        entries.append(
            {
                "metric": metric,
                "value": value,
                "champion": champ,
                "diff": diff,
                "ci_low": lo,
                "ci_high": e.get("ci_high"),
                "margin": margin,
                "bound": -margin,
                "op": ">=",
                "tested": tested,
                "passed": ok,
            }
        )
        if ok:
            continue
        if value is None or stat is None:
            failures.append(f"{metric}: undefined for the challenger (champion {champ:.3f}): non-inferiority not shown")
        else:
            ci = "" if lo is None else f", paired 95 % CI {lo:+.3f} to {e.get('ci_high') or 0.0:+.3f}"
            failures.append(
                f"{metric}: challenger - champion {stat:+.3f} < -{margin:.3f} "
                f"(non-inferiority margin; challenger {value:.3f}, champion {champ:.3f}{ci})"
            )
    return {
        "skipped": False,
        "margin": margin,
        "paired": True,
        "rule": rule,
        "entries": entries,
        "failures": failures,
    }
