"""Challenger versus champion for a multi-label task (issue 25), on the same test images.

The multi-label counterpart of `medclf.evaluation.kclass_comparison`, with its output shape and its helpers. Each
model is scored by ITS OWN per-finding thresholds (each fitted on validation when that model was evaluated): a
finding is called present where the model's probability reaches that model's threshold for it. Every figure of
`multilabel.multilabel_report` is compared as challenger minus champion, with a paired percentile-bootstrap CI:
each resample draws the same test images for both models, and with patient groups it draws whole patients (both
eyes of a patient enter a resample together). The resamples are those `kclass.bootstrap_report_ci` draws for the
same seed and groups (the draws of `multilabel.evaluate_multilabel`), so each model's own values match its
metrics document.

Non-inferiority (every gated metric, all higher-is-better: `vocabulary.MULTILABEL_SUMMARY` and the per-finding
`vocabulary.PER_LABEL`): `kclass_comparison.non_inferiority`, i.e. the challenger passes a metric when its point
difference on these images is at least minus `evaluate.gates.non_inferiority_margin`; the paired CI is reported
beside it. `hamming_loss` and `ece` are lower-is-better and are reported, never gated.

Pure: arrays in, a strict-JSON dict out (undefined values are None, never NaN). Cost: two `multilabel_report`
calls per resample (a few ms each at a few hundred images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from medclf.evaluation import kclass, multilabel
from medclf.evaluation.kclass_comparison import Entry, _compared, _finite, _units, non_inferiority
from medclf.evaluation.metrics import _check_boot, _percentile_ci

PER_CLASS_COMPARED = ("auc", "ap", "recall", "specificity", "f1")
"""The per-finding figures of the comparison's `per_class` table (all of them are in ``metrics`` too)."""
LOWER_IS_BETTER = ("hamming_loss", "ece")
"""Compared figures (summary, and a finding's ``ece``) where a negative difference is the challenger's gain."""
_OF_THE_TEST_SET = ("n", "label_cardinality")  # properties of the images, not of a model (as support, prevalence)
NI_RULE = (
    "the point difference challenger - champion on the same test images >= -margin, each model at its own "
    "per-finding validation thresholds; the paired {pct:g} % bootstrap CI (whole {unit}s resampled) is reported "
    "beside it"
)
SOURCE = (
    "champion re-scored on this test set by its own per-finding thresholds; paired bootstrap, the same {n_boot} "
    "resamples of {n_units} {unit}s for both models"
)


