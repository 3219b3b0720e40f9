"""The domain vocabularies params.yaml values are checked against: check names, modalities, backbone names,
metric names.

A leaf (imports nothing from medclf), so `medclf.config` stays one too. `medclf.validation.checks` and
`medclf.modeling.network` build on these tables; they are defined here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warn", "off"]

CHECKS: dict[str, tuple[Severity, str]] = {
    # The keys of `validate.severity`: name -> (default severity, what a failure means); see validation.checks.
    "schema": ("error", "manifest columns, status and split values follow the ingest contract"),
    "not_null": ("error", "every usable row has id, uri, sha256, label, split, row and original size"),
    "unknown_label": ("error", "every label is one of the configured classes"),
    "unique_id": ("error", "image ids are unique"),
    "array_consistency": ("error", "arrays agree with the manifest: rows per split, labels, image shape"),
    "image_size": ("error", "original height and width within [min_size, max_size]"),
    "aspect_ratio": ("warn", "original long side / short side at most validate.max_aspect_ratio"),
    "channels": ("error", "original channel count within 1..4"),
    "duplicate_within_split": ("warn", "identical files (sha256) inside one split"),
    "duplicate_cross_split": ("error", "identical files (sha256) in two splits: test leakage"),
    "label_conflict": ("error", "identical files (sha256) under two different labels, in any splits"),
    "near_duplicate_within_split": ("warn", "perceptually identical images inside one split"),
    "near_duplicate_cross_split": ("error", "perceptually identical images in two splits: test leakage"),
    "patient_overlap": ("error", "one patient in two splits: test leakage"),
    "patient_id_missing": ("warn", "rows without a patient id cannot be checked for patient leakage"),
    "blank": ("error", "blank image (pixel std below validate.blank_std_max)"),
    "low_contrast": ("warn", "low-contrast image (pixel std below validate.low_contrast_std_max)"),
    "saturated": ("warn", "too many pixels at the white or black extreme"),
    "inverted": ("warn", "bright border, or a centre darker than its border: looks inverted (MONOCHROME1?)"),
    "colour": ("error", "a colour picture in a greyscale modality (colourfulness above the bound of ingest.modality)"),
    "prevalence_bounds": ("error", "each class's share per split within validate.prevalence_bounds"),
    "prevalence_gap": ("error", "a class's share differs between splits by more than validate.max_prevalence_gap"),
    "split_fractions": ("warn", "split sizes within validate.split_fraction_bounds"),
    "drift_prevalence": ("warn", "class share moved more than validate.drift_prevalence_max since the baseline"),
    "drift_intensity": ("warn", "intensity distribution PSI above validate.drift_psi_max since the baseline"),
    "rare_finding": (
        "warn",
        "multi-label only: a finding with fewer than validate.min_finding_positives positive images in val or test: "
        "too rare to evaluate (its threshold and metrics rest on a handful of images)",
    ),
}


MODALITIES: dict[str, bool] = {
    # ingest.modality -> the images are greyscale by nature. For those, a colour picture (a photograph, a screenshot,
    # a dermoscopy image in a chest X-ray set) is the wrong kind of input: validate's `colour` check and the served
    # model refuse it (medclf.imaging.modality).
    # Grey stored as RGB (R = G = B) is grey. Colour modalities are not checked.
    "chest_xray": True,
    "xray": True,
    "mammography": True,
    "ultrasound": True,
    "ct": True,
    "mri": True,
    "dermoscopy": False,
    "fundus": False,
    "histology": False,
    "other": False,
}


Mode = Literal["tf", "torch", "caffe", "raw"]
"""How a backbone wants its input (keras.applications' `preprocess_input` modes):
tf: x/127.5 - 1; torch: x/255 then ImageNet mean/std; caffe: RGB->BGR then minus the BGR means;
raw: 0..255 floats (EfficientNet, EfficientNetV2 and MobileNetV3 normalise inside themselves)."""

BACKBONES: dict[str, tuple[str, Mode, str | None, bool, int]] = {
    # train.backbone -> (keras.applications constructor, input mode, torchvision arch whose checkpoint maps onto
    # it, takes a width multiplier `alpha`, smallest input side); `medclf.modeling.network.Backbone` names the fields.
    "vgg16": ("VGG16", "caffe", None, False, 32),
    "resnet50": ("ResNet50", "caffe", "resnet50", False, 32),
    "resnet50_v2": ("ResNet50V2", "tf", None, False, 32),
    "densenet121": ("DenseNet121", "torch", "densenet121", False, 32),
    "inception_v3": ("InceptionV3", "tf", None, False, 75),
    **{f"efficientnet_b{i}": (f"EfficientNetB{i}", "raw", None, False, 32) for i in range(8)},
    **{f"efficientnet_v2_b{i}": (f"EfficientNetV2B{i}", "raw", None, False, 32) for i in range(4)},
    "efficientnet_v2_s": ("EfficientNetV2S", "raw", None, False, 32),
    "mobilenet_v2": ("MobileNetV2", "tf", "mobilenet_v2", True, 32),
    "mobilenet_v3_small": ("MobileNetV3Small", "raw", None, True, 32),
    "mobilenet_v3_large": ("MobileNetV3Large", "raw", None, True, 32),
    "convnext_tiny": ("ConvNeXtTiny", "raw", None, False, 32),  # normalises inside (include_preprocessing)
}


@dataclass(frozen=True)
class Metric:
    """One test metric: its key in metrics.json, how people read it, the other names
    users write for it, and which way is better."""

    key: str
    label: str
    aliases: tuple[str, ...] = ()
    higher_is_better: bool = True
    digits: int = 3

    def fmt(self, value: float | None) -> str:
        """`value` to this metric's display precision; "n/a" for a missing or undefined value."""
        if value is None or not math.isfinite(float(value)):
            return "n/a"
        return f"{float(value):.{self.digits}f}"


METRICS: dict[str, Metric] = {
    # The one list of metric names (issue 23): metrics.json keys, gates, registry tags, the champion comparison,
    # the model card, the flow summary and `dvc metrics show` all read their names and labels from here.
    m.key: m
    for m in (
        Metric("accuracy", "accuracy"),
        Metric("balanced_accuracy", "balanced accuracy"),
        Metric("precision", "precision (PPV)", aliases=("ppv",)),
        Metric("recall", "sensitivity (recall)", aliases=("sensitivity", "tpr")),
        Metric("specificity", "specificity", aliases=("tnr",)),
        Metric("npv", "negative predictive value (NPV)", aliases=("negative_predictive_value",)),
        Metric("f1", "F1"),
        Metric("roc_auc", "ROC-AUC", aliases=("auc",)),
        Metric("pr_auc", "PR-AUC", aliases=("average_precision", "ap")),
        Metric("mcc", "MCC", aliases=("matthews_corrcoef",)),
        Metric("brier", "Brier score", higher_is_better=False),
        Metric("ece", "calibration error (ECE)", higher_is_better=False),
    )
}

_BY_NAME: dict[str, str] = {n: m.key for m in METRICS.values() for n in (m.key, *m.aliases)}


def metric(name: str) -> Metric:
    """The metric a key or alias names (`auc` is `roc_auc`, `sensitivity` is `recall`); ValueError listing the
    known names otherwise."""
    key = _BY_NAME.get(name.strip().lower())
    if key is None:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return METRICS[key]


HEADLINE: tuple[str, ...] = ("roc_auc", "f1", "recall", "specificity")
"""The test metrics of `reports/metrics.json` (`dvc metrics show`), and the full-precision `metric.*` version tags."""
GATES: dict[str, str] = {"min_f1": "f1", "min_recall": "recall", "min_auc": "roc_auc", "min_specificity": "specificity"}
"""`evaluate.gates` floor key -> the metric it bounds (None bound: not gated)."""
NON_INFERIORITY: tuple[str, ...] = ("f1", "recall")
"""Metrics the challenger must not lose to the champion by more than `evaluate.gates.non_inferiority_margin`."""
COMPARED: tuple[str, ...] = ("roc_auc", "recall", "specificity", "f1", "pr_auc")
"""Paired bootstrap deltas in the challenger-versus-champion report."""
DESCRIBED: tuple[str, ...] = ("roc_auc", "recall", "specificity", "precision", "f1", "balanced_accuracy", "ece")
"""The metrics the model card and version description quote with their CIs."""
SUMMARY: tuple[str, ...] = ("f1", "recall", "specificity", "roc_auc")
"""The flow summary's headline, in the order of the gates people read first."""
TABLE: tuple[str, ...] = (
    "f1",
    "recall",
    "specificity",
    "precision",
    "npv",
    "accuracy",
    "balanced_accuracy",
    "mcc",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)
"""Every binary test metric, in the flow summary's table order (the gated ones first)."""
SUBGROUP: tuple[str, ...] = ("roc_auc", "sensitivity", "specificity", "f1")
"""The subgroup table's columns as metrics.json names them ("sensitivity" is the alias of `recall`)."""


# --------------------------------------------------------------------------- task families (issue 24)
KCLASS_SUMMARY: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "mcc")
"""Multi-class and ordinal summary metrics that are floors (higher is better): gateable by name."""
KCLASS_HEADLINE: tuple[str, ...] = ("balanced_accuracy", "macro_auc", "macro_f1", "accuracy")
"""What `dvc metrics show` and the version tags carry for a multi-class task (ordinal adds `qwk` and `mae`)."""
PER_CLASS: tuple[str, ...] = ("precision", "recall", "f1", "auc", "specificity")
"""Per-class metrics (`per_class.<class>.<metric>` in metrics.json; gated as `recall[mel]`)."""
ORDINAL_SUMMARY: tuple[str, ...] = ("qwk", "within_one")
"""Ordinal floors: quadratic weighted kappa, accuracy within one grade (MAE is reported, not gated)."""
REFERABLE: tuple[str, ...] = ("auc", "sensitivity", "specificity", "f1")
"""The ordinal referable view (grade >= task.referable_from): `referable.<metric>`."""
CRITICAL: tuple[str, ...] = ("sensitivity", "specificity")
"""A multi-class critical-class flag (p >= its val-fitted threshold): `critical.<class>.<metric>`."""
MULTILABEL_SUMMARY: tuple[str, ...] = ("macro_auc", "micro_auc", "map", "macro_f1", "micro_f1", "subset_accuracy")
"""Multi-label summary metrics that are floors (higher is better): gateable by name. `hamming_loss` (lower is
better) and `ece` are reported, not gated."""
MULTILABEL_HEADLINE: tuple[str, ...] = ("macro_auc", "map", "macro_f1", "hamming_loss")
"""What `dvc metrics show` and the version tags carry for a multi-label task."""
PER_LABEL: tuple[str, ...] = ("auc", "ap", "recall", "specificity", "precision", "f1")
"""Per-finding metrics of a multi-label task, at that finding's own validation-fitted threshold
(`per_class.<label>.<metric>` in metrics.json, as for classes; gated as `auc[glaucoma]`)."""
FAMILY_GATES: dict[str, dict[str, float]] = {
    # the gates a task family gets when `evaluate.gates.bounds` is empty (binary uses the min_* keys)
    "multiclass": {"balanced_accuracy": 0.6, "macro_auc": 0.8},
    "ordinal": {"qwk": 0.6, "macro_auc": 0.7},
    "multilabel": {"macro_auc": 0.8, "macro_f1": 0.4},
}
_PER_CLASS_ALIASES = {
    "sensitivity": "recall",
    "roc_auc": "auc",
    "ppv": "precision",
    "tnr": "specificity",
    "pr_auc": "ap",
    "average_precision": "ap",
}


