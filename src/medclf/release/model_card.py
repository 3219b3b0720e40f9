"""The reviewer's documents of a model version: the MLflow version description and the model card.

Pure markdown builders over the evaluate reports (`gates.json`, `metrics.json`), the validation summary
and the provenance tags; `medclf register` attaches them to the version it creates. Rounded for reading;
the exact values stay in the run's `evaluate/` artifacts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from medclf.config.vocabulary import DESCRIBED, KCLASS_LABELS, METRICS
from medclf.infra import catalog
from medclf.release.tables import num, per_class_rows, subgroup_rows

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


def run_links(
    tracking_uri: str, experiment_id: str | None, run_id: str, figures: Iterable[str] | None = None
) -> dict[str, str]:
    """MLflow UI links for the version page (empty when the tracking URI is not an HTTP server). `figures`: the
    names evaluate drew (`reports/evaluate/*.png` stems): only those are linked (a run with no champion has no
    comparison, a K-class gallery of more than 3 classes is one file per class); None links the usual two."""
    if not tracking_uri.startswith(("http://", "https://")) or not experiment_id:
        return {}
    run = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    drawn = ["gradcam", "champion_comparison"] if figures is None else sorted(figures)
    shown = {"gradcam": "Grad-CAM gallery", "champion_comparison": "challenger vs champion"}
    gallery = {
        (
            shown.get(f) or f"Grad-CAM gallery, {f.split('_', 2)[-1]}"
        ): f"{run}/artifacts/{catalog.FIGURE.rel.format(name=f)}"
        for f in drawn
        if f in shown or f.startswith("gradcam_")
    }
    return {
        "training run": run,
        "model card": f"{run}/artifacts/{catalog.RUN_CARD}",
        "model card (JSON)": f"{run}/artifacts/{catalog.RUN_CARD_JSON}",
        **gallery,
        "metrics with 95 % CIs": f"{run}/artifacts/{catalog.RUN_CI_TABLE}",
        # MLflow 3.17's UI starts on its GenAI view unless told (a per-browser switch)
        "all training runs": f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning",
    }


LIMITATIONS = (
    (
        "Figures come from an internal, patient-level split of the same source; on an external set from another "
        "site or time they are typically lower (see docs/PERFORMANCE.md for the measured gap)."
    ),
    "The score is not a calibrated risk: read it against the threshold, not as a probability of disease.",
    (
        "Trained and tested only on the population and devices of the training data (for the embedded demo: "
        "pediatric chest X-rays of one hospital); any other use needs its own validation."
    ),
    "Research use only: not a medical device, not for diagnosis without regulatory clearance.",
)


def intended_use(meta: dict[str, Any], gates: dict[str, Any]) -> str:
    """What the model does, in the card's words: flag one class (binary), or sort into the classes or grades."""
    kind = gates.get("task", "binary")
    if kind == "binary":
        return f"flag images as `{meta['positive_class']}`"
    what = "grade" if kind == "ordinal" else "sort"
    return f"{what} images into {', '.join(f'`{c}`' for c in meta['classes'])} ({gates.get('threshold_rule')})"