def _lower_is_better(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LOWER_IS_BETTER


def _thresholds(thresholds: multilabel.Thresholds, labels: Sequence[str]) -> dict[str, float]:
    """``{finding: threshold}`` in ``labels`` order, from a `fit_thresholds` document or plain numbers."""
    return {c: float(t) for c, t in zip(labels, multilabel._threshold_vector(thresholds, labels), strict=True)}


def _flat(y: np.ndarray, p: np.ndarray, labels: Sequence[str], thr: Mapping[str, float]) -> dict[str, float]:
    return kclass.flatten_report(multilabel.multilabel_report(y, p, labels, thr))


def _confusion(y: np.ndarray, p: np.ndarray, labels: Sequence[str], thr: Mapping[str, float]) -> dict[str, Any]:
    """``{finding: [[tn, fp], [fn, tp]]}`` (rows = actual absent / present) at the model's own thresholds."""
    called = multilabel.apply_thresholds(p, thr, labels)
    out: dict[str, Any] = {}
    for j, c in enumerate(labels):
        pos, hit = y[:, j] == 1, called[:, j]
        out[c] = [
            [int((~pos & ~hit).sum()), int((~pos & hit).sum())],
            [int((pos & ~hit).sum()), int((pos & hit).sum())],
        ]
    return out


def multilabel_comparison(
    labels: Sequence[str],
    y: ArrayLike,
    proba_challenger: ArrayLike,
    thresholds_challenger: multilabel.Thresholds,
    proba_champion: ArrayLike,
    thresholds_champion: multilabel.Thresholds,
    gated: Sequence[str],
    margin: float,
    n_boot: int,
    seed: int,
    groups: Sequence[Any] | np.ndarray | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Challenger minus champion on the same test images, each at its own per-finding thresholds, with paired
    bootstrap CIs.

    ``y``: the N x L 0/1 test labels (columns in ``labels`` order); ``proba_*``: each model's N x L sigmoid
    probabilities on those images; ``thresholds_*``: that model's ``{finding: {"threshold": t, ...}}`` (its
    `multilabel.fit_thresholds` document) or ``{finding: t}``, looked up by name; `gated`: the gated metrics by
    their metrics.json names (`TaskSpec.gates`' keys: ``macro_auc``, ``per_class.glaucoma.auc``, ...); `margin`:
    `evaluate.gates.non_inferiority_margin`; `groups`: a patient id per test image (None: images are resampled).
    Returns (strict JSON):

    * ``metrics``: ``{name: {challenger, champion, diff, ci_low, ci_high}}`` for every figure of
      `multilabel.multilabel_report` that belongs to a model (its flat names; the support, prevalence, label
      cardinality and image count are the test set's and are left out);
    * ``per_class``: ``{finding: {auc|ap|recall|specificity|f1: the same entry}}``, the per-finding view;
    * ``confusion``: ``labels`` and both models' per-finding 2 x 2 counts ``[[tn, fp], [fn, tp]]``;
    * ``non_inferiority``: `kclass_comparison.non_inferiority`'s shape (``skipped`` False, ``margin``,
      ``paired``, ``rule``, ``entries``, ``failures``) plus ``source``; each entry also carries ``challenger`` (=
      ``value``): ``{metric, challenger, value, champion, diff, ci_low, ci_high, margin, bound, op, tested,
      passed}``, or ``{metric, skipped, note}`` where the figure is undefined for the champion on these images
      (a finding absent from the test set, or in every image);
    * ``n``, ``n_units`` (patients, or images), ``clustered``, ``n_boot``, ``seed``, ``alpha``, ``lower_is_better``
      (the compared names where lower is better) and both models' ``thresholds`` (``{finding: float}``).

    A ValueError for inputs that do not pair (shapes, a threshold map missing a finding), an unknown gated name, or
    a gated lower-is-better figure (``hamming_loss``, ``ece``: reported, not gated).
    """
    _check_boot(n_boot, alpha)
    names_l = list(labels)
    yy, pa = multilabel._check(y, proba_challenger, names_l)
    if np.shape(proba_champion) != pa.shape:
        raise ValueError(
            f"the champion's probabilities have shape {np.shape(proba_champion)}, the challenger's {pa.shape}"
        )
    _, pb = multilabel._check(yy, proba_champion, names_l)
    ta, tb = _thresholds(thresholds_challenger, names_l), _thresholds(thresholds_champion, names_l)
    n = yy.shape[0]
    inverse, n_units = _units(groups, n)

    a, b = _flat(yy, pa, names_l, ta), _flat(yy, pb, names_l, tb)
    names = [k for k in a if _compared(k) and k not in _OF_THE_TEST_SET]
    unknown = [g for g in gated if g not in names]
    if unknown:
        raise ValueError(f"gated metric(s) {unknown} are not multi-label figures; known: {', '.join(names)}")
    wrong_way = [g for g in gated if _lower_is_better(g)]
    if wrong_way:
        raise ValueError(f"gated metric(s) {wrong_way} are lower-is-better: reported, not gated")

    boot: dict[str, list[float]] = {k: [] for k in names}
    rows = np.arange(n)
    for w in kclass._unit_weights(inverse, n_units, n_boot, seed):  # ONE draw, the same images for both models
        for row in w:
            idx = np.repeat(rows, row.astype(np.int64))
            ra, rb = _flat(yy[idx], pa[idx], names_l, ta), _flat(yy[idx], pb[idx], names_l, tb)
            for k in names:
                boot[k].append(ra[k] - rb[k])
    metrics: dict[str, Entry] = {}
    for k in names:
        lo, hi = _percentile_ci(np.asarray(boot[k], dtype=float), alpha) if n_boot else (math.nan, math.nan)
        metrics[k] = {
            "challenger": _finite(a[k]),
            "champion": _finite(b[k]),
            "diff": _finite(a[k] - b[k]),
            "ci_low": _finite(lo),
            "ci_high": _finite(hi),
        }

    unit = "patient" if groups is not None else "image"
    ni = non_inferiority(metrics, gated, float(margin), NI_RULE.format(pct=100 * (1 - alpha), unit=unit))
    for e in ni["entries"]:
        if e.get("skipped"):
            e["note"] = "undefined for the champion on this test set (the finding is absent, or in every image)"
        else:
            e["challenger"] = e["value"]
    ni["source"] = SOURCE.format(n_boot=int(n_boot), n_units=n_units, unit=unit)
    return {
        "task": "multilabel",
        "classes": names_l,
        "n": int(n),
        "n_units": n_units,
        "clustered": groups is not None,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "alpha": float(alpha),
        "lower_is_better": [k for k in names if _lower_is_better(k)],
        "thresholds": {"challenger": ta, "champion": tb},
        "metrics": metrics,
        "per_class": {c: {m: metrics[f"per_class.{c}.{m}"] for m in PER_CLASS_COMPARED} for c in names_l},
        "confusion": {
            "labels": names_l,
            "challenger": _confusion(yy, pa, names_l, ta),
            "champion": _confusion(yy, pb, names_l, tb),
        },
        "non_inferiority": ni,
    }


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _delta(e: Mapping[str, float | None]) -> str:
    """``+0.012 (-0.010 to +0.034)``: the difference and its paired CI (the CI left out when there is none)."""
    d, lo, hi = e.get("diff"), e.get("ci_low"), e.get("ci_high")
    ci = "" if lo is None or hi is None else f" ({lo:+.3f} to {hi:+.3f})"
    return _num(d, "+.3f") + ci


def comparison_markdown(result: Mapping[str, Any]) -> str:
    """The version page's compact table of a `multilabel_comparison`: per finding, both models' AUC and
    sensitivity (each at its own threshold) and the challenger - champion differences with their paired CIs;
    then the macro AUC row and the non-inferiority verdict."""
    pct = 100 * (1 - float(result.get("alpha", 0.05)))
    lines = [
        f"| finding | AUC challenger | AUC champion | Δ AUC ({pct:g} % CI) "
        f"| sensitivity challenger | sensitivity champion | Δ sensitivity ({pct:g} % CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, row in result["per_class"].items():
        auc, sens = row["auc"], row["recall"]
        lines.append(
            f"| {c} | {_num(auc['challenger'])} | {_num(auc['champion'])} | {_delta(auc)} "
            f"| {_num(sens['challenger'])} | {_num(sens['champion'])} | {_delta(sens)} |"
        )
    macro = result["metrics"].get("macro_auc")
    if macro is not None:
        lines.append(
            f"| **macro AUC** | {_num(macro['challenger'])} | {_num(macro['champion'])} | {_delta(macro)} | | | |"
        )
    unit = "patients" if result.get("clustered") else "images"
    lines.append("")
    lines.append(
        f"Δ = challenger - champion on the same {result['n']} test images, each model at its own per-finding "
        f"thresholds; paired bootstrap over {result['n_units']} {unit} ({result['n_boot']} resamples)."
    )
    ni = result["non_inferiority"]
    checked = [e for e in ni["entries"] if not e.get("skipped")]
    passed = sum(bool(e["passed"]) for e in checked)
    skipped = len(ni["entries"]) - len(checked)
    verdict = f"Non-inferiority (margin {float(ni['margin']):g}): {passed}/{len(checked)} gated metrics pass"
    lines.append(verdict + (f", {skipped} skipped (undefined on this test set)." if skipped else "."))
    lines.extend(f"- {f}" for f in ni["failures"])
    return "\n".join(lines) + "\n"
