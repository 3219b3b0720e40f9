"""What a retraining run tells its reader: pure rendering of the run summary and the metrics table.

No Prefect, DVC or network here: the flow gathers the facts (stage outcomes, the
stages' JSON reports, MLflow links) and these functions turn them into the
outcome line (the flow run's state message), its tags, the markdown summary and
the metrics table, so the wording is unit-testable. Numbers are shown to 3
decimals, intervals as "0.955 (0.850–1.000)", counts as integers.
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Any, SupportsFloat, cast

from medclf.config.vocabulary import METRICS, SUMMARY, TABLE

NO_CHANGE = "no change, nothing retrained"
_COUNTS = ("tp", "fp", "fn", "tn", "n")
_VAL = {"f1": "f1", "recall": "sensitivity", "specificity": "specificity", "n": "n"}


def num(v: Any, digits: int = 3) -> str:
    """A number for a reader: integers as integers, floats to `digits` decimals, "n/a" when missing."""
    if v is None or isinstance(v, str):
        return "n/a" if v is None else v
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    f = float(v)
    return "n/a" if math.isnan(f) else f"{f:.{digits}f}"


def with_ci(value: Any, low: Any, high: Any) -> str:
    """ "0.955 (0.850–1.000)": the value and its 95 % interval (just the value when there is none)."""
    if low is None or high is None:
        return num(value)
    return f"{num(value)} ({num(low)}–{num(high)})"


def _pair(value: Any, bound: Any) -> tuple[str, str]:
    """3 decimals, or full precision when rounding would hide why a gate failed (0.7999 vs 0.800)."""
    a, b = num(value), num(bound)
    return (repr(float(value)), repr(float(bound))) if a == b and value is not None and bound is not None else (a, b)


def data_tag(dataset: dict[str, Any] | None) -> str | None:
    """`data:<md5[:8]>` of the raw source DVC hashed (else of the processed dataset); None if unknown."""
    ds = dataset or {}
    md5 = (ds.get("raw_data") or {}).get("md5") or ds.get("dvc_md5")
    return f"data:{str(md5).removesuffix('.dir')[:8]}" if md5 else None


def gate_failure(gates: dict[str, Any] | None) -> str | None:
    """ "gate failed: recall 0.773 < 0.800" for each failed gate in `reports/gates.json`; None if all passed."""
    failed = []
    for g in (gates or {}).get("gates", []):
        if not g.get("passed"):
            v, b = _pair(g.get("value"), g.get("bound"))
            failed.append(f"{g.get('metric')} {v} < {b}")
    for e in ((gates or {}).get("non_inferiority") or {}).get("entries", []):
        if not e.get("skipped") and not e.get("passed"):
            v, b = _pair(e.get("value"), e.get("bound"))
            failed.append(
                f"{e.get('metric')} {v} < {b} (non-inferiority: champion {num(e.get('champion'))} "
                f"− margin {num(e.get('margin'))})"
            )
    return f"gate failed: {'; '.join(failed)}" if failed else None


def failure_outcome(stage: str, error: str, gates: dict[str, Any] | None = None, error_type: str | None = None) -> str:
    """The one-line outcome of a failed run: the failing gate with its values, else the stage's error line."""
    if error_type == "GateFailed":
        said = gate_failure(gates)
        if said:
            return said
    first = next((ln.strip() for ln in error.splitlines() if ln.strip()), "error")
    first = first.removeprefix(f"medclf {stage}: ")
    return f"failed at {stage}: {first if len(first) <= 160 else first[:159] + '…'}"


def headline(
    outcomes: list[dict[str, Any]], register: dict[str, Any] | None, changes: dict[str, Any] | None = None
) -> str:
    """The outcome in one line (the flow run's state message, the CLI's output, the summary's title)."""
    from medclf.imaging.changes import describe

    ran = [o["stage"] for o in outcomes if o["status"] != "skipped"]
    if not ran:
        return NO_CHANGE
    said = describe(changes) if "ingest" in ran else ""
    data = "" if not said else f" ({said})" if (changes or {}).get("first") else f" on new data ({said})"
    if "register" in ran and register and register.get("version") is not None:
        v, name = register["version"], register.get("model_name")
        if register.get("created") is False:
            return f"retrained{data}: identical to {name} v{v}, not registered again"
        return f"retrained{data}: {register.get('alias', 'challenger')} v{v} ({name})"
    if "train" in ran:
        return f"retrained{data}; not registered (stopped after {ran[-1]})"
    return f"updated {', '.join(ran)}{data}; model unchanged"


