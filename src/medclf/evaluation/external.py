"""External validation (issue 26, point 1): the candidate, and the champion, scored on images from another site or
time, at the registered operating point, with the internal test's metrics and CIs, and the internal-external gap.

An internal patient-level split overstates how a model does elsewhere (the Kermany chest X-rays: internal ROC-AUC
0.9986, external 0.971). Good Machine Learning Practice asks for the external figure in the release decision, so
each set declared in `evaluate.external` is:
- listed and decoded exactly as ingest decodes the training data (same source kinds, size, channels, checks);
- refused when it overlaps the ingested data (any split) by image hash or by patient (the same salted hash ingest
  writes): a set that shares patients with training is not external;
- never used to fit anything: the threshold, the K-class decision and the calibration all come from validation;
- scored with the task's metrics and 95 % bootstrap CIs (clustered by patient when the set names patients), and
  optionally gated (`gates: {auc: 0.95}` on that set).
The stage (`medclf.stages.evaluate`) supplies the model's probabilities and the champion's; this module loads the
sets and turns probabilities into the report. The raw sets live under `paths.external_data`, a DVC dependency of
evaluate, so they are versioned like the main source and a changed external image re-runs evaluate only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclf.config import ExternalSet
from medclf.config.vocabulary import canonical_gate
from medclf.evaluation import metrics
from medclf.evaluation.task import Decision, TaskSpec, evaluate_kclass
from medclf.infra.io import json_safe

BINARY_FIGURES = ("roc_auc", "recall", "specificity", "f1", "accuracy", "balanced_accuracy")
"""The binary metrics the gap is reported for (their metrics.json names)."""


class ExternalSetError(ValueError):
    """An external set that cannot be used: unreadable, wrongly labelled, or overlapping the training data."""


@dataclass(frozen=True)
class ExternalData:
    name: str
    x: np.ndarray
    """N×H×W×C uint8, as ingest writes its splits."""
    y: np.ndarray
    """N class indices (of `ingest.classes`)."""
    digest: str
    """sha256 over the images' hashes and labels, in order: which images were scored."""
    patients: np.ndarray | None
    """The salted patient hash of each image (None when the source names no patients)."""
    quarantined: list[tuple[str, str]]
    """(file, reason) of the images that could not be used."""


def from_decoded(
    name: str,
    listed_bad: Sequence[tuple[str, str]],
    decoded: Sequence[Any],
    classes: Sequence[str],
    max_quarantine_fraction: float,
    manifest: Path,
) -> ExternalData:
    """One external set from what ingest's own listing and decoding gave (`medclf.sources.scan`'s quarantine and
    `medclf.sources.decode.decode_all`'s `Decoded` list); raise `ExternalSetError` naming the set, the files and the
    reason when too many images are unusable or any overlaps the ingested data."""
    import pandas as pd

    from medclf.imaging.privacy import hash_patient

    classes = list(classes)
    for d in decoded:
        if d.reason is None and d.record.label not in classes:
            at = f" at {d.record.where}" if d.record.where else ""
            d.reason = f"label {d.record.label!r} is not one of the model's classes {classes}{at}"
    ok = [d for d in decoded if d.reason is None]
    quarantined = [*listed_bad, *((d.uri, d.reason or "") for d in decoded if d.reason is not None)]
    total = len(decoded) + len(listed_bad)
    if not ok or len(quarantined) > max_quarantine_fraction * total:
        shown = "; ".join(f"{u}: {r}" for u, r in quarantined[:5])
        raise ExternalSetError(
            f"evaluate.external {name!r}: {len(quarantined)} of {total} images unusable "
            f"(more than ingest.max_quarantine_fraction {max_quarantine_fraction:g}): {shown}"
        )
    pids = [hash_patient(d.record.patient_id) if d.record.patient_id else None for d in ok]
    if manifest.exists():
        m = pd.read_parquet(manifest, columns=["sha256", "patient_hash"])
        seen_images, seen_patients = set(m["sha256"].dropna()), set(m["patient_hash"].dropna())
        same_image = [d.uri for d in ok if d.sha256 in seen_images]
        same_patient = [d.uri for d, p in zip(ok, pids, strict=True) if p is not None and p in seen_patients]
        if same_image or same_patient:
            examples = ", ".join(list(dict.fromkeys([*same_image, *same_patient]))[:5])
            raise ExternalSetError(
                f"evaluate.external {name!r} overlaps the ingested (training, validation and test) data: "
                f"{len(same_image)} image(s) by image hash and {len(same_patient)} by patient, e.g. {examples}. "
                "An external set must hold only images and patients the model has never seen: remove them, or "
                "declare another set"
            )
    y = np.array([classes.index(d.record.label or "") for d in ok], dtype=np.int64)
    x = np.stack([d.image for d in ok if d.image is not None]).astype(np.uint8)
    h = hashlib.sha256()
    for d, label in zip(ok, y.tolist(), strict=True):
        h.update(f"{d.sha256}:{label};".encode())
    patients = None if any(p is None for p in pids) else np.asarray(pids, dtype=str)
    return ExternalData(name, x, y, h.hexdigest(), patients, quarantined)


def _flat(test: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"value": v["value"], "ci_low": v["ci_low"], "ci_high": v["ci_high"]} for k, v in test.items()}


