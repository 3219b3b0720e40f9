"""The tables of the review documents (version page and model card): subgroup and per-class rows, numbers
rounded for reading (the exact values stay in metrics.json)."""

from __future__ import annotations

from typing import Any

from medclf.config.vocabulary import SUBGROUP


def num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def subgroup_rows(subgroups: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The subgroup table (`metrics.json` "subgroups", see medclf.evaluation.subgroups): value (95 % CI) per
    category."""

    def cell(row: dict[str, Any], key: str) -> str:
        low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        return num(row.get(key)) + (f" ({num(low)}–{num(high)})" if low is not None and high is not None else "")

    every = [r for cats in subgroups.values() for r in cats.values()]
    if every and "positives" not in every[0]:  # a K-class task (`medclf.evaluation.task.subgroup_metrics`)
        keys = ["accuracy", "balanced_accuracy", "macro_auc"] + [k for k in ("qwk", "mae") if k in every[0]]
        heads = ["accuracy", "balanced accuracy", "macro ROC-AUC", "QWK", "MAE"][: len(keys)]
        rows = [f"| subgroup | category | n | {' | '.join(heads)} | note |", "|---" * (len(keys) + 4) + "|"]
        for name, cats in subgroups.items():
            for cat, r in cats.items():  # a small category: its point figures, no CI, and the note says so
                rows.append(
                    f"| {name} | {cat} | {r['n']} | {' | '.join(cell(r, k) for k in keys)} | {r.get('note', '')} |"
                )
        return rows
    rows = [
        "| subgroup | category | n | positives | ROC-AUC | sensitivity | specificity | F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cats in subgroups.items():
        for cat, r in cats.items():
            figures = [r["note"], "", "", ""] if "note" in r else [cell(r, k) for k in SUBGROUP]
            rows.append(f"| {name} | {cat} | {r['n']} | {r['positives']} | {' | '.join(figures)} |")
    return rows


def per_class_rows(metrics_doc: dict[str, Any]) -> list[str]:
    """A multi-class or ordinal task's per-class table: precision, recall with its 95 % CI, F1, AUC, support; then
    each critical-class flag's sensitivity and specificity (the flag's own validation-fitted threshold)."""
    test, classes = metrics_doc.get("test") or {}, metrics_doc.get("classes") or []

    def ci(key: str) -> str:
        low, high = test.get(f"{key}_ci_low"), test.get(f"{key}_ci_high")
        return num(test.get(key)) + (f" ({num(low)}–{num(high)})" if low is not None and high is not None else "")

    rows = ["| class | precision | recall (95 % CI) | F1 | ROC-AUC | support |", "|---|---|---|---|---|---|"]
    for c in classes:
        k = f"per_class.{c}."
        rows.append(
            f"| {c} | {num(test.get(k + 'precision'))} | {ci(k + 'recall')} | {num(test.get(k + 'f1'))} | "
            f"{num(test.get(k + 'auc'))} | {(metrics_doc.get('per_class') or {}).get(c, {}).get('support', '?')} |"
        )
    flags = [c for c in classes if f"critical.{c}.sensitivity" in test]
    if flags:
        rows += ["", "| critical-class flag | sensitivity (95 % CI) | specificity (95 % CI) |", "|---|---|---|"]
        rows += [f"| {c} | {ci(f'critical.{c}.sensitivity')} | {ci(f'critical.{c}.specificity')} |" for c in flags]
    return rows


PER_FINDING: tuple[tuple[str, str], ...] = (
    ("auc", "ROC-AUC"),
    ("ap", "AP"),
    ("recall", "sensitivity"),
    ("specificity", "specificity"),
    ("f1", "F1"),
)
"""The per-finding table's figures (`per_class.<finding>.<figure>` in a multi-label metrics.json) and headings."""


def _fit_words(fit: dict[str, Any]) -> str:
    """What one finding's threshold was fitted for (`medclf.evaluation.multilabel.fit_thresholds`)."""
    if fit.get("rule") == "f1":
        return "best F1"
    target = fit.get("target")
    return "sensitivity" + (f" {float(target):g}" if target is not None else "")


def finding_thresholds(metrics_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A multi-label task's fitted thresholds, `decision.thresholds` of metrics.json (or of gates.json): finding ->
    {threshold, rule, target, val_sensitivity, ...}; a bare number is taken as the threshold."""
    fits = (metrics_doc.get("decision") or {}).get("thresholds") or {}
    return {str(c): dict(f) if isinstance(f, dict) else {"threshold": f} for c, f in fits.items()}


def threshold_words(fits: dict[str, dict[str, Any]]) -> str:
    """Every finding's threshold, grouped by what it was fitted for, in one line: "for sensitivity 0.8: `amd` ≥
    0.1178, `glaucoma` ≥ 0.0512; for best F1: `other` ≥ 0.2468" (findings in label order within a group)."""
    groups: dict[str, list[str]] = {}
    for c, f in fits.items():
        groups.setdefault(_fit_words(f), []).append(f"`{c}` ≥ {num(f.get('threshold'), 4)}")
    return "; ".join(f"for {why}: {', '.join(each)}" for why, each in groups.items())


def per_label_rows(metrics_doc: dict[str, Any]) -> list[str]:
    """A multi-label task's per-finding table: each finding's threshold, positives (prevalence) on the test split,
    then ROC-AUC, average precision, sensitivity, specificity and F1 with their 95 % CIs, the thresholded ones at that
    finding's own validation-fitted threshold."""
    test, labels = metrics_doc.get("test") or {}, metrics_doc.get("classes") or []
    per, fits = metrics_doc.get("per_class") or {}, finding_thresholds(metrics_doc)

    def ci(key: str) -> str:
        low, high = test.get(f"{key}_ci_low"), test.get(f"{key}_ci_high")
        return num(test.get(key)) + (f" ({num(low)}–{num(high)})" if low is not None and high is not None else "")

    heads = " | ".join(f"{h} (95 % CI)" for _, h in PER_FINDING)
    rows = [f"| finding | threshold | positives (prevalence) | {heads} |", "|---" * (len(PER_FINDING) + 3) + "|"]
    for c in labels:
        k, row = f"per_class.{c}.", per.get(c) or {}
        support, prevalence = row.get("support", test.get(k + "support")), row.get("prevalence")
        positives = f"{support if support is not None else '?'}" + (
            f" ({num(prevalence)})" if prevalence is not None else ""
        )
        threshold = num((fits.get(c) or {}).get("threshold"), 4)
        rows.append(f"| {c} | {threshold} | {positives} | {' | '.join(ci(k + m) for m, _ in PER_FINDING)} |")
    return rows


def threshold_rows(metrics_doc: dict[str, Any]) -> list[str]:
    """How each finding's threshold was fitted on the validation split: the rule, and what it gave there."""
    rows = [
        "| finding | threshold | fitted for | val sensitivity | val specificity | val F1 | val positives |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, f in finding_thresholds(metrics_doc).items():
        rows.append(
            f"| {c} | {num(f.get('threshold'), 4)} | {_fit_words(f)} | {num(f.get('val_sensitivity'))} | "
            f"{num(f.get('val_specificity'))} | {num(f.get('val_f1'))} | "
            f"{'?' if f.get('n_positive') is None else int(f['n_positive'])} |"
        )
    return rows
