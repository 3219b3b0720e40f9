"""Human-facing output of the validate stage: the summary dict, a console table and markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medclf.validation.checks import FAIL, OFF, PASS, SKIPPED, WARN, CheckResult

_MARK = {PASS: "✅ pass", FAIL: "❌ FAIL", WARN: "⚠️ warn", OFF: "· off", SKIPPED: "– skipped"}
_ORDER = {FAIL: 0, WARN: 1, SKIPPED: 2, PASS: 3, OFF: 4}


def summarize(
    checks: dict[str, CheckResult],
    leakage: dict[str, Any],
    drift: dict[str, Any],
    counts: dict[str, int],
    seconds: dict[str, float],
    data_docs: str,
    labels: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`labels`: a multi-label task's per-finding statistics (`tables.label_statistics`), kept as `multilabel`."""
    errors = [n for n, c in checks.items() if c.status == FAIL]
    warns = [n for n, c in checks.items() if c.status == WARN]
    out: dict[str, Any] = {
        "passed": not errors,
        "errors": errors,
        "warnings": warns,
        "n_errors": len(errors),
        "n_warnings": len(warns),
        "images": sum(counts.values()),
        "splits": counts,
        "checks": {n: c.as_dict() for n, c in checks.items()},
        "leakage": leakage,
        "drift": drift,
        "seconds": seconds,
        "data_docs": data_docs,
    }
    if labels is not None:
        out["multilabel"] = labels
    return out


def metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The compact verdict file (`reports/validation/summary.json`): numbers and the failed check names.

    Detail, not a DVC metric (`headline` is): bounds and examples live in the Data Docs site's
    `checks.json`. No timings: augment depends on this file, so it must change only when the verdict or the data does
    (a rerun of validate with
    the same outcome must not retrain); the seconds are in `checks.json`.
    """
    drift = summary["drift"]
    out: dict[str, Any] = {
        "passed": summary["passed"],
        "n_errors": summary["n_errors"],
        "n_warnings": summary["n_warnings"],
        "errors": summary["errors"],
        "warnings": summary["warnings"],
        "images": summary["images"],
        "splits": summary["splits"],
        "offending": {n: c["count"] for n, c in summary["checks"].items()},
        "leakage": summary["leakage"]["counts"],
    }
    if drift.get("baseline"):
        out["drift"] = {
            **{f"psi_{f}": v["psi"] for f, v in drift["intensity"].items()},
            "prevalence_shift_max": drift["prevalence_shift_max"],
        }
    labels = summary.get("multilabel")
    if labels:
        out["multilabel"] = {
            "positives": labels["positives"],
            "cardinality": labels["cardinality"],
            "rare_findings": [f"{r['finding']} in {r['split']} ({r['positives']})" for r in labels["rare_findings"]],
        }
    return out


def headline(summary: dict[str, Any]) -> dict[str, int]:
    """The stage's headline for `dvc metrics show/diff` (`reports/validate.json`): how many checks failed
    (error severity: the stage fails) and how many warned. Every other number stays in `metrics`' file.

    `failed` is the column evaluate's headline uses for failed release gates: 0 reads "passed" in both."""
    return {"failed": int(summary["n_errors"]), "warnings": int(summary["n_warnings"])}


def failure_message(checks: dict[str, CheckResult]) -> str:
    failed = [c for c in checks.values() if c.status == FAIL]
    lines = [f"{len(failed)} error-severity check(s) failed:"] + [f"  - {c.message()}" for c in failed]
    lines.append("Set validate.severity.<check> to 'warn' or 'off' in params.yaml only if this is expected.")
    return "\n".join(lines)