def score_binary(
    y: np.ndarray, p_pos: np.ndarray, threshold: float, n_boot: int, seed: int
) -> dict[str, dict[str, float]]:
    """Binary metrics at the registered `threshold`, each {value, ci_low, ci_high} (95 % bootstrap)."""
    return _flat(metrics.metrics_with_ci(y, p_pos, threshold, n_boot, seed))


def score_kclass(
    spec: TaskSpec, decision: Decision, y: np.ndarray, proba: np.ndarray, n_boot: int, seed: int, groups: Any
) -> dict[str, dict[str, float]]:
    """A K-class model's metrics by its registered decision rule, as the internal test reports them."""
    return _flat(evaluate_kclass(spec, decision, y, proba, n_boot, seed, groups)["test"])


def figures_of(spec: TaskSpec) -> tuple[str, ...]:
    """The metrics whose internal-external gap is reported."""
    return BINARY_FIGURES if spec.kind == "binary" else spec.headline()


def set_report(
    data: ExternalData,
    spec: TaskSpec,
    scored: Mapping[str, Mapping[str, float]],
    internal: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    gates: Mapping[str, float],
) -> dict[str, Any]:
    """One set's entry of `reports/evaluate/external.json` (and of metrics.json's `external`): its size, metrics
    with CIs, the internal test value and the gap (internal minus external) of each headline figure, the champion's
    figures on the same images, and its gates. Strict JSON."""
    figures = [f for f in figures_of(spec) if f in scored]
    gap = {
        f: float(internal[f]) - float(scored[f]["value"])
        for f in figures
        if internal.get(f) is not None and scored[f]["value"] is not None and np.isfinite(scored[f]["value"])
    }
    checked = []
    for name, bound in gates.items():
        key = canonical_gate(name)
        value = (scored.get(key) or {}).get("value")
        ok = value is not None and np.isfinite(value) and float(value) >= float(bound)
        checked.append({"metric": key, "value": value, "bound": float(bound), "passed": bool(ok)})
    support = {c: int((data.y == i).sum()) for i, c in enumerate(spec.classes)}
    doc = {
        "name": data.name,
        "n": int(data.y.size),
        "support": support,
        "patients": None if data.patients is None else int(np.unique(data.patients).size),
        "quarantined": len(data.quarantined),
        "digest": data.digest,
        "test": {k: dict(v) for k, v in scored.items()},
        "internal": {f: internal.get(f) for f in figures},
        "gap": gap,
        "champion": dict(champion) if champion else None,
        "gates": checked,
        "passed": all(g["passed"] for g in checked),
    }
    return dict(json_safe(doc))


def check_gate_names(spec: TaskSpec, sets: Sequence[ExternalSet]) -> None:
    """Each external gate names a metric the task has (a config error naming the set and the key otherwise)."""
    have = set(BINARY_FIGURES) | set(metrics.BINARY_SCORES) if spec.kind == "binary" else spec.gateable()
    for ext in sets:
        for name in ext.gates:
            if canonical_gate(name) not in have:
                raise ExternalSetError(
                    f"evaluate.external {ext.name!r}: gates.{name}: not a metric of this {spec.kind} task "
                    f"(one of {sorted(have)})"
                )


def failures(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """The failed external gates, worded as gates.json's `failures` are."""
    return [
        f"external set {r['name']}: {g['metric']} {_num(g['value'], 3)} < {g['bound']:g}"
        for r in reports
        for g in r["gates"]
        if not g["passed"]
    ]


def markdown(reports: Sequence[Mapping[str, Any]], digits: int = 3) -> list[str]:
    """The version page's and the model card's table: per set and figure, internal, external [CI], gap, champion."""
    if not reports:
        return []
    rows = [
        "| external set | n | metric | internal test | external [95 % CI] | gap | champion (same images) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        champ = (r.get("champion") or {}).get("metrics") or {}
        for f, gap in r["gap"].items():
            t = r["test"][f]
            c = champ.get(f)
            rows.append(
                f"| {r['name']} | {r['n']} | {f} | {_num(r['internal'].get(f), digits)} | {_num(t['value'], digits)} "
                f"[{_num(t['ci_low'], digits)}, {_num(t['ci_high'], digits)}] | {gap:+.{digits}f} | "
                f"{_num(c, digits) if c is not None else 'none'} |"
            )
    for r in reports:
        for g in r["gates"]:
            verdict = "passed" if g["passed"] else "**FAILED**"
            rows.append(f"\nGate on {r['name']}: {g['metric']} {_num(g['value'], digits)} >= {g['bound']:g}: {verdict}")
    return rows


def _num(v: Any, digits: int) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


ChampionScorer = Callable[[ExternalData], Mapping[str, Any] | None]
"""(set) -> the champion's figures on it ({version, metrics: {name: value}, note}) or None without a champion."""


def evaluate_sets(
    sets: Sequence[ExternalSet],
    spec: TaskSpec,
    loader: Callable[[ExternalSet], ExternalData],
    scorer: Callable[[ExternalData], Mapping[str, Mapping[str, float]]],
    internal: Mapping[str, Any],
    champion: ChampionScorer,
) -> list[dict[str, Any]]:
    """Every declared set: loaded, scored by the candidate (`scorer`) and by the champion, and reported."""
    check_gate_names(spec, sets)
    out = []
    for ext in sets:
        data = loader(ext)
        out.append(set_report(data, spec, scorer(data), internal, champion(data), ext.gates))
    return out