def canonical_gate(name: str) -> str:
    """A gate's metric as metrics.json names it: `recall[mel]` / `sensitivity[mel]` -> `per_class.mel.recall`;
    a dotted name (`referable.sensitivity`) as it is; a binary name or alias (`auc`) -> its key (`roc_auc`)."""
    name = name.strip()
    if name.endswith("]") and "[" in name:
        what, cls = name[:-1].split("[", 1)
        what = what.strip().lower()
        return f"per_class.{cls.strip()}.{_PER_CLASS_ALIASES.get(what, what)}"
    if "." in name:
        return name
    key = _BY_NAME.get(name.lower())
    return key if key is not None else name


def gateable_metrics(kind: str, classes: list[str], critical: list[str], referable: bool) -> set[str]:
    """Every metric a gate may name for a task (canonical names, see `canonical_gate`)."""
    if kind == "binary":
        return {k for k, m in METRICS.items() if m.higher_is_better}
    if kind == "multilabel":
        return set(MULTILABEL_SUMMARY) | {f"per_class.{c}.{m}" for c in classes for m in PER_LABEL}
    out = set(KCLASS_SUMMARY) | {f"per_class.{c}.{m}" for c in classes for m in PER_CLASS}
    out |= {f"critical.{c}.{m}" for c in critical for m in CRITICAL}
    if kind == "ordinal":
        out |= set(ORDINAL_SUMMARY) | ({f"referable.{m}" for m in REFERABLE} if referable else set())
    return out