def _cut(text: Any, width: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= width else s[: width - 1] + "…"


def console_table(summary: dict[str, Any], checks: dict[str, CheckResult]) -> str:
    verdict = "PASSED" if summary["passed"] else "FAILED"
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    head = (
        f"validate: {verdict} — {summary['images']} images ({splits}), "
        f"{summary['n_errors']} error(s), {summary['n_warnings']} warning(s), "
        f"{summary['seconds'].get('total', 0):.1f} s"
    )
    rows = [("check", "severity", "status", "observed", "bound")]
    for c in sorted(checks.values(), key=lambda c: (_ORDER[c.status], c.name)):
        rows.append(
            (
                c.name,
                c.severity,
                c.status.upper() if c.status in (FAIL, WARN) else c.status,
                _cut(c.observed, 38),
                _cut(c.bound, 48),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [head] + ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for c in checks.values():
        if c.status in (FAIL, WARN) and c.examples:
            lines.append(f"{c.name} examples:")
            lines += [f"  - {e}" for e in c.examples]
    if not summary["drift"].get("baseline"):
        lines.append("drift: " + summary["drift"]["note"])
    labels = summary.get("multilabel")
    if labels:
        card = ", ".join(f"{k} {v:.2f}" for k, v in labels["cardinality"].items() if k != "all")
        rare = "; ".join(f"{r['finding']} in {r['split']} ({r['positives']})" for r in labels["rare_findings"])
        lines.append(f"findings per image: {card}" + (f"; too rare to evaluate: {rare}" if rare else ""))
    lines.append(f"Data Docs: {docs_url(summary['data_docs'])}")
    return "\n".join(lines)


def _md_cell(text: Any) -> str:
    return ("" if text is None else str(text)).replace("|", "\\|").replace("\n", " ")


def markdown(summary: dict[str, Any], checks: dict[str, CheckResult]) -> str:
    verdict = "✅ passed" if summary["passed"] else "❌ FAILED"
    splits = ", ".join(f"{k}: {v}" for k, v in summary["splits"].items())
    counts = (
        f"{summary['images']} images ({splits}); {summary['n_errors']} error(s), "
        f"{summary['n_warnings']} warning(s); {summary['seconds'].get('total', 0):.1f} s."
    )
    out = [
        f"# Data validation {verdict}",
        "",
        counts,
        "",
        "| check | severity | status | observed | bound |",
        "|---|---|---|---|---|",
    ]
    for c in sorted(checks.values(), key=lambda c: (_ORDER[c.status], c.name)):
        out.append(f"| `{c.name}` | {c.severity} | {_MARK[c.status]} | {_md_cell(c.observed)} | {_md_cell(c.bound)} |")
    problems = [c for c in checks.values() if c.status in (FAIL, WARN)]
    if problems:
        out += ["", "## Findings", ""]
        for c in problems:
            out.append(
                f"**`{c.name}`** ({c.severity}) — {c.description}. Observed {_md_cell(c.observed)}; "
                f"bound {_md_cell(c.bound)}."
            )
            out += [f"- `{_md_cell(e)}`" for e in c.examples] + [""]
    leak = summary["leakage"]
    out += ["## Leakage", "", "| finding | count |", "|---|---|"]
    out += [f"| {k.replace('_', ' ')} | {v} |" for k, v in leak["counts"].items()]
    for key in (
        "exact_cross_split_examples",
        "near_cross_split_examples",
        "patient_overlap_examples",
        "label_conflict_examples",
    ):
        if leak.get(key):
            out += ["", f"{key.replace('_', ' ').capitalize()}:"] + [f"- `{_md_cell(e)}`" for e in leak[key]]
    drift = summary["drift"]
    out += ["", "## Drift", ""]
    if not drift.get("baseline"):
        out.append(drift["note"])
    else:
        b = drift["baseline"]
        out.append(f"Against baseline `{b['fingerprint']}` ({b['images']} images, validated {b['created']}).")
        out += ["", "| feature | PSI | KS |", "|---|---|---|"]
        out += [f"| {f} | {v['psi']:.3f} | {v['ks']:.3f} |" for f, v in drift["intensity"].items()]
        out.append(f"\nLargest class-share shift: {drift['prevalence_shift_max']:.3f}.")
    if summary.get("multilabel"):
        out += ["", *_multilabel_markdown(summary["multilabel"], drift)]
    out += [
        "",
        (
            f"[Great Expectations Data Docs]({docs_url(summary['data_docs'])}): every expectation with its "
            "result (opens from the machine that ran the stage)."
        ),
    ]
    return "\n".join(out)


def _multilabel_markdown(labels: dict[str, Any], drift: dict[str, Any]) -> list[str]:
    """The multi-label section: per-finding positives and prevalence per split, the findings per image, the
    co-occurrence table and the findings too rare to evaluate."""
    findings, splits = labels["findings"], list(labels["images"])
    out = [
        "## Findings (multi-label)",
        "",
        "Images carrying each finding (prevalence) per split; an image may carry several findings, or none.",
        "",
        "| finding | " + " | ".join(f"{s} ({labels['images'][s]})" for s in splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    for f in findings:
        cells = [f"{labels['positives'][s][f]} ({labels['prevalence'][s][f]:.3f})" for s in splits]
        out.append(f"| {_md_cell(f)} | " + " | ".join(cells) + " |")
    out.append("| *findings per image* | " + " | ".join(f"{labels['cardinality'][s]:.3f}" for s in splits) + " |")
    out.append("| *no finding* | " + " | ".join(str(labels["no_finding"][s]) for s in splits) + " |")
    shift = drift.get("prevalence_shift") or {}
    if shift:
        out += ["", "Largest prevalence shift against the baseline, per finding: "]
        out[-1] += ", ".join(f"{_md_cell(f)} " + ("new" if v is None else f"{v:.3f}") for f, v in shift.items()) + "."
    co = labels["co_occurrence"].get("all")
    if co is not None:
        out += [
            "",
            "Co-occurrence (all splits): images carrying both findings; the diagonal is each finding's count.",
            "",
            "| | " + " | ".join(_md_cell(f) for f in findings) + " |",
            "|---|" + "---|" * len(findings),
        ]
        out += [
            f"| **{_md_cell(f)}** | " + " | ".join(map(str, row)) + " |" for f, row in zip(findings, co, strict=True)
        ]
    rare = labels["rare_findings"]
    out.append("")
    if rare:
        out.append(
            f"Too rare to evaluate (fewer than {labels['min_positives']} positives in val or test): "
            + ", ".join(f"**{_md_cell(r['finding'])}** in {r['split']} ({r['positives']})" for r in rare)
            + "."
        )
    else:
        out.append(f"Every finding has at least {labels['min_positives']} positives in val and in test.")
    return out


def docs_url(location: str) -> str:
    """A link the reader can click: an http(s) URL as is, a local path as an absolute `file://` URL."""
    if location.startswith(("http://", "https://", "file://")):
        return location
    return Path(location).resolve().as_uri()