def version_description(
    gates: dict[str, Any],
    metrics_doc: dict[str, Any],
    provenance: dict[str, str],
    run_id: str,
    validation: dict[str, Any] | None = None,
    links: dict[str, str] | None = None,
) -> str:
    """What a reviewer reads on the MLflow model version page before moving `champion`: markdown.

    Headline metrics with their 95 % bootstrap intervals and the champion's values on the same test
    set, the paired difference with its CI, the operating point and where it was chosen, every gate
    with its bound, calibration, the data the model learned from with its validation warnings, links
    to the evidence, and the limitations. Rounded for reading; the exact values stay in the run's
    `evaluate/metrics.json`, `evaluate/gates.json` and `evaluate/metrics_ci.json`.
    """
    from medclf.evaluation.comparison import comparison_rows

    test = metrics_doc.get("test") or {}
    ni = {e.get("metric"): e for e in (gates.get("non_inferiority") or {}).get("entries", [])}
    champ = gates.get("champion") or {}
    cv = f"champion v{champ['version']}" if champ.get("version") else "champion"
    kclass = metrics_doc.get("task") in ("multiclass", "ordinal")
    rows = [f"| metric (test split, n={test.get('n', '?')}) | value | 95 % CI | {cv} |", "|---|---|---|---|"]
    described = [k for k in KCLASS_LABELS if k in test] if kclass else list(DESCRIBED)
    for key in described:
        label = KCLASS_LABELS[key] if kclass else METRICS[key].label
        if test.get(key) is None:
            continue
        ci = (
            f"{num(test.get(f'{key}_ci_low'))}–{num(test.get(f'{key}_ci_high'))}"
            if test.get(f"{key}_ci_low") is not None
            else ""
        )
        champ_value = ni[key]["champion"] if key in ni else (gates.get("comparison") or {}).get(key, {}).get("champion")
        rows.append(f"| {label} | **{num(test[key])}** | {ci} | {'' if champ_value is None else num(champ_value)} |")
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
    operating = (
        f"**Decision rule ({metrics_doc['task']}):** {gates.get('threshold_rule')}. Fitted on the validation split; "
        "the test split was used once, for the figures above."
        if kclass
        else f"**Operating point:** threshold {float(gates['threshold']):.4f} on p({positive}), chosen on the "
        f"validation split ({gates.get('threshold_rule')}); the test split was used once, for the figures "
        "above."
    )
    if kclass:
        rows += ["", *per_class_rows(metrics_doc)]
    cal = metrics_doc.get("calibration") or {}
    calib = (
        f"**Calibration:** ECE {num(test.get('ece'))}, Brier {num(test.get('brier'))} on the test split; "
        + (
            f"temperature scaling, T = {num(cal['temperature'])} fitted on the validation split and stored in "
            f"the model: ECE {num(cal.get('ece_before'))} → {num(cal.get('ece_after'))}, Brier "
            f"{num(cal.get('brier_before'))} → {num(cal.get('brier_after'))} (before → after). Calibrated on "
            "this population; a shifted one needs its own check."
            if cal.get("temperature")
            else "no recalibration is applied, so the score ranks cases but is not a risk."
        )
        if test.get("ece") is not None
        else ""
    )
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
    link_line = ["", "**Evidence:** " + " · ".join(f"[{k}]({v})" for k, v in links.items())] if links else []
    return "\n".join(
        [
            "**Research use only.** Not for diagnosis or any clinical decision without regulatory clearance.",
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
            f"**Data:** {data}.",
            "",
            f"**Lineage:** training run `{run_id}`, git commit `{provenance.get('git_commit') or 'unknown'}`.",
            *link_line,
            "",
            "**Limitations:**",
            *[f"- {x}" for x in LIMITATIONS],
        ]
    )


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
            f"# Model card: {train_run.get('backbone', 'classifier')} for {' vs '.join(meta['classes'])}",
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
    """The model card as data (`catalog.RUN_CARD_JSON`): the same facts as the markdown, unrounded, for tools."""
    test = metrics_doc.get("test") or {}
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
        },
        "metrics": {
            "split": "test",
            "n": test.get("n"),
            **{
                k: {"value": test.get(k), "ci95": [test.get(f"{k}_ci_low"), test.get(f"{k}_ci_high")]}
                for k in DESCRIBED
                if test.get(k) is not None
            },
        },
        "calibration": metrics_doc.get("calibration") or train_run.get("calibration"),
        "gates": [
            {k: g.get(k) for k in ("name", "metric", "value", "op", "bound", "passed")} for g in gates.get("gates", [])
        ],
        "subgroups": metrics_doc.get("subgroups") or {},
        "limitations": list(LIMITATIONS),
    }
