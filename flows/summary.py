"""What a retraining run tells its reader: pure rendering of the run summary and the metrics table.

No Prefect, DVC or network here: the flow gathers the facts (stage outcomes, the
stages' JSON reports, MLflow links) and these functions turn them into the
markdown and table artifacts, so the wording is unit-testable.
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Any

NO_CHANGE = "no change, nothing retrained"


def headline(outcomes: list[dict[str, Any]], register: dict[str, Any] | None,
             changes: dict[str, Any] | None = None) -> str:
    """One line for the logs, the CLI and the artifact; says what changed in the data when ingest ran."""
    from medclf.changes import describe

    ran = [o["stage"] for o in outcomes if o["status"] != "skipped"]
    if not ran:
        return NO_CHANGE
    said = describe(changes) if "ingest" in ran else ""
    data = "" if not said else f" ({said})" if (changes or {}).get("first") else f" on new data ({said})"
    if "register" in ran and register and register.get("version") is not None:
        return (f"retrained{data}: {register.get('model_name')} version {register['version']} registered as "
                f"'{register.get('alias', 'challenger')}' (stages run: {', '.join(ran)})")
    if "train" in ran:
        return f"retrained{data} (stages run: {', '.join(ran)})"
    return f"updated {', '.join(ran)}{data}; model unchanged"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "pass" if v else "**FAIL**"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return "" if v is None else str(v)


def gate_rows(gates: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows of the gate table from `reports/gates.json` (absolute floors + non-inferiority)."""
    if not gates:
        return []
    rows = [{"gate": g.get("name", g.get("metric")), "metric": g.get("metric"), "value": g.get("value"),
             "op": g.get("op", ">="), "bound": g.get("bound"), "passed": g.get("passed")}
            for g in gates.get("gates", [])]
    ni = gates.get("non_inferiority") or {}
    for e in ni.get("entries", []):
        if e.get("skipped"):
            continue
        rows.append({"gate": "non-inferiority", "metric": e.get("metric"), "value": e.get("value"),
                     "op": e.get("op", ">="), "bound": e.get("bound"), "passed": e.get("passed")})
    return rows


def metric_rows(metrics: dict[str, Any] | None, prefix: str = "") -> list[dict[str, Any]]:
    """Numeric leaves of `reports/metrics.json` as {metric, value[, ci_low, ci_high]} rows.

    `f1`, `f1_ci_low`, `f1_ci_high` (the evaluate stage's flat layout, which `dvc metrics
    diff` compares) become one row with its interval, so the table reads like a paper's.
    """
    rows: list[dict[str, Any]] = []
    items = metrics or {}
    for key, val in items.items():
        name = f"{prefix}{key}"
        if key.endswith(("_ci_low", "_ci_high")) and key.rsplit("_ci_", 1)[0] in items:
            continue
        if isinstance(val, dict):
            rows += metric_rows(val, prefix=f"{name}.")
        elif f"{key}_ci_low" in items or f"{key}_ci_high" in items:
            rows.append({"metric": name, "value": val, "ci_low": items.get(f"{key}_ci_low"),
                         "ci_high": items.get(f"{key}_ci_high")})
        elif isinstance(val, Number) and not isinstance(val, bool):
            rows.append({"metric": name, "value": float(val)})
    return rows


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols) + " |"
            for r in rows]
    return out


def render_summary(*, outcomes: list[dict[str, Any]], dataset: dict[str, Any], gates: dict[str, Any] | None,
                   register: dict[str, Any] | None, links: dict[str, str], push: dict[str, Any] | None,
                   wall_seconds: float, failure: str | None = None, planned: list[str] | None = None) -> str:
    """The markdown run summary: what ran and why, on which data, the gates, and where the model is."""
    title = f"FAILED at stage '{failure.split(chr(39))[1]}'" if failure and "'" in failure else (
        "FAILED" if failure else headline(outcomes, register))
    md = [f"# medclf retrain: {title}", ""]
    if failure:
        md += ["```", failure.strip(), "```", ""]
    md += ["## Dataset", ""]
    if dataset:
        raw = dataset.get("raw_data") or {}
        if raw:
            md += [f"- **raw data (DVC md5 of `{raw.get('path')}`)**: `{raw.get('md5')}`, {raw.get('nfiles')} files"]
        if dataset.get("changes"):
            from medclf.changes import describe

            md += [f"- **since the previous ingest**: {describe(dataset['changes'])}"]
        md += [f"- **version (DVC md5 of `{dataset.get('path', 'ingest')}`)**: `{dataset.get('dvc_md5', 'n/a')}`"]
        for k in ("images", "patients", "splits", "classes", "quarantined"):  # not "changes": said above
            if k in dataset:
                md.append(f"- {k}: {dataset[k]}")
    else:
        md.append("- not ingested yet")
    md += ["", "## Stages", ""]
    rows = [dict(o, seconds=f"{o.get('seconds', 0):.1f}") for o in outcomes]
    done = {o["stage"] for o in outcomes}
    rows += [{"stage": s, "status": "not reached", "reason": "", "seconds": "", "attempt": ""}
             for s in (planned or []) if s not in done]
    md += _table(rows, ["stage", "status", "reason", "seconds", "attempt"])
    md += ["", f"Wall time: {wall_seconds:.1f} s."]
    if push is not None:
        md.append(f"DVC push: {push.get('pushed', 0)} file(s) to remote `{push.get('remote')}`."
                  if push.get("remote") else "DVC push: no remote configured; outputs stay local.")
    g_rows = gate_rows(gates)
    if g_rows:
        verdict = "passed" if gates and gates.get("passed") else "FAILED"
        md += ["", f"## Gates ({verdict})", ""] + _table(g_rows, ["gate", "metric", "value", "op", "bound", "passed"])
        for f in (gates or {}).get("failures", []):
            md.append(f"- {f}")
    md += ["", "## Model", ""]
    if register and register.get("version") is not None:
        reg = next((o for o in outcomes if o["stage"] == "register"), None)
        unchanged = "" if reg and reg["status"] != "skipped" else " (unchanged by this run)"
        md.append(f"- **{register.get('model_name')}** version **{register['version']}**, alias "
                  f"`{register.get('alias')}`{unchanged}: `{register.get('model_uri', '')}`")
    else:
        md.append("- no model version registered by this run")
    for label, url in links.items():
        md.append(f"- [{label}]({url})")
    return "\n".join(md) + "\n"