def run_tags(
    outcomes: list[dict[str, Any]],
    register: dict[str, Any] | None,
    dataset: dict[str, Any] | None,
    failed_stage: str | None = None,
    gate_failed: bool = False,
) -> list[str]:
    """Tags of the flow run (the runs list filters on them; the flow prefixes `medclf:`)."""
    tag = data_tag(dataset)
    tags = [tag] if tag else []
    if failed_stage:
        return [f"failed:{failed_stage}", *(["gate-failed"] if gate_failed else []), *tags]
    ran = any(o["status"] != "skipped" for o in outcomes)
    registered = any(o["stage"] == "register" and o["status"] != "skipped" for o in outcomes)
    version = (register or {}).get("version") if registered else None
    tags.append("retrained" if ran and version is not None else "updated" if ran else "no-change")
    if version is not None:
        tags += [f"model-v{version}", f"{(register or {}).get('alias', 'challenger')}-v{version}"]
    if ran and ((dataset or {}).get("changes") or {}).get("first") is False:
        tags.append("new-data")
    return tags


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "pass" if v else "**FAIL**"
    return "" if v is None else num(v)


def gate_rows(gates: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows of the gate table from `reports/gates.json` (absolute floors + non-inferiority)."""
    if not gates:
        return []
    rows = [
        {
            "gate": g.get("name", g.get("metric")),
            "metric": g.get("metric"),
            "value": g.get("value"),
            "op": g.get("op", ">="),
            "bound": g.get("bound"),
            "passed": g.get("passed"),
        }
        for g in gates.get("gates", [])
    ]
    ni = gates.get("non_inferiority") or {}
    for e in ni.get("entries", []):
        if e.get("skipped"):
            continue
        rows.append(
            {
                "gate": "non-inferiority",
                "metric": e.get("metric"),
                "value": e.get("value"),
                "op": e.get("op", ">="),
                "bound": e.get("bound"),
                "passed": e.get("passed"),
            }
        )
    return rows


def non_inferiority(gates: dict[str, Any] | None) -> str:
    """The non-inferiority verdict in words ("skipped: no champion registered", "passed against v1 ...")."""
    if not gates:
        return "not evaluated"
    ni = gates.get("non_inferiority") or {}
    champ = (gates.get("champion") or {}).get("version")
    if ni.get("skipped") or not ni.get("entries"):
        return f"skipped: {ni.get('note') or 'no champion registered'}"
    checked = [e for e in ni["entries"] if not e.get("skipped")]
    verdict = "passed" if all(e.get("passed") for e in checked) else "FAILED"
    each = ", ".join(
        f"{e.get('metric')} {num(e.get('value'))} {'≥' if e.get('passed') else '<'} "
        f"{num(e.get('bound'))} (champion {num(e.get('champion'))})"
        for e in checked
    )
    return f"{verdict} against champion{f' v{champ}' if champ else ''} (margin {num(ni.get('margin'))}): {each}"


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
            rows.append(
                {
                    "metric": name,
                    "value": val,
                    "ci_low": items.get(f"{key}_ci_low"),
                    "ci_high": items.get(f"{key}_ci_high"),
                }
            )
        elif not isinstance(val, bool) and isinstance(val, Number):
            # typeshed's `Number` declares no `__float__` (and does not know bool is registered as one)
            rows.append({"metric": name, "value": float(cast(SupportsFloat, val))})
    return rows


def metrics_table(metrics: dict[str, Any] | None) -> list[dict[str, str]]:
    """The Prefect metrics table: one row per metric, the test value and its 95 % CI at the chosen
    threshold, the same at the default threshold, and the validation value; strings at 3 decimals,
    counts as integers, six narrow columns."""
    doc = metrics or {}
    test, default, val = doc.get("test") or {}, doc.get("test_default_threshold") or {}, doc.get("val") or {}
    at = f"at {num(default.get('threshold', 0.5))}"
    cols = ("metric", "test", "95 % CI", f"test {at}", f"95 % CI {at}", "validation")

    def ci(d: dict[str, Any], k: str) -> str:
        lo, hi = d.get(f"{k}_ci_low"), d.get(f"{k}_ci_high")
        return "" if lo is None or hi is None else f"{num(lo)}–{num(hi)}"

    def cell(d: dict[str, Any], k: str) -> str:
        return num(d[k]) if k in d else ""

    rows = []
    if "threshold" in doc:
        rows.append(
            dict(
                zip(
                    cols,
                    ("threshold", num(doc["threshold"]), "", num(default.get("threshold", 0.5)), "", "(chosen here)"),
                    strict=True,
                )
            )
        )
    keys = [k for k in TABLE if k in test] + [
        k for k in test if k not in TABLE and k not in _COUNTS and not k.endswith(("_ci_low", "_ci_high"))
    ]
    keys += [k for k in _COUNTS if k in test or k in default]
    for k in keys:
        rows.append(
            dict(
                zip(
                    cols,
                    (
                        k,
                        cell(test, k),
                        ci(test, k),
                        cell(default, k),
                        ci(default, k),
                        cell(val, _VAL[k]) if k in _VAL and _VAL[k] in val else "",
                    ),
                    strict=True,
                )
            )
        )
    for section, body in doc.items():  # e.g. multiclass: flattened, value in the test column
        if section in ("test", "test_default_threshold", "val", "threshold") or not isinstance(body, dict):
            continue
        for r in metric_rows(body, prefix=f"{section}."):
            lo, hi = r.get("ci_low"), r.get("ci_high")
            rows.append(
                dict(
                    zip(
                        cols,
                        (
                            r["metric"],
                            num(r["value"]),
                            "" if lo is None or hi is None else f"{num(lo)}–{num(hi)}",
                            "",
                            "",
                            "",
                        ),
                        strict=True,
                    )
                )
            )
    return rows


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows]
    return out


def _headline_metrics(metrics: dict[str, Any], gates: dict[str, Any] | None) -> list[str]:
    test = metrics.get("test") or {}
    md = [f"## Headline metrics (test set, n = {num(test.get('n'))}, 95 % CI)", ""]
    for key in SUMMARY:
        label = METRICS[key].label
        if key in test:
            md.append(f"- **{label}**: {with_ci(test[key], test.get(f'{key}_ci_low'), test.get(f'{key}_ci_high'))}")
    thr = metrics.get("threshold", (gates or {}).get("threshold"))
    if thr is not None:
        rule = (gates or {}).get("threshold_rule")
        how = (
            f" ({rule.replace('_', ' ')}, chosen on {(gates or {}).get('threshold_source', 'validation')})"
            if rule
            else ""
        )
        md.append(f"- **threshold**: {num(thr)}{how}")
    if gates:
        md.append(f"- **gates**: {'passed' if gates.get('passed') else (gate_failure(gates) or 'FAILED')}")
        md.append(f"- **non-inferiority**: {non_inferiority(gates)}")
    return md + [""]


def _dataset(dataset: dict[str, Any]) -> list[str]:
    md = []
    raw = dataset.get("raw_data") or {}
    if raw:
        md += [f"- **raw data** `{raw.get('path')}`: DVC md5 `{raw.get('md5')}`, {num(raw.get('nfiles'))} files"]
    if dataset.get("changes"):
        from medclf.imaging.changes import describe

        md += [f"- **since the previous ingest**: {describe(dataset['changes'])}"]
    md += [f"- **processed data** `{dataset.get('path', 'ingest')}`: DVC md5 `{dataset.get('dvc_md5', 'n/a')}`"]
    if "images" in dataset:
        patients = f" from {num(dataset['patients'])} patients" if "patients" in dataset else ""
        quarantined = f"; {num(dataset['quarantined'])} quarantined" if "quarantined" in dataset else ""
        md.append(f"- **images**: {num(dataset['images'])}{patients}{quarantined}")
    splits = dataset.get("splits")
    if isinstance(splits, dict):
        order = sorted(
            splits, key=lambda k: ("train", "val", "test", k).index(k) if k in ("train", "val", "test") else 3
        )
        md.append("- **splits**: " + " · ".join(f"{k} {num(splits[k])}" for k in order))
    classes = dataset.get("classes")
    if isinstance(classes, (list, tuple)):
        md.append("- **classes**: " + ", ".join(str(c) for c in classes))
    return md


def render_summary(
    *,
    outcomes: list[dict[str, Any]],
    dataset: dict[str, Any],
    gates: dict[str, Any] | None,
    register: dict[str, Any] | None,
    links: dict[str, str],
    push: dict[str, Any] | None,
    wall_seconds: float,
    failure: str | None = None,
    planned: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    outcome: str | None = None,
) -> str:
    """The markdown run summary: one line of outcome, the headline metrics, the data, stages, gates, model.

    `outcome` is the run's one-line outcome (its state message); by default the headline of a
    finished run, or "FAILED" plus the stage for a failed one. `metrics` (`reports/metrics.json`)
    is given only when it belongs to this run's model.
    """
    if outcome is None:
        outcome = (
            f"FAILED at stage '{failure.split(chr(39))[1]}'"
            if failure and "'" in failure
            else "FAILED"
            if failure
            else headline(outcomes, register)
        )
    md = [f"# {outcome}", ""]
    if failure:
        md += ["```", failure.strip(), "```", ""]
    if metrics and metrics.get("test"):
        md += _headline_metrics(metrics, gates)
    md += ["## Dataset", ""]
    md += _dataset(dataset) if dataset else ["- not ingested yet"]
    md += ["", "## Stages", ""]
    rows = [dict(o, seconds=f"{o.get('seconds', 0):.1f}") for o in outcomes]
    done = {o["stage"] for o in outcomes}
    rows += [
        {"stage": s, "status": "not reached", "reason": "", "seconds": "", "attempt": ""}
        for s in (planned or [])
        if s not in done
    ]
    md += _table(rows, ["stage", "status", "reason", "seconds", "attempt"])
    md += ["", f"Wall time: {wall_seconds:.1f} s."]
    if push is not None:
        md.append(
            f"DVC push: {push.get('pushed', 0)} file(s) to remote `{push.get('remote')}`."
            if push.get("remote")
            else "DVC push: no remote configured; outputs stay local."
        )
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
        md.append(
            f"- **{register.get('model_name')}** version **{register['version']}**, alias "
            f"`{register.get('alias')}`{unchanged}: `{register.get('model_uri', '')}`"
        )
        if register.get("note"):
            md.append(f"- {register['note']}")
    else:
        md.append("- no model version registered by this run")
    for label, url in links.items():
        md.append(f"- [{label}]({url})")
    return "\n".join(md) + "\n"