KCLASS_LABELS: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy (mean recall)",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "macro_auc": "macro ROC-AUC (one-vs-rest)",
    "mcc": "MCC",
    "ece": "calibration error (top-label ECE)",
    "brier": "Brier score",
    "qwk": "quadratic weighted kappa",
    "mae": "mean absolute grade error",
    "within_one": "accuracy within one grade",
    "referable.auc": "referable ROC-AUC",
    "referable.sensitivity": "referable sensitivity",
    "referable.specificity": "referable specificity",
    "referable.f1": "referable F1",
    "micro_auc": "micro ROC-AUC (every image-finding pair)",
    "map": "mean average precision (mAP)",
    "micro_f1": "micro F1",
    "subset_accuracy": "subset accuracy (every finding right)",
    "hamming_loss": "Hamming loss (share of wrong image-finding pairs)",
}
"""How people read a multi-class or ordinal summary metric (model card, version page)."""

TaskKind = Literal["binary", "multiclass", "ordinal", "multilabel"]
"""A resolved task family (`task.type` with `auto` decided)."""
OUTPUT_SCHEMA_VERSION = 3
"""Version of the scoring output of `medclf predict` and the served model: 1 was binary-only (p_<class>, label,
positive); 2 adds `prediction` for multi-class and ordinal tasks, `flag_<class>` for critical classes and `referable`
for an ordinal view; 3 adds the multi-label row (issue 25): `p_<finding>` per finding, `labels` (the findings present,
each at its own threshold, ";"-joined in the findings' order) and `present_<finding>` per finding. Each version only
adds: a binary, multi-class or ordinal model's columns are the same under 2 and 3 (docs/TASKS.md). Here, in the leaf,
so that serving reads it without loading the metrics."""
