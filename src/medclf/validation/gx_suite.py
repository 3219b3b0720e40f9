"""The Great Expectations suite of the validate stage, defined in code, and its runner.

Every bound in `validate` params is one (or a few) GX expectations over five
evidence tables (`tables.py`, `leakage.py`, `drift.py`): `manifest` (all rows),
`images` (usable rows + pixel statistics + leakage partners), `splits`,
`prevalence` and `drift`. Each expectation carries `meta.check`, the name used in
`validate.severity`; a check with severity `off` is left out of the suite.

A multi-label task (issue 25, `multilabel=True`) checks its findings with the same checks: `unknown_label` (every
name in a `label` is a finding), `array_consistency` (the manifest's findings = the row of the N×L 0/1 label matrix,
its width = the number of findings, 0/1 entries only), `prevalence_bounds`/`prevalence_gap`/`drift_prevalence`
per finding (the prevalence table holds one row per split and finding), plus `rare_finding` (at least
`validate.min_finding_positives` positives of each finding in val and in test).

GX (GX Core 1.x) is imported only inside these functions: it takes seconds to import.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medclf.config import Validate
from medclf.imaging.splits import SPLITS
from medclf.validation.checks import OFF, SKIPPED, CheckResult, describe, outcome
from medclf.validation.tables import MANIFEST_COLUMNS, REQUIRED

SITE = "medclf_validation"
INDEX_COLUMNS = {
    "manifest": ["source_uri"],
    "images": ["file"],
    "splits": ["split"],
    "prevalence": ["split", "class"],
    "drift": ["feature"],
}
ROW_UNITS = {"manifest": "manifest rows", "images": "images"}


def build_suites(
    cfg: Validate,
    severity: dict[str, str],
    classes: list[str],
    has_baseline: bool,
    colour_bound: float | None = None,
    multilabel: bool = False,
) -> dict[str, list[Any]]:
    """The expectations per table. The whole suite lives here, under version control.

    `colour_bound`: the largest colourfulness a greyscale `ingest.modality` accepts (`medclf.imaging.modality`); None (a
    colour modality) leaves the `colour` check out. `multilabel`: `classes` are the findings of a multi-label task
    (the module docstring says what changes)."""
    with _quiet():
        import great_expectations.expectations as gxe
        from great_expectations.expectations.row_conditions import Column

    suites: dict[str, list[Any]] = defaultdict(list)

    def add(table: str, check: str, exp: type, bound: str, where: dict[str, str] | None = None, **kwargs: Any) -> None:
        sev = severity[check]
        if sev == "off":
            return
        meta = {"check": check, "bound": bound, **({"where": where} if where else {})}
        suites[table].append(
            exp(
                **kwargs,
                meta=meta,
                severity="critical" if sev == "error" else "warning",
                notes=f"medclf check `{check}` ({sev}): {describe(check)}",
            )
        )

    # manifest: the ingest contract
    add(
        "manifest",
        "schema",
        gxe.ExpectTableColumnsToMatchSet,
        "all ingest manifest columns present",
        column_set=list(MANIFEST_COLUMNS),
        exact_match=False,
    )
    add(
        "manifest",
        "schema",
        gxe.ExpectColumnValuesToBeInSet,
        "status ∈ {ok, quarantined}",
        column="status",
        value_set=["ok", "quarantined"],
    )
    add("manifest", "unique_id", gxe.ExpectColumnValuesToBeUnique, "id unique", column="id")

    # images: one row per usable image
    add(
        "images",
        "schema",
        gxe.ExpectColumnValuesToBeInSet,
        f"split ∈ {list(SPLITS)}",
        column="split",
        value_set=list(SPLITS),
    )
    for col in REQUIRED:
        if multilabel and col == "label_index":  # a multi-label image has no class index: its findings are `label`
            continue
        add("images", "not_null", gxe.ExpectColumnValuesToNotBeNull, "required columns not null", column=col)
    if multilabel:
        add(
            "images",
            "unknown_label",
            gxe.ExpectColumnValuesToBeNull,
            f"every finding in label ∈ {classes}",
            column="unknown_findings",
        )
        add(
            "images",
            "array_consistency",
            gxe.ExpectColumnPairValuesToBeEqual,
            "findings in label = 1s of <split>_labels.npy[row]",
            column_A="label_set",
            column_B="array_label",
        )  # an unknown name is reported by `unknown_label`; `label_set` holds the known ones only
    else:
        add(
            "images",
            "unknown_label",
            gxe.ExpectColumnValuesToBeInSet,
            f"label ∈ {classes}",
            column="label",
            value_set=list(classes),
        )
        add(
            "images",
            "array_consistency",
            gxe.ExpectColumnPairValuesToBeEqual,
            "label_index = position of label in classes",
            column_A="label_index",
            column_B="expected_label_index",
            ignore_row_if="either_value_is_missing",
        )  # an unknown label is reported by `unknown_label`
        add(
            "images",
            "array_consistency",
            gxe.ExpectColumnPairValuesToBeEqual,
            "label_index = <split>_labels.npy[row]",
            column_A="label_index",
            column_B="array_label",
        )
    add(
        "images",
        "array_consistency",
        gxe.ExpectCompoundColumnsToBeUnique,
        "(split, row) unique",
        column_list=["split", "row"],
    )
    for col in ("orig_height", "orig_width"):
        add(
            "images",
            "image_size",
            gxe.ExpectColumnValuesToBeBetween,
            f"{cfg.min_size} ≤ size ≤ {cfg.max_size}",
            column=col,
            min_value=cfg.min_size,
            max_value=cfg.max_size,
        )
    add(
        "images",
        "aspect_ratio",
        gxe.ExpectColumnValuesToBeBetween,
        f"long side / short side ≤ {cfg.max_aspect_ratio:g}",
        column="aspect_ratio",
        max_value=cfg.max_aspect_ratio,
    )
    add(
        "images",
        "channels",
        gxe.ExpectColumnValuesToBeBetween,
        "1 ≤ channels ≤ 4",
        column="orig_channels",
        min_value=1,
        max_value=4,
    )
    add(
        "images",
        "duplicate_within_split",
        gxe.ExpectCompoundColumnsToBeUnique,
        "(split, sha256) unique",
        column_list=["split", "sha256"],
    )
    add(
        "images",
        "duplicate_cross_split",
        gxe.ExpectColumnValuesToBeNull,
        "no identical file in another split",
        column="duplicate_cross_split_of",
    )
    add(
        "images",
        "label_conflict",
        gxe.ExpectColumnValuesToBeNull,
        "no identical file under another label",
        column="label_conflict_of",
    )
    dist = f"no image within phash distance {cfg.near_duplicate_max_distance}"
    add(
        "images",
        "near_duplicate_cross_split",
        gxe.ExpectColumnValuesToBeNull,
        f"{dist} in another split",
        column="near_duplicate_cross_split_of",
    )
    add(
        "images",
        "near_duplicate_within_split",
        gxe.ExpectColumnValuesToBeNull,
        f"{dist} in the same split",
        column="near_duplicate_within_split_of",
    )
    add(
        "images",
        "patient_overlap",
        gxe.ExpectColumnValuesToBeNull,
        "each patient in one split",
        column="patient_in_splits",
    )
    add(
        "images",
        "patient_id_missing",
        gxe.ExpectColumnValuesToNotBeNull,
        "patient_hash not null",
        column="patient_hash",
    )
    add(
        "images",
        "blank",
        gxe.ExpectColumnValuesToBeBetween,
        f"std > {cfg.blank_std_max}",
        column="std",
        min_value=cfg.blank_std_max,
        strict_min=True,
    )
    # A blank image is reported once, as blank, not also as low-contrast/saturated/inverted.
    visible = Column("std") > cfg.blank_std_max if severity["blank"] != "off" else None
    add(
        "images",
        "low_contrast",
        gxe.ExpectColumnValuesToBeBetween,
        f"std > {cfg.low_contrast_std_max}",
        column="std",
        min_value=cfg.low_contrast_std_max,
        strict_min=True,
        row_condition=visible,
    )
    for col, what in (("frac_white", "≥250"), ("frac_black", "≤5")):
        add(
            "images",
            "saturated",
            gxe.ExpectColumnValuesToBeBetween,
            f"fraction of pixels {what} ≤ {cfg.saturated_fraction_max}",
            column=col,
            max_value=cfg.saturated_fraction_max,
            row_condition=visible,
        )
    # Inversion is a radiograph's polarity (a bright body on a dark border); a colour modality (fundus, dermoscopy:
    # no colour bound) has none, and its dark vignette would read as one.
    if colour_bound is not None:
        add(
            "images",
            "inverted",
            gxe.ExpectColumnValuesToBeBetween,
            f"border mean < {cfg.inverted_border_mean_min}",
            column="border_mean",
            max_value=cfg.inverted_border_mean_min,
            strict_max=True,
            row_condition=visible,
        )
        add(
            "images",
            "inverted",
            gxe.ExpectColumnValuesToBeBetween,
            f"centre − border mean ≥ {cfg.inverted_center_contrast_min}",
            column="center_contrast",
            min_value=cfg.inverted_center_contrast_min,
            row_condition=visible,
        )

    if colour_bound is not None:  # null colourfulness (not measured) is not counted: the stage says so
        add(
            "images",
            "colour",
            gxe.ExpectColumnValuesToBeBetween,
            f"colourfulness ≤ {colour_bound:g}",
            column="colourfulness",
            max_value=colour_bound,
        )

    # splits and prevalence
    for a, b, what in (
        ("rows", "array_rows", "manifest rows = array rows"),
        ("rows", "label_rows", "manifest rows = label rows"),
        ("array_shape", "expected_shape", "array shape = classes.json size×size×channels"),
    ):
        add("splits", "array_consistency", gxe.ExpectColumnPairValuesToBeEqual, what, column_A=a, column_B=b)
    if multilabel:
        add(
            "splits",
            "array_consistency",
            gxe.ExpectColumnPairValuesToBeEqual,
            f"label matrix columns = {len(classes)} findings",
            column_A="label_width",
            column_B="expected_label_width",
        )
        add(
            "splits",
            "array_consistency",
            gxe.ExpectColumnValuesToBeBetween,
            "label matrix entries ∈ {0, 1}",
            column="label_non_binary",
            max_value=0,
        )
    for split, (lo, hi) in cfg.split_fraction_bounds.items():
        add(
            "splits",
            "split_fractions",
            gxe.ExpectColumnValuesToBeBetween,
            f"{split}: {lo} ≤ fraction ≤ {hi}",
            column="fraction",
            min_value=lo,
            max_value=hi,
            row_condition=Column("split") == split,
            where={"split": split},
        )
    lo, hi = cfg.prevalence_bounds
    add(
        "prevalence",
        "prevalence_bounds",
        gxe.ExpectColumnValuesToBeBetween,
        f"{lo} ≤ share ≤ {hi}",
        column="share",
        min_value=lo,
        max_value=hi,
    )
    add(
        "prevalence",
        "prevalence_gap",
        gxe.ExpectColumnValuesToBeBetween,
        f"max−min share across splits ≤ {cfg.max_prevalence_gap}",
        column="gap",
        max_value=cfg.max_prevalence_gap,
    )
    if multilabel and "rare_finding" in severity:
        for split in ("val", "test"):
            add(
                "prevalence",
                "rare_finding",
                gxe.ExpectColumnValuesToBeBetween,
                f"{split}: positives of each finding ≥ {cfg.min_finding_positives}",
                column="count",
                min_value=cfg.min_finding_positives,
                row_condition=Column("split") == split,
                where={"split": split},
            )
    if has_baseline:
        add(
            "prevalence",
            "drift_prevalence",
            gxe.ExpectColumnValuesToBeBetween,
            f"|share − baseline share| ≤ {cfg.drift_prevalence_max}",
            column="shift",
            max_value=cfg.drift_prevalence_max,
        )
        add(
            "drift",
            "drift_intensity",
            gxe.ExpectColumnValuesToBeBetween,
            f"PSI ≤ {cfg.drift_psi_max}",
            column="psi",
            max_value=cfg.drift_psi_max,
        )
    return dict(suites)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No analytics, INFO/deprecation chatter or stray prints from GX (progress bars: see run_suites).

    GX logs at INFO while importing, and the CLI's root logger shows INFO, so the
    `great_expectations` logger is raised to ERROR before the first import, for good.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    _silence_loggers()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
    _silence_loggers()


def _silence_loggers() -> None:
    """Some GX modules set their own logger level to INFO at import; lift them all to ERROR."""
    for name in ["great_expectations", *logging.root.manager.loggerDict]:
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.ERROR)


def run_suites(
    tables: dict[str, pd.DataFrame], suites: dict[str, list[Any]], site_dir: Path | None, max_examples: int
) -> list[Any]:
    """Validate each table against its suite; build Data Docs into `site_dir`. Returns GX results."""
    with _quiet():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        _silence_loggers()
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        if site_dir is not None:
            ctx.add_data_docs_site(
                site_name=SITE,
                site_config={
                    "class_name": "SiteBuilder",
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(Path(site_dir).resolve()),
                    },
                },
            )
        source = ctx.data_sources.add_pandas("medclf_validate")
        results = []
        for table, expectations in suites.items():
            if not expectations:
                continue
            batch_def = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
            suite = ctx.suites.add(gx.ExpectationSuite(name=f"medclf_{table}", expectations=expectations))
            vd = ctx.validation_definitions.add(
                gx.ValidationDefinition(name=f"medclf_{table}", data=batch_def, suite=suite)
            )
            fmt = {
                "result_format": "SUMMARY",
                "partial_unexpected_count": 2 * max_examples,
                "unexpected_index_column_names": INDEX_COLUMNS[table],
            }
            res = vd.run(batch_parameters={"dataframe": tables[table]}, result_format=fmt)
            for r in res.results:
                conf = r.expectation_config
                seen = conf and _column_summary(tables[table], conf.kwargs or {}, conf.meta or {})
                if seen and isinstance(r.result, dict):
                    r.result["medclf_observed"] = seen
            results += [(table, r) for r in res.results]
        if site_dir is not None:
            ctx.build_data_docs(site_names=[SITE])
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3f}"
    if isinstance(v, np.integer):
        return str(int(v))
    return str(v)


def _column_summary(df: pd.DataFrame, kwargs: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """What a passing bounded check saw: "fraction 0.647", "gap max 0.012", "orig_height 128–2916".

    GX reports only the offending rows of a column-map expectation, so the observed value of a
    check that passed is read from the evidence table it ran on (the rows its `meta.where` selects).
    Expectations restricted by another row condition are left to GX's "0 of N" count.
    """
    col = kwargs.get("column")
    if not col or col not in df.columns or "min_value" not in kwargs and "max_value" not in kwargs:
        return None
    where = meta.get("where") or {}
    if kwargs.get("row_condition") is not None and not where:
        return None
    rows = df
    for key, value in where.items():
        rows = rows[rows[key] == value]
    vals = pd.to_numeric(rows[col], errors="coerce").dropna()
    if vals.empty:
        return None
    lo, hi = vals.min(), vals.max()
    if lo == hi:
        seen = f"{col} {_fmt(lo)}"
    elif kwargs.get("min_value") is None:
        seen = f"{col} max {_fmt(hi)}"
    elif kwargs.get("max_value") is None:
        seen = f"{col} min {_fmt(lo)}"
    else:
        seen = f"{col} {_fmt(lo)}–{_fmt(hi)}"
    label = " ".join(str(v) for v in where.values())
    return f"{label}: {seen}" if label else seen


def _passed(table: str, res: dict[str, Any]) -> list[str]:
    """The observed value of an expectation that passed: the column's values, else GX's own count/value."""
    parts = []
    if "unexpected_count" in res and (table in ROW_UNITS or not res.get("medclf_observed")):
        parts.append(
            f"{res.get('unexpected_count') or 0} of {res.get('element_count', '?')} {ROW_UNITS.get(table, 'rows')}"
        )
    if res.get("medclf_observed"):
        parts.append(str(res["medclf_observed"]))
    elif "observed_value" in res:
        seen = res["observed_value"]
        parts.append(f"{len(seen)} columns" if isinstance(seen, (list, tuple)) else _fmt(seen))
    return parts


def _examples(table: str, res: dict[str, Any], max_examples: int) -> list[str]:
    """Readable rows: the identifying columns, then the offending value(s); pairs listed once."""
    out: list[str] = []
    seen: set[str | frozenset[str]] = set()
    index_cols = INDEX_COLUMNS[table]
    rows = [r for r in res.get("partial_unexpected_index_list") or [] if isinstance(r, dict)]
    if rows and all("sha256" in r for r in rows):  # identical files: one line per group
        groups: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            groups[str(r["sha256"])].append("/".join(_fmt(r[c]) for c in index_cols if c in r))
        # a group of one is a pair cut in half by GX's partial list: leave it out
        return [" ↔ ".join(files) + f" (sha256 {h[:12]}…)" for h, files in groups.items() if len(files) > 1][
            :max_examples
        ]
    for row in rows:
        ident = "/".join(_fmt(row[c]) for c in index_cols if c in row)
        values = {k: v for k, v in row.items() if k not in index_cols}
        partner = next((v for k, v in values.items() if k.endswith("_of")), None)
        if partner is not None:
            key: str | frozenset[str] = frozenset((ident, str(partner)))
            text = f"{ident} ↔ {partner}"
        elif "patient_in_splits" in values:
            key, text = ident, f"{ident} (patient {values['patient_in_splits']})"
        else:
            key = ident
            text = ident + (" (" + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()) + ")" if values else "")
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out[:max_examples]


def _observed(table: str, res: dict[str, Any], examples: list[str]) -> str:
    if "unexpected_count" in res:
        n = res.get("unexpected_count") or 0
        if table in ROW_UNITS:
            return f"{n} of {res.get('element_count', '?')} {ROW_UNITS[table]}"
        return "; ".join(examples) if n else "0 rows"
    mismatch = (res.get("details") or {}).get("mismatched")
    if mismatch:
        return ", ".join(f"{k}: {v}" for k, v in mismatch.items())
    return _fmt(res.get("observed_value", ""))


def to_checks(results: list[Any], severity: dict[str, str], max_examples: int) -> dict[str, CheckResult]:
    """Fold expectation results into one CheckResult per check (failed if any expectation failed)."""
    checks = {name: CheckResult(name, sev, status=outcome(sev, False)) for name, sev in severity.items()}
    parts: dict[str, dict[str, list[str]]] = defaultdict(
        lambda: {"observed": [], "bound": [], "examples": [], "passed": []}
    )
    failed: set[str] = set()
    evaluated: set[str] = set()
    for table, r in results:
        meta = r.expectation_config.meta or {}
        name = meta.get("check")
        if name not in checks:
            continue
        evaluated.add(name)
        res = r.result or {}
        info = r.exception_info or {}
        raised = info.get("raised_exception") or any(
            isinstance(v, dict) and v.get("raised_exception") for v in info.values()
        )
        p = parts[name]
        if meta.get("bound") and meta["bound"] not in p["bound"]:
            p["bound"].append(meta["bound"])
        if r.success and not raised:
            p["passed"] += _passed(table, res)
            continue
        failed.add(name)
        if raised:
            msg = info.get("exception_message") or next(
                (v.get("exception_message") for v in info.values() if isinstance(v, dict)), ""
            )
            p["observed"].append(f"GX could not evaluate it: {msg}")
            continue
        ex = _examples(table, res, max_examples)
        p["observed"].append(_observed(table, res, ex))
        p["examples"] += ex
        checks[name].count += int(res.get("unexpected_count") or 1)
    for name, c in checks.items():
        p = parts[name]
        c.bound = "; ".join(p["bound"])
        if name in failed:
            c.status = outcome(c.severity, True)
            c.observed = "; ".join(dict.fromkeys(p["observed"]))
            c.examples = list(dict.fromkeys(p["examples"]))[:max_examples]
        elif name not in evaluated and c.status != OFF:
            c.status, c.observed = SKIPPED, "not evaluated"
        else:
            c.observed = "; ".join(dict.fromkeys(p["passed"])) or "ok" if c.status != OFF else None
    return checks
