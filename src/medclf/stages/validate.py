"""validate: check the ingest output before anything trains on it.

Reads `paths.ingest_dir`, builds evidence tables (per-image pixel statistics,
perceptual hashes, leakage pairs, split and prevalence tables, drift against the
last validated version), checks them with the GX suite in
`medclf.validation.gx_suite`, and writes:

- `reports/validation/site/` — GX Data Docs, plus `checks.json` (every check with its
  bound and example files), `report.md` and `leakage.csv` (every duplicate pair);
- `reports/validation/summary.json` — the compact verdict (per-check counts, leakage, PSI) that
  augment waits on and register quotes;
- `reports/validate.json` — the headline for `dvc metrics show/diff`: failed and warning counts;
- `<cache_dir>/validation_baseline.json` — the drift baseline, only after a pass.
(Names: `medclf.infra.catalog`, validate section.)

Each check has a severity (`validate.severity`, defaults in
`medclf.validation.checks.CHECKS`): `error` fails the stage with
`ValidationFailed` (after the reports are written), `warn` only reports.

Multi-label tasks (issue 25: ingest's `classes.json` says `"task": "multilabel"`, its classes are `task.labels`,
the label files are N×L 0/1 matrices): the class checks run per finding (prevalence bounds per split, the gap
between splits, drift against the baseline), `rare_finding` warns of a finding with fewer than
`validate.min_finding_positives` positives in val or test, and the summary's `multilabel` section (report:
"Findings (multi-label)") holds each finding's positives and prevalence per split, the findings per image
(label cardinality), the images with none and the L×L co-occurrence counts.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from medclf.config import Settings
from medclf.imaging import modality
from medclf.infra import catalog
from medclf.infra.io import atomic_dir
from medclf.pipeline import declared
from medclf.validation import drift as drift_mod
from medclf.validation import gx_suite, leakage, report, tables
from medclf.validation.checks import CHECKS, FAIL, OFF, SKIPPED, WARN, severities

log = logging.getLogger(__name__)
NO_BASELINE = (
    "No baseline: this is the first validated version of the dataset, so drift is not checked. "
    "This run becomes the baseline if it passes."
)


class ValidationFailed(RuntimeError):
    """One or more error-severity checks failed; the message lists them with examples.

    `result` holds the same dict a passing run returns (summary + `markdown`), so an
    orchestrator can still publish the report of a failed run.
    """

    transient = False  # the same data fails the same checks on every attempt (medclf.cli.is_transient)

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


def baseline_path(settings: Settings) -> Path:
    return catalog.VALIDATION_BASELINE.path(settings.paths)


def _drift_summary(
    baseline: dict[str, Any] | None,
    drift_table: pd.DataFrame,
    prevalence: pd.DataFrame,
    fingerprint: str,
    multilabel: bool = False,
) -> dict[str, Any]:
    if baseline is None:
        return {"baseline": None, "note": NO_BASELINE}
    shift = prevalence["shift"].max() if "shift" in prevalence else float("nan")
    same = baseline.get("fingerprint") == fingerprint
    per_finding: dict[str, Any] = {}
    if multilabel and "shift" in prevalence:  # each finding's largest prevalence shift over the splits and 'all'
        per_finding["prevalence_shift"] = {
            str(f): None if pd.isna(v) else round(float(v), 6)
            for f, v in prevalence.groupby("class", sort=False)["shift"].max().items()
        }
    return {
        **per_finding,
        "baseline": {k: baseline.get(k) for k in ("fingerprint", "images", "created")},
        "same_dataset": same,
        "note": "dataset identical to the baseline" if same else "compared with the last validated version",
        "intensity": {
            feature: {"psi": float(psi), "ks": float(ks)}
            for feature, psi, ks in zip(drift_table["feature"], drift_table["psi"], drift_table["ks"], strict=True)
        },
        "prevalence_shift_max": 0.0 if pd.isna(shift) else round(float(shift), 6),
    }


def _colourfulness(images: pd.DataFrame, data: tables.IngestData, kind: str) -> str | None:
    """Fill `images.colourfulness` (medclf.imaging.modality) for the `colour` check;
    the reason it is not checked, if so.

    Ingest records each file's colourfulness in the manifest when it decodes it (the file as stored: with
    `ingest.channels: 1` the arrays are grey, the colour is gone). A manifest without the column (an older ingest
    output) is measured on the arrays when they kept the colour (`ingest.channels: 3`); else it is not checked.
    """
    if not modality.expects_grey(kind):
        return f"ingest.modality {kind!r} is colour by nature: colour is not checked"
    if "colourfulness" in images.columns:
        images["colourfulness"] = pd.to_numeric(images["colourfulness"], errors="coerce").astype(float)
        return None
    values = pd.Series(float("nan"), index=images.index)
    for split, arr in data.images.items():
        if arr.ndim == 4 and arr.shape[-1] >= 3:
            measured = modality.colourfulness_batch(arr)
            at = images["split"] == split
            rows = pd.to_numeric(images.loc[at, "row"], errors="coerce")
            ok = rows.notna() & (rows >= 0) & (rows < len(measured))
            idx = rows[ok].astype(int).to_numpy()
            values.loc[ok[ok].index] = measured[idx]
    images["colourfulness"] = values
    if values.isna().all():
        return (
            "not measured: the manifest has no colourfulness column and the arrays are grey "
            "(ingest.channels: 1); re-run ingest to record it"
        )
    return None


@declared
def run(settings: Settings) -> dict[str, Any]:
    cfg, paths = settings.validation, settings.paths
    t0 = time.perf_counter()
    data = tables.load_ingest(paths.ingest_dir)
    # a multi-label ingest output says so (classes.json), its classes being the findings (`task.labels`)
    multilabel = data.classes.get("task") == "multilabel"
    classes = list(settings.ingest.classes or data.classes.get("classes", []))
    findings = classes if multilabel else None
    stats, hashes = tables.image_stats(data.images, data.labels, cfg.near_duplicate_hash_size, findings)
    t_stats = time.perf_counter()

    images = tables.images_table(data.manifest, stats, classes, multilabel)
    colour_note = _colourfulness(images, data, settings.ingest.modality)
    leak = leakage.find_leakage(images, hashes, cfg.near_duplicate_max_distance)
    images = leakage.annotate(images, leak)
    prevalence = tables.prevalence_table(images, classes, multilabel)
    labels = tables.label_statistics(images, classes, cfg.min_finding_positives) if multilabel else None
    baseline = drift_mod.load_baseline(baseline_path(settings), multilabel)
    drift_table = pd.DataFrame(columns=["feature", "psi", "ks"])
    if baseline is not None:
        drift_table, prevalence = drift_mod.compare(images, prevalence, baseline)
    evidence = {
        "manifest": data.manifest,
        "images": images.drop(columns=["_h"]),
        "splits": tables.split_table(images, data, findings),
        "prevalence": prevalence,
        "drift": drift_table,
    }
    t_tables = time.perf_counter()

    severity = severities(cfg.severity, multilabel)
    suites = gx_suite.build_suites(
        cfg,
        severity,
        classes,
        has_baseline=baseline is not None,
        colour_bound=modality.GREY_MAX_COLOURFULNESS if modality.expects_grey(settings.ingest.modality) else None,
        multilabel=multilabel,
    )
    site = catalog.VALIDATION_SITE.path(paths)
    with atomic_dir(site) as tmp:
        results = gx_suite.run_suites(evidence, suites, tmp, cfg.max_examples)
        checks = gx_suite.to_checks(results, severity, cfg.max_examples)
        if baseline is None:
            for name in ("drift_prevalence", "drift_intensity"):
                if checks[name].status != OFF:
                    checks[name].status, checks[name].note = SKIPPED, "no baseline yet (first validated version)"
        if colour_note and checks["colour"].status != OFF:
            checks["colour"].status, checks["colour"].note = SKIPPED, colour_note
        if not modality.expects_grey(settings.ingest.modality) and checks["inverted"].status != OFF:
            checks["inverted"].status = SKIPPED
            checks["inverted"].note = f"ingest.modality {settings.ingest.modality!r} has no radiograph polarity"
        if labels is not None and labels["rare_findings"] and checks["rare_finding"].status in (WARN, FAIL):
            checks["rare_finding"].note = "too rare to evaluate: " + ", ".join(
                f"{r['finding']} in {r['split']} ({r['positives']} positives < {cfg.min_finding_positives})"
                for r in labels["rare_findings"]
            )
        t_gx = time.perf_counter()
        counts = {str(s): int(n) for s, n in images["split"].value_counts().items()}
        seconds = {
            "stats_and_hashes": round(t_stats - t0, 2),
            "tables_and_leakage": round(t_tables - t_stats, 2),
            "great_expectations": round(t_gx - t_tables, 2),
            "total": round(t_gx - t0, 2),
        }
        summary = report.summarize(
            checks,
            leak.summary(cfg.max_examples),
            _drift_summary(baseline, drift_table, prevalence, drift_mod.fingerprint(images), multilabel),
            counts,
            seconds,
            str(catalog.VALIDATION_DOCS.path(paths)),
            labels,
        )
        markdown = report.markdown(summary, checks)
        staged: tuple[tuple[catalog.Artifact, Any], ...] = (
            (catalog.VALIDATION_LEAKAGE, leak.pairs),
            (catalog.VALIDATION_CHECKS, summary),
            (catalog.VALIDATION_REPORT, markdown + "\n"),
        )
        for art, content in staged:
            catalog.save_file(catalog.inside(catalog.VALIDATION_SITE, art, tmp), art.kind, content)
    catalog.VALIDATION_SUMMARY.save(paths, report.metrics(summary))
    catalog.VALIDATE_METRICS.save(paths, report.headline(summary))
    print(report.console_table(summary, checks), file=sys.stderr)
    result = {**summary, "markdown": markdown}
    if not summary["passed"]:
        raise ValidationFailed(report.failure_message(checks), result)
    catalog.VALIDATION_BASELINE.save(paths, drift_mod.make_baseline(images, prevalence, multilabel))
    log.info("validate: passed with %d warning(s) in %.1f s", summary["n_warnings"], seconds["total"])
    return result


__all__ = ["CHECKS", "ValidationFailed", "run"]
