"""The reviewer's documents of a model version: the MLflow version description and the model card.

Pure markdown builders over the evaluate reports (`gates.json`, `metrics.json`), the validation summary
and the provenance tags; `medclf register` attaches them to the version it creates. Rounded for reading;
the exact values stay in the run's `evaluate/` artifacts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from medclf.config.vocabulary import DESCRIBED, KCLASS_LABELS, METRICS, MULTILABEL_HEADLINE, PER_LABEL
from medclf.evaluation import multilabel
from medclf.infra import catalog
from medclf.release.tables import (
    finding_thresholds,
    num,
    per_class_rows,
    per_label_rows,
    subgroup_rows,
    threshold_rows,
    threshold_words,
)

RECIPE_KEYS = (
    "backbone",
    "weights",
    "input_size",
    "width",
    "dropout",
    "batch_size",
    "head_epochs",
    "finetune_epochs",
    "unfreeze_top",
    "head_lr",
    "finetune_lr",
    "optimizer",
    "weight_decay",
    "warmup_epochs",
    "lr_schedule",
    "loss",
    "class_weights",
    "early_stopping_patience",
    "calibration",
    "seed",
)
"""The `train` values a model card quotes as the training recipe (those that change what is learned)."""

MULTILABEL_LABELS: dict[str, str] = {
    **{k: KCLASS_LABELS[k] for k in ("micro_auc", "map", "micro_f1", "hamming_loss", "subset_accuracy")},
    "macro_auc": "macro ROC-AUC (mean over findings)",
    "macro_f1": "macro F1 (mean over findings)",
    "ece": "calibration error (mean per-finding ECE)",
}
"""How people read a multi-label summary metric (`medclf.evaluation.multilabel.multilabel_report`)."""
MULTILABEL_DESCRIBED: tuple[str, ...] = tuple(m for m in multilabel.SUMMARY if m != "label_cardinality")
"""The multi-label summary metrics the model card and version description quote with their CIs."""
MULTILABEL_SHORT: dict[str, str] = {
    "macro_auc": "macro ROC-AUC",
    "map": "mAP",
    "macro_f1": "macro F1",
    "hamming_loss": "Hamming loss",
    "micro_auc": "micro ROC-AUC",
    "micro_f1": "micro F1",
    "subset_accuracy": "subset accuracy",
    "ece": "mean ECE",
}
"""The first screen's names of a multi-label task's summary metrics: the headline first, then the others (short, so
that every summary figure with its CI stays on the first screen, which the registry's limit never cuts)."""


def run_links(
    tracking_uri: str,
    experiment_id: str | None,
    run_id: str,
    figures: Iterable[str] | None = None,
    ui_url: str | None = None,
    model: str | None = None,
    champion: str | None = None,
) -> dict[str, str]:
    """MLflow UI links for the version page. `figures`: the names evaluate drew (`reports/evaluate/*.png` stems):
    only those are linked (a run with no champion has no comparison, a K-class gallery of more than 3 classes is
    one file per class); None links the usual two. `model`, `champion`: the registered model and the version
    evaluate compared with, linked when both are given.

    The links are relative hash routes (`#/experiments/...`) unless `ui_url` (`mlflow.ui_url`) names the UI's
    public address: the browser resolves them against the page the reviewer is on, whatever host, port or
    `--static-prefix` they reached it by (the tracking URI is the address *this* process used, often loopback).
    Empty when there is no UI to link to (no `ui_url`, and a tracking URI that is not an HTTP server)."""
    if not experiment_id or not (ui_url or tracking_uri.startswith(("http://", "https://"))):
        return {}
    base = f"{ui_url.rstrip('/')}/" if ui_url else ""
    run = f"{base}#/experiments/{experiment_id}/runs/{run_id}"
    drawn = ["gradcam", "champion_comparison"] if figures is None else sorted(figures)
    shown = {"gradcam": "Grad-CAM gallery", "champion_comparison": "challenger vs champion"}
    gallery = {
        (
            shown.get(f) or f"Grad-CAM gallery, {f.split('_', 2)[-1]}"
        ): f"{run}/artifacts/{catalog.FIGURE.rel.format(name=f)}"
        for f in drawn
        if f in shown or f.startswith("gradcam_")
    }
    champ = (
        {f"champion v{champion}": f"{base}#/models/{quote(model, safe='')}/versions/{champion}"}
        if model and champion
        else {}
    )
    return {
        "training run": run,
        "model card": f"{run}/artifacts/{catalog.RUN_CARD}",
        "model card (JSON)": f"{run}/artifacts/{catalog.RUN_CARD_JSON}",
        **gallery,
        "metrics with 95 % CIs": f"{run}/artifacts/{catalog.RUN_CI_TABLE}",
        **champ,
        # MLflow 3.17's UI starts on its GenAI view unless told (a per-browser switch)
        "all training runs": f"{base}#/experiments/{experiment_id}?workflowType=machine_learning",
    }


LIMITATIONS = (
    (
        "Figures come from an internal, patient-level split of the same source; on an external set from another "
        "site or time they are typically lower (see docs/PERFORMANCE.md for the measured gap)."
    ),
    (
        "Trained and tested only on the population and devices of the training data (for the embedded demo: "
        "pediatric chest X-rays of one hospital); any other use needs its own validation."
    ),
    "Research use only: not a medical device, not for diagnosis without regulatory clearance.",
)
"""The limitations every version states; `limitations` adds the one about calibration, which depends on the model."""

PROMOTION_CHECKLIST: tuple[tuple[str, str, bool], ...] = (
    (
        "gates",
        "every release gate passed on this test set (tag `gates` = `passed`; the page lists each gate and its bound)",
        True,
    ),
    (
        "data",
        "the data is still current: the raw-data md5 this version was trained on (tag `raw_data_md5`) is the one "
        "in the current `dvc.lock`",
        True,
    ),
    (
        "blocked",
        "not blocked: no `medclf.blocked` tag on this version, and not a rollback past a version blocked as a floor",
        True,
    ),
    (
        "Grad-CAM",
        "the Grad-CAM gallery looks at the anatomy, not at markers, text, borders or devices",
        False,
    ),
    (
        "CIs",
        "the 95 % CIs are acceptable, the lower bound of sensitivity above all, not only the point values",
        False,
    ),
    (
        "subgroups",
        "no subgroup category is clearly worse than the headline (when `ingest.subgroups` declares any)",
        False,
    ),
)
"""docs/PROMOTION.md, "Before you promote": (item, what to check, automatic). The automatic items carry the names of
`medclf.release.promotion.check`'s items: `medclf promote` and the promotion service verify them when `champion`
moves; the others are the reviewer's judgement. Rendered unticked on every version page (`checklist_rows`)."""

PROMOTE_BUTTON = (
    "**To promote**, move the alias `champion` to this version: *Aliases* → *Add* (or the pencil) → `champion` → "
    "*Save aliases*, or `medclf promote --version N` with this version's number. The blue *Promote model* button "
    "does not do it: it copies this version into another registered model and leaves `champion` where it is."
)
"""What the version page says about MLflow's "Promote model" button (docs/PROMOTION.md, step 3)."""


def checklist_rows() -> list[str]:
    """`PROMOTION_CHECKLIST` as unticked boxes (☐: MLflow's markdown sanitizer drops a task list's checkbox)."""
    return [
        f"- ☐ **{item}**{' (checked automatically)' if auto else ''}: {text}"
        for item, text, auto in PROMOTION_CHECKLIST
    ]


def _applied_temperature(cal: dict[str, Any] | None) -> float | None:
    """The temperature folded into the model, or None when none changed its scores (none fitted, or T = 1)."""
    t = (cal or {}).get("temperature")
    return float(t) if t is not None and abs(float(t) - 1.0) > 1e-9 else None


def _finding_temperatures(fitted: dict[str, Any] | None) -> dict[str, float] | None:
    """A multi-label model's per-finding temperatures folded into it (train's `temperature_per_finding` record), or
    None when none changed its scores (none fitted, or T = 1 for every finding)."""
    fitted = fitted or {}
    temps = fitted.get("temperatures") if fitted.get("method") == "temperature_per_finding" else None
    if not isinstance(temps, dict) or all(abs(float(t) - 1.0) <= 1e-9 for t in temps.values()):
        return None
    return {str(c): float(t) for c, t in temps.items()}


def _temperature_words(temps: dict[str, float]) -> str:
    return ", ".join(f"{c} {num(t, 2)}" for c, t in temps.items())


def _no_calibration(fitted: dict[str, Any] | None) -> str:
    """Why a model's scores are uncalibrated, from train's record (`train_run.json` "calibration")."""
    fitted = fitted or {}
    if fitted.get("method") == "temperature_per_finding":
        return (
            "per-finding temperature scaling was fitted on the validation split but T = 1 for every finding (no "
            "better fit), so nothing changed"
        )
    if fitted.get("method") == "temperature":
        return "temperature scaling was fitted on the validation split but T = 1 (no better fit), so nothing changed"
    if fitted.get("note"):
        return f"no calibration was applied ({fitted['note']})"
    return "no calibration was applied"


def calibration_limitation(cal: dict[str, Any] | None, fitted: dict[str, Any] | None = None) -> str:
    """What calibration does and does not give this model. `cal`: metrics.json "calibration" (the temperature and the
    test ECE/Brier before and after); `fitted`: train's record of the fit."""
    t, temps = _applied_temperature(cal), _finding_temperatures(fitted)
    if temps is not None:
        return (
            f"Calibrated by per-finding temperature scaling (T {num(min(temps.values()), 2)}–"
            f"{num(max(temps.values()), 2)} over {len(temps)} findings) on the internal validation split only: on "
            "this population each finding's score tracks its observed frequency (test ECE above), at another site, "
            "device or prevalence it may not. Check calibration there before reading a score as a risk; the "
            "per-finding thresholds were fitted on the calibrated scores."
        )
    if t is None:
        return (
            f"Not calibrated: {_no_calibration(fitted)}. The score ranks cases but is not a calibrated risk: read it "
            "against the threshold, not as a probability of disease."
        )
    return (
        f"Calibrated by temperature scaling (T = {num(t)}) on the internal validation split only: on this "
        "population the score tracks the observed frequency (test ECE above), at another site, device or prevalence "
        "it may not. Check calibration there before reading the score as a risk; it does not change the ranking or "
        "the decisions at the threshold."
    )


def limitations(cal: dict[str, Any] | None = None, fitted: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The version's limitations: `LIMITATIONS` with the calibration one for this model second."""
    return (LIMITATIONS[0], calibration_limitation(cal, fitted), *LIMITATIONS[1:])


def intended_use(meta: dict[str, Any], gates: dict[str, Any]) -> str:
    """What the model does, in the card's words: flag one class (binary), or sort into the classes or grades."""
    kind = gates.get("task", "binary")
    if kind == "binary":
        return f"flag images as `{meta['positive_class']}`"
    if kind == "multilabel":
        findings = ", ".join(f"`{c}`" for c in meta["classes"])
        return (
            f"call each of the findings {findings} present or absent in an image (any number at once), each at its "
            "own threshold fitted on the validation split,"
        )
    what = "grade" if kind == "ordinal" else "sort"
    return f"{what} images into {', '.join(f'`{c}`' for c in meta['classes'])} ({gates.get('threshold_rule')})"


def _ci(test: dict[str, Any], key: str) -> str:
    low, high = test.get(f"{key}_ci_low"), test.get(f"{key}_ci_high")
    return f"{num(low)}–{num(high)}" if low is not None and high is not None else ""


def decision_facts(
    gates: dict[str, Any],
    metrics_doc: dict[str, Any],
    provenance: dict[str, str],
    run_id: str,
    fitted: dict[str, Any] | None = None,
) -> list[str]:
    """The version page's first screen: the facts the promotion decision rests on, one line each (the verdict of the
    gates, the headline test metrics with their CIs, the operating point or decision rule, calibration, the data
    version and commit, what promoting means). The long tables follow below it."""
    test = metrics_doc.get("test") or {}
    kind = metrics_doc.get("task") or gates.get("task") or "binary"
    kclass, multilabel = kind in ("multiclass", "ordinal"), kind == "multilabel"
    floors = gates.get("gates", [])
    failed = [g for g in floors if not g.get("passed")]
    ni = gates.get("non_inferiority") or {}
    champ = gates.get("champion") or {}
    cv = f"champion v{champ['version']}" if champ.get("version") else "champion"
    if ni.get("entries") and not ni.get("skipped"):
        ni_word = f"non-inferiority vs {cv} {'passed' if all(e.get('passed') for e in ni['entries']) else 'FAILED'}"
    else:
        ni_word = f"non-inferiority not checked: {champ.get('note') or 'no champion'}"
    verdict = "FAILED" if failed or "FAILED" in ni_word else "passed"
    gate_line = f"- **Gates: {verdict}** ({len(floors) - len(failed)} of {len(floors)} floors; {ni_word})"
    if multilabel:
        keys = [k for k in dict.fromkeys([*MULTILABEL_HEADLINE, *MULTILABEL_SHORT]) if k in test]
        label = dict(MULTILABEL_SHORT)
    elif kclass:
        keys = [k for k in ("balanced_accuracy", "macro_auc", "macro_f1", "accuracy", "qwk", "mae") if k in test]
        label = {k: KCLASS_LABELS.get(k, k) for k in keys}
    else:
        keys = [k for k in ("roc_auc", "recall", "specificity", "f1") if k in test]
        label = {k: METRICS[k].label for k in keys}
    figures = [
        f"{label[k]} **{num(test[k])}**" + (f" ({_ci(test, k)})" if _ci(test, k) else "")
        for k in keys
        if test.get(k) is not None
    ]
    metric_line = f"- **Test split** (n={test.get('n', '?')}, 95 % CI): " + (" · ".join(figures) or "no figures")
    fits = finding_thresholds(metrics_doc) or finding_thresholds(gates)
    if multilabel:
        op_line = (
            "- **Decision rule (multilabel):** each finding is present when its own probability reaches its own "
            "threshold, fitted on the validation split: "
            + (threshold_words(fits) if fits else str(gates.get("threshold_rule")))
        )
    elif kclass:
        op_line = f"- **Decision rule ({kind}):** {gates.get('threshold_rule')}, fitted on the validation split"
    else:
        op_line = (
            f"- **Operating point:** threshold {float(gates['threshold']):.4f} on "
            f"p({provenance.get('positive_class', 'positive')}), chosen on the validation split "
            f"({gates.get('threshold_rule')})"
        )
    cal = metrics_doc.get("calibration") or {}
    t, temps = _applied_temperature(cal), _finding_temperatures(fitted)
    if temps is not None:
        cal_line = (
            f"- **Calibration:** per-finding temperature scaling, T {num(min(temps.values()), 2)}–"
            f"{num(max(temps.values()), 2)} over {len(temps)} findings, fitted on the validation split; test mean "
            f"per-finding ECE {num(test.get('ece'))}"
        )
    elif t is not None:
        cal_line = (
            f"- **Calibration:** temperature scaling, T = {num(t)} fitted on the validation split; test ECE "
            f"{num(cal.get('ece_before'))} → {num(cal.get('ece_after'))}"
        )
    else:
        cal_line = f"- **Calibration:** {_no_calibration(fitted)}; the score is not a calibrated risk"
    raw, commit = provenance.get("raw_data_md5"), provenance.get("git_commit")
    data_line = (
        f"- **Data and code:** raw data md5 `{raw[:8] if raw else 'unknown'}`"
        + (f" ({provenance['raw_data_nfiles']} files)" if raw and provenance.get("raw_data_nfiles") else "")
        + f" · git commit `{commit[:8] if commit else 'unknown'}` · training run `{run_id}`"
    )
    ext_lines = [_external_fact(r) for r in metrics_doc.get("external") or []]
    return [gate_line, metric_line, op_line, *ext_lines, cal_line, data_line, "", PROMOTE_BUTTON]


def _external_fact(r: dict[str, Any]) -> str:
    """The first screen's line for one external set (`medclf.evaluation.external`): headline with CI and gap."""
    key = "roc_auc" if "roc_auc" in r["gap"] else next(iter(r["gap"]), None)
    if key is None:
        return f"- **External set {r['name']}** (n={r['n']}): no figure defined"
    t = r["test"][key]
    label = KCLASS_LABELS.get(key) or (METRICS[key].label if key in METRICS else key)
    return (
        f"- **External set {r['name']}** (n={r['n']}): {label} "
        f"**{num(t['value'])}** ({num(t['ci_low'])}–{num(t['ci_high'])}), internal {num(r['internal'].get(key))}: "
        f"gap {r['gap'][key]:+.3f}" + ("" if r["passed"] else " · **external gate FAILED**")
    )


def robustness_lines(metrics_doc: dict[str, Any]) -> list[str]:
    """The version page's robustness paragraph (`medclf.evaluation.robustness`; the table is the run's
    `evaluate/robustness.json` and `robustness.png`)."""
    rob = metrics_doc.get("robustness")
    if not rob:
        return []
    parts = []
    for metric, w in (rob.get("worst") or {}).items():
        if w and w.get("delta") is not None:
            parts.append(
                f"{metric} {num(w.get('value'))} ({w['delta']:+.3f}) under {w['name']} (severity {w['severity']})"
            )
    gate = rob.get("gate") or {}
    verdict = (
        "no gate (evaluate.robustness.max_drop)"
        if gate.get("skipped")
        else f"gate {'passed' if gate.get('passed') else '**FAILED**'}: worst drop {num(gate.get('drop'))}, "
        f"bound {gate.get('bound')}"
    )
    return [
        "**Robustness** (the test split under controlled acquisition shifts, the proxy for another site; every shift "
        "in the run's `evaluate/robustness.json` and `robustness.png`): worst " + "; ".join(parts) + f". {verdict}.",
        "",
    ]


def external_lines(metrics_doc: dict[str, Any]) -> list[str]:
    """The version page's external validation table (internal, external with CI, gap, champion on the same images)."""
    from medclf.evaluation.external import markdown

    reports = metrics_doc.get("external") or []
    if not reports:
        return []
    return [
        "**External validation** (`evaluate.external`; scored at the registered decision, never fitted on; the gap "
        "is internal minus external):",
        "",
        *markdown(reports),
        "",
    ]


DESCRIPTION_LIMIT = 5000
"""MLflow's model-version description column: VARCHAR(5000) on PostgreSQL, which refuses longer text (SQLite does
not check, so the limit went unseen until a PostgreSQL run refused a 5,900-character page)."""
_CUT_NOTE = (
    "\n\n*Cut to the registry's 5,000-character limit: the whole page is the training run's model card "
    "(`review/model_card.md`).*"
)


def fit_description(text: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """`text` within `limit` characters: the first screen (up to the `---` rule) is kept whole, the detail after it
    loses its last paragraphs until the page fits, and a note says where the rest is (the model card)."""
    if len(text) <= limit:
        return text
    head, sep, detail = text.partition("\n---\n")
    budget = limit - len(_CUT_NOTE)
    if len(head) + len(sep) > budget:  # the first screen alone is too long: cut it by whole lines
        kept: list[str] = []
        for line in head.split("\n"):
            if sum(len(x) + 1 for x in kept) + len(line) > budget:
                break
            kept.append(line)
        return "\n".join(kept) + _CUT_NOTE
    out = head + sep
    for para in detail.split("\n\n"):
        piece = para if out.endswith(sep) else "\n\n" + para
        if len(out) + len(piece) > budget:
            break
        out += piece
    return out + _CUT_NOTE


def _calibration_paragraph(
    test: dict[str, Any], cal: dict[str, Any], fitted: dict[str, Any] | None, multilabel: bool
) -> str:
    """The version page's calibration paragraph: the test ECE (and Brier), and the temperature(s) fitted on
    validation and folded into the model, or why none was; "" when there is nothing to say."""
    fit, t, temps = fitted or {}, _applied_temperature(cal), _finding_temperatures(fitted)
    on_val = (
        f"validation {'mean ' if multilabel else ''}ECE {num(fit['val_before'].get('ece'))} → "
        f"{num(fit['val_after'].get('ece'))}"
        if isinstance(fit.get("val_before"), dict) and isinstance(fit.get("val_after"), dict)
        else ""
    )
    if multilabel:
        head = f"**Calibration:** mean per-finding ECE {num(test.get('ece'))} on the test split; "
        if temps is None:
            return head + f"{_no_calibration(fitted)}, so a score ranks cases but is not a calibrated risk."
        return (
            head + f"per-finding temperature scaling fitted on the validation split (T: {_temperature_words(temps)}"
            f"{'; ' + on_val if on_val else ''}) and folded into the model. Calibrated on the internal validation "
            "split only: another site or population needs its own check."
        )
    if test.get("ece") is None and t is None:
        return ""
    head = f"**Calibration:** ECE {num(test.get('ece'))}, Brier {num(test.get('brier'))} on the test split; "
    if t is None:
        return head + f"{_no_calibration(fitted)}, so the score ranks cases but is not a calibrated risk."
    n = fit.get("n", "?")
    return head + (
        f"temperature scaling, T = {num(t)} fitted on the validation split"
        + (f" ({on_val}, n={n})" if on_val else "")
        + " and folded into the model: "
        f"test ECE {num(cal.get('ece_before'))} → {num(cal.get('ece_after'))}, Brier "
        f"{num(cal.get('brier_before'))} → {num(cal.get('brier_after'))} (before → after). Calibrated on the "
        "internal validation split only: another site or population needs its own check."
    )


def version_description(
    gates: dict[str, Any],
    metrics_doc: dict[str, Any],
    provenance: dict[str, str],
    run_id: str,
    validation: dict[str, Any] | None = None,
    links: dict[str, str] | None = None,
    fitted: dict[str, Any] | None = None,
    limit: int | None = DESCRIPTION_LIMIT,
) -> str:
    """What a reviewer reads on the MLflow model version page before moving `champion`: markdown.

    First screen: the decision facts (`decision_facts`), the promotion checklist (`PROMOTION_CHECKLIST`) and the
    links to the evidence. Then the detail: headline metrics with their 95 % bootstrap intervals and the champion's
    values on the same test set, the paired difference with its CI, the operating point and where it was chosen,
    every gate with its bound, calibration, the data the model learned from with its validation warnings, and the
    limitations. `fitted`: train's calibration record (`train_run.json` "calibration"), which says why a model is
    uncalibrated. Rounded for reading; the exact values stay in the run's `evaluate/metrics.json`,
    `evaluate/gates.json` and `evaluate/metrics_ci.json`. Cut to `limit` characters by `fit_description` (the
    registry's limit); None keeps the whole page (the model card, which has no such limit).

    A multi-label version (issue 25) has the summary metrics (macro/micro ROC-AUC, mAP, macro/micro F1, Hamming
    loss, subset accuracy, mean per-finding ECE), the per-finding table and each finding's threshold with how it
    was fitted on validation in place of the operating point.
    """
    from medclf.evaluation.comparison import comparison_rows

    test = metrics_doc.get("test") or {}
    ni = {e.get("metric"): e for e in (gates.get("non_inferiority") or {}).get("entries", [])}
    champ = gates.get("champion") or {}
    cv = f"champion v{champ['version']}" if champ.get("version") else "champion"
    kclass, multilabel = metrics_doc.get("task") in ("multiclass", "ordinal"), metrics_doc.get("task") == "multilabel"
    if multilabel:
        described, names = list(MULTILABEL_DESCRIBED), MULTILABEL_LABELS
    elif kclass:
        described, names = [k for k in KCLASS_LABELS if k in test], KCLASS_LABELS
    else:
        described, names = list(DESCRIBED), {k: m.label for k, m in METRICS.items()}
    cells = []  # (label, value, CI, champion's value): a column none of the rows fills is left out
    for key in described:
        if test.get(key) is None:
            continue
        champ_value = ni[key]["champion"] if key in ni else (gates.get("comparison") or {}).get(key, {}).get("champion")
        cells.append(
            (
                names[key],
                f"**{num(test[key])}**",
                _ci(test, key),
                "" if champ_value is None else num(champ_value),
            )
        )
    heads = [f"metric (test split, n={test.get('n', '?')})", "value", "95 % CI", cv]
    keep = [0, 1] + [i for i in (2, 3) if any(c[i] for c in cells)]
    rows = [
        "| " + " | ".join(heads[i] for i in keep) + " |",
        "|---" * len(keep) + "|",
        *("| " + " | ".join(c[i] for i in keep) + " |" for c in cells),
    ]
    gate_lines = [
        f"- {'pass' if g.get('passed') else 'FAIL'}: {g.get('metric')} {num(g.get('value'))} "
        f"{g.get('op', '>=')} {num(g.get('bound'))} ({g.get('name')})"
        for g in gates.get("gates", [])
    ]
    if ni:
        gate_lines += [
            f"- {'pass' if e.get('passed') else 'FAIL'}: non-inferiority vs {cv}, {m} "
            f"{num(e.get('value'))} >= {num(e.get('champion'))} - {num(e.get('margin'), 2)}"
            for m, e in ni.items()
        ]
    else:
        gate_lines.append(f"- non-inferiority: not checked ({champ.get('note') or 'no champion'})")
    compare = (
        [
            "",
            (
                f"**Challenger vs {cv}, both on these test images, each at its own threshold** "
                "(paired bootstrap; a CI that excludes 0 is a real difference):"
            ),
            "",
            *comparison_rows(gates["comparison"], cv),
        ]
        if gates.get("comparison")
        else []
    )
    raw = provenance.get("raw_data_md5")
    data = (
        f"raw data `{provenance.get('raw_data')}`: DVC md5 `{raw}` over {provenance.get('raw_data_nfiles')} "
        "files (tag `raw_data_md5`; full record in the run's `lineage/dvc.lock`)"
        if raw
        else "raw data hash unknown (ingest did not run under DVC)"
    )
    if provenance.get("dvc_md5"):
        data += f"; processed dataset (data/ingest) DVC md5 `{provenance['dvc_md5']}`"
    if validation is not None:
        warns = validation.get("warnings") or []
        offending = validation.get("offending") or {}
        data += f". Validation passed with {len(warns)} warning(s)" + (
            ": " + ", ".join(f"`{w}` ({offending.get(w, '?')})" for w in warns) if warns else ""
        )
    positive = provenance.get("positive_class", "positive")
    if multilabel:
        operating = (
            "**Decision rule (multilabel):** each finding is called present when its own probability reaches its "
            "own threshold, each fitted on the validation split for its rule (a target sensitivity, or the best "
            "F1); the test split was used once, for the figures above. The served `labels` joins the present "
            "findings; an image may have none.\n\n"
            + "\n".join(threshold_rows(metrics_doc if finding_thresholds(metrics_doc) else gates))
        )
    elif kclass:
        operating = (
            f"**Decision rule ({metrics_doc['task']}):** {gates.get('threshold_rule')}. Fitted on the validation "
            "split; the test split was used once, for the figures above."
        )
    else:
        operating = (
            f"**Operating point:** threshold {float(gates['threshold']):.4f} on p({positive}), chosen on the "
            f"validation split ({gates.get('threshold_rule')}); the test split was used once, for the figures "
            "above."
        )
    op_warning = (metrics_doc.get("operating_point") or {}).get("warning")  # medclf.evaluation.report
    if op_warning:
        operating += f"\n\n> **Warning, unstable operating point:** {op_warning}."
    if kclass:
        rows += ["", *per_class_rows(metrics_doc)]
    if multilabel:  # the per-finding table first: the first screen has the summary headline already
        rows = [
            f"**Per finding** (test split, n={test.get('n', '?')}; sensitivity, specificity and F1 at the finding's "
            "own threshold):",
            "",
            *per_label_rows(metrics_doc),
            "",
            *rows,
        ]
    cal = metrics_doc.get("calibration") or {}
    calib = _calibration_paragraph(test, cal, fitted, multilabel)
    groups = metrics_doc.get("subgroups") or {}
    subgroup = (
        [
            (
                "**Subgroups** (test split, at the registered threshold; 95 % bootstrap CIs; columns declared in "
                "`ingest.subgroups`):"
            ),
            "",
            *subgroup_rows(groups),
            "",
        ]
        if groups
        else []
    )
    evidence = ["", "**Evidence:** " + " · ".join(f"[{k}]({v})" for k, v in links.items())] if links else []
    page = "\n".join(
        [
            "**Research use only.** Not for diagnosis or any clinical decision without regulatory clearance.",
            "",
            *decision_facts(gates, metrics_doc, provenance, run_id, fitted),
            "",
            "**Before you promote** (docs/PROMOTION.md; tick each in your review):",
            "",
            *checklist_rows(),
            *evidence,
            "",
            "---",
            "",
            *rows,
            *compare,
            "",
            operating,
            "",
            "**Gates:**",
            *gate_lines,
            "",
            *([calib, ""] if calib else []),
            *subgroup,
            *external_lines(metrics_doc),
            *robustness_lines(metrics_doc),
            f"**Data:** {data}.",
            "",
            f"**Lineage:** training run `{run_id}`, git commit `{provenance.get('git_commit') or 'unknown'}`.",
            "",
            "**Limitations:**",
            *[f"- {x}" for x in limitations(cal, fitted)],
        ]
    )
    return page if limit is None else fit_description(page, limit)


def recipe(train: dict[str, Any], train_run: dict[str, Any]) -> dict[str, Any]:
    """The training recipe as it ran: params.yaml's `train` values, with a `train.tune` search's choice applied."""
    tune = train_run.get("tune") or {}
    out = {k: train[k] for k in RECIPE_KEYS if k in train} | dict(tune.get("params") or {})
    if out.get("input_size") == "auto" and train_run.get("input_size"):
        out["input_size"] = f"auto ({train_run['input_size']} px)"  # the size the backbone saw
    if tune:
        out["tuned"] = {
            "keys": sorted(tune.get("params") or {}),
            "study": tune.get("study"),
            "trials": tune.get("trials"),
            "best_trial_val_auc": tune.get("best_trial_val_auc"),
            "final_val_auc": tune.get("final_val_auc"),
        }
    return out


def _card_subject(meta: dict[str, Any], gates: dict[str, Any]) -> str:
    """What the model card's title says the model tells apart: `a vs b`, or a multi-label task's findings."""
    if gates.get("task") == "multilabel":
        return f"the findings {', '.join(meta['classes'])} (multi-label)"
    return " vs ".join(meta["classes"])


def model_card(
    description: str,
    meta: dict[str, Any],
    provenance: dict[str, str],
    train_run: dict[str, Any],
    splits: dict[str, int],
    train: dict[str, Any] | None = None,
    gates: dict[str, Any] | None = None,
) -> str:
    """A model card (after Mitchell et al. 2019) in markdown, logged with the run as `catalog.RUN_CARD`."""
    split_line = ", ".join(f"{k} {v}" for k, v in splits.items()) or "unknown"
    rec = recipe(train or {}, train_run)
    tuned = rec.pop("tuned", None)
    recipe_line = ", ".join(f"{k} `{v}`" for k, v in rec.items()) or "unknown"
    if tuned:
        recipe_line += (
            f". Tuned on validation by `train.tune` ({', '.join(tuned['keys'])}; study `{tuned['study']}`, "
            f"trials {tuned['trials']}): chosen trial val AUC {num(tuned['best_trial_val_auc'])}, final "
            f"fit {num(tuned['final_val_auc'])}"
        )
    return "\n".join(
        [
            f"# Model card: {train_run.get('backbone', 'classifier')} for {_card_subject(meta, gates or {})}",
            "",
            "## Intended use",
            f"Research and method development: {intended_use(meta, gates or {})} for a human reader to review.",
            "Not a medical device. Not for diagnosis or any clinical decision without regulatory clearance.",
            "",
            "## Model",
            (
                f"Backbone `{train_run.get('backbone')}` ({train_run.get('weights')} weights), input "
                f"{meta['image_size']} px, {meta['channels']} channel(s); trained by `medclf train` (params hash "
                f"`{provenance.get('params_hash')}`, git commit `{provenance.get('git_commit') or 'unknown'}`)."
            ),
            "",
            "## Training recipe",
            recipe_line + ".",
            "",
            "## Data",
            (
                f"Source `{provenance.get('raw_data') or 'unknown'}` "
                f"(DVC md5 `{provenance.get('raw_data_md5') or 'unknown'}`), "
                f"split by patient: {split_line} images."
            ),
            "",
            "## Evaluation, operating point, gates, limitations",
            "",
            description,
            "",
        ]
    )


def _value_ci(test: dict[str, Any], key: str) -> dict[str, Any]:
    return {"value": test.get(key), "ci95": [test.get(f"{key}_ci_low"), test.get(f"{key}_ci_high")]}


def model_card_json(
    meta: dict[str, Any],
    provenance: dict[str, str],
    train_run: dict[str, Any],
    splits: dict[str, int],
    train: dict[str, Any],
    gates: dict[str, Any],
    metrics_doc: dict[str, Any],
    validation: dict[str, Any] | None,
) -> dict[str, Any]:
    """The model card as data (`catalog.RUN_CARD_JSON`): the same facts as the markdown, unrounded, for tools.
    A multi-label task adds each finding's fitted threshold (`operating_point.thresholds`) and its test figures
    (`metrics.per_finding`)."""
    test = metrics_doc.get("test") or {}
    multilabel = gates.get("task") == "multilabel"
    described = MULTILABEL_DESCRIBED if multilabel else DESCRIBED
    fits = finding_thresholds(metrics_doc) or finding_thresholds(gates)
    per_finding = {
        c: {
            **{m: _value_ci(test, f"per_class.{c}.{m}") for m in PER_LABEL},
            **{k: (metrics_doc.get("per_class") or {}).get(c, {}).get(k) for k in ("support", "prevalence", "ece")},
        }
        for c in meta["classes"]
    }
    return {
        "schema": "medclf-model-card/1",
        "intended_use": {
            "use": f"{intended_use(meta, gates)} for a human reader to review",
            "task": gates.get("task", "binary"),
            "not_for_clinical_use": (
                "Research use only: not a medical device, not for diagnosis or any "
                "clinical decision without regulatory clearance."
            ),
        },
        "model": {
            "backbone": train_run.get("backbone"),
            "weights": train_run.get("weights"),
            "classes": meta["classes"],
            "positive_class": meta["positive_class"],
            "image_size": meta["image_size"],
            "channels": meta["channels"],
            "params_hash": provenance.get("params_hash"),
            "git_commit": provenance.get("git_commit"),
        },
        "training_recipe": recipe(train, train_run),
        "data": {
            "source": provenance.get("raw_data"),
            "raw_data_md5": provenance.get("raw_data_md5"),
            "raw_data_nfiles": provenance.get("raw_data_nfiles"),
            "dataset_dvc_md5": provenance.get("dvc_md5"),
            "split_by": "patient",
            "splits": splits,
            "validation_warnings": {
                w: (validation or {}).get("offending", {}).get(w) for w in (validation or {}).get("warnings") or []
            },
        },
        "operating_point": {
            "threshold": gates.get("threshold"),
            "rule": gates.get("threshold_rule"),
            "chosen_on": "validation",
            **({"thresholds": fits} if multilabel else {}),
        },
        "metrics": {
            "split": "test",
            "n": test.get("n"),
            **{k: _value_ci(test, k) for k in described if test.get(k) is not None},
            **({"per_finding": per_finding} if multilabel else {}),
        },
        "calibration": metrics_doc.get("calibration") or train_run.get("calibration"),
        "gates": [
            {k: g.get(k) for k in ("name", "metric", "value", "op", "bound", "passed")} for g in gates.get("gates", [])
        ],
        "subgroups": metrics_doc.get("subgroups") or {},
        "limitations": list(
            limitations(metrics_doc.get("calibration") or train_run.get("calibration"), train_run.get("calibration"))
        ),
    }
