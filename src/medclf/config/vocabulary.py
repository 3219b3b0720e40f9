"""The domain vocabularies params.yaml values are checked against: check names, backbone names.

A leaf (imports nothing from medclf), so `medclf.config` stays one too. `medclf.validation.checks` and
`medclf.modeling` build on these tables; they are defined here once.
"""

from __future__ import annotations

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
}


MODALITIES: dict[str, bool] = {
    # ingest.modality -> the images are greyscale by nature. For those, a colour picture (a photograph, a screenshot,
    # a dermoscopy image in a chest X-ray set) is the wrong kind of input: validate's `colour` check and the served
    # model refuse it (medclf.modality). Grey stored as RGB (R = G = B) is grey. Colour modalities are not checked.
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
    # it, takes a width multiplier `alpha`, smallest input side); `medclf.modeling.Backbone` names the fields.
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
}
