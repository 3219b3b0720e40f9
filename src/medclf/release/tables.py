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
