"""Typed settings: `params.yaml` is parsed once, at the edge, into these objects.

Every section forbids unknown keys, so a typo fails loudly with the dotted key
that is wrong instead of being silently ignored. Each stage receives only the
section(s) it reads, which mirrors the `params:` lists in `dvc.yaml`.

This package imports nothing else from `medclf`: every stage's import closure starts here, so the
vocabularies the validators need (check names and backbones in `config.vocabulary`, augmentation presets
here) are defined in it, once, and the modules that act on them (`validation.checks`, `modeling`,
`augmentation`) import them from it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medclf.config.tuning import Tune as Tune
from medclf.config.vocabulary import BACKBONES as BACKBONES
from medclf.config.vocabulary import CHECKS as CHECKS
from medclf.config.vocabulary import MODALITIES as MODALITIES
from medclf.config.vocabulary import Mode as Mode
from medclf.config.vocabulary import Severity as Severity
from medclf.config.vocabulary import canonical_gate, gateable_metrics

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A bad `params.yaml`; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- paths
class Paths(_Section):
    raw_data: str = "data/raw/chest_xray"
    """The raw source as DVC sees it: ingest's data dependency (a folder, a file or an `s3://` prefix).

    `dvc.yaml` lists it under ingest's deps, so adding, removing, changing or relabelling one image
    makes ingest and everything after it stale, and `dvc.lock` records its hash. Every file the
    configured source reads must lie under it (checked when params.yaml is parsed)."""
    external_data: str = "data/external"
    """The raw external validation sets (`evaluate.external`) as DVC sees them: evaluate's data dependency, so a
    changed external image re-runs evaluate (and nothing before it); every external source must lie under it."""
    ingest_dir: Path = Path("data/ingest")
    augment_dir: Path = Path("data/augment")
    model_dir: Path = Path("models")
    reports_dir: Path = Path("reports")
    cache_dir: Path = Path(".cache")


# --------------------------------------------------------------------------- ingest
class SyntheticSource(_Section):
    """Deterministic, clearly synthetic chest-radiograph-like phantoms (the offline demo)."""

    n_patients: int = Field(120, ge=4)
    images_per_patient: int = Field(2, ge=1, le=20)
    prevalence: float = Field(0.4, gt=0, lt=1)
    native_size: int = Field(96, ge=16, le=1024)
    seed: int = 0


class Source(_Section):
    kind: Literal["synthetic", "folder", "manifest", "medmnist", "dicom"] = "synthetic"
    uri: str | None = None
    """Folder, manifest file, .npz file, or `s3://bucket/prefix` (folder/manifest/medmnist)."""
    manifest: str | None = None
    """For `dicom`: CSV/Parquet with `path,label[,patient_id][,split]`; paths relative to it."""
    label_column: str = Field("label", min_length=1)
    """Manifest/DICOM sources: the column holding each image's class or grade, e.g. `dx` (HAM10000) or `dr_grade`;
    integer grades (`0`..`4`) become the labels `"0"`..`"4"`."""
    group_column: str = Field("patient_id", min_length=1)
    """Manifest/DICOM sources: the column grouping images for the patient-level split, e.g. `lesion_id` (HAM10000:
    a lesion's images never cross splits); optional in the file (DICOM falls back to the PatientID tag)."""
    patient_id_regex: str | None = None
    """Regex applied to the file name; group 1 is the patient id (folder source)."""
    label_regex: str | None = None
    """Folder source: a regex searched in each file name; where it matches, its group 1 (else the whole match)
    is the image's label instead of its folder's, e.g. `'_(bacteria|virus)_'` makes the Kermany chest X-rays the
    3-class task NORMAL / bacteria / virus (docs/TASKS.md). Labels are then matched to `ingest.classes` as usual."""
    medmnist_flag: str | None = None
    """For `medmnist` without `uri`: e.g. `pneumoniamnist`; downloaded with MD5 check."""
    medmnist_size: Literal[28, 64, 128, 224] = 28
    medmnist_labels: list[str] | None = None
    s3_endpoint_url: str | None = None
    synthetic: SyntheticSource = SyntheticSource()

    @model_validator(mode="after")
    def _needs_uri(self) -> Source:
        if self.kind in ("folder", "manifest") and not self.uri:
            raise ValueError(f"source.uri is required for kind '{self.kind}'")
        if self.kind == "dicom" and not (self.manifest or self.uri):
            raise ValueError("source.manifest is required for kind 'dicom'")
        if self.kind == "medmnist" and not (self.uri or self.medmnist_flag):
            raise ValueError("source.uri (a local .npz) or source.medmnist_flag is required for 'medmnist'")
        for key in ("patient_id_regex", "label_regex"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"source.{key}: {pattern!r} is not a valid regular expression ({err})") from err
        if self.label_regex is not None and self.kind != "folder":
            raise ValueError(f"source.label_regex applies to folder sources only (kind is {self.kind!r})")
        if self.label_column == self.group_column:
            raise ValueError(f"source.label_column and source.group_column are both {self.label_column!r}")
        for key, col in (("label_column", self.label_column), ("group_column", self.group_column)):
            if col in ("path", "split"):
                raise ValueError(f"source.{key}: {col!r} is the manifest's {col} column, not a label or a group")
        return self


class Splits(_Section):
    use_official: bool = True
    val_fraction: float = Field(0.15, ge=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    seed: int = 42


def label_key(label: str) -> str:
    """How labels are compared (ingest.classes, ingest.label_aliases, the source's labels): trimmed, inner
    whitespace collapsed, case-folded, so `' Viral  Pneumonia'` and `'viral pneumonia'` are one key."""
    return " ".join(label.split()).casefold()


DEMO_PATIENT_REGEX = "^(pt[0-9a-f]{10})_"
"""The embedded demo's pseudonymised file names (data/demo/README.md): the default source's patient key."""


class Ingest(_Section):
    source: Source = Source(kind="folder", uri="data/raw/chest_xray", patient_id_regex=DEMO_PATIENT_REGEX)
    classes: list[str] | None = None
    """Expected class names, in label-index order; None infers them sorted."""
    positive_class: str | None = None
    image_size: int = Field(96, ge=16, le=1024)
    channels: Literal[1, 3] = 1
    resize: Literal["pad", "crop"] = "pad"
    splits: Splits = Splits()
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    max_image_pixels: int = Field(80_000_000, gt=0)
    workers: int = Field(0, ge=0)
    """Decode threads; 0 means one per CPU core."""
    modality: str = "chest_xray"
    """What the images are (`medclf.config.vocabulary.MODALITIES`). A greyscale modality (chest_xray, mammography,
    ultrasound, ...) makes validate's `colour` check fail on colour pictures, and the registered model refuse them;
    dermoscopy, fundus, histology and other are colour by nature and not checked (`medclf.imaging.modality`)."""
    subgroups: list[str] = Field(default_factory=list)
    """Manifest columns (e.g. sex, age_band, site) carried into ingest's manifest; evaluate reports per category."""
    label_aliases: dict[str, str] = Field(default_factory=dict)
    """Label spelling -> class, for variants beyond case and whitespace (`{'viral pneumonia': VIRUS}`). Keys are
    matched trimmed and case-insensitively (`label_key`); see `medclf.sources.base.resolve_labels`."""

    @field_validator("classes")
    @classmethod
    def _two_distinct_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError(f"got {v!r}: must be null (infer the classes from the data) or at least 2 class names")
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class name(s) {dupes} in {v!r}")
        return v

    @field_validator("classes")
    @classmethod
    def _no_near_duplicate_classes(cls, v: list[str] | None) -> list[str] | None:
        """Labels match classes case-insensitively, so two classes differing only in case are ambiguous."""
        for i, a in enumerate(v or []):
            for b in (v or [])[i + 1 :]:
                if label_key(a) == label_key(b):
                    raise ValueError(f"class names {a!r} and {b!r} differ only in case or whitespace")
        return v

    @field_validator("label_aliases")
    @classmethod
    def _aliases_resolve(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        keys: dict[str, str] = {}
        for spelling, target in v.items():
            key = label_key(spelling)
            if not key or not target.strip():
                raise ValueError(f"{spelling!r}: {target!r}: an alias and its class must not be blank")
            if key in keys:
                raise ValueError(f"aliases {keys[key]!r} and {spelling!r} differ only in case or whitespace")
            keys[key] = spelling
        classes = info.data.get("classes")  # absent when `classes` itself failed validation
        by_key = {label_key(c): c for c in classes or []}
        for spelling, target in v.items():
            if classes and label_key(target) not in by_key:
                raise ValueError(f"{spelling!r}: {target!r} is not one of ingest.classes {classes}")
            same = by_key.get(label_key(spelling))
            if same is not None and label_key(same) != label_key(target):
                raise ValueError(f"{spelling!r} is the spelling of class {same!r}; it cannot alias {target!r}")
        return v

    @field_validator("modality")
    @classmethod
    def _known_modality(cls, v: str) -> str:
        if v not in MODALITIES:
            raise ValueError(f"unknown modality {v!r}; choose one of {sorted(MODALITIES)}")
        return v

    @field_validator("positive_class")
    @classmethod
    def _positive_among_classes(cls, v: str | None, info: ValidationInfo) -> str | None:
        classes = info.data.get("classes")  # absent when `classes` itself failed validation
        if v is not None and classes and v not in classes:
            raise ValueError(f"{v!r} is not one of ingest.classes {classes}")
        return v


# --------------------------------------------------------------------------- task
class Task(_Section):
    """What kind of decision the model makes (issue 24): the one seam every stage downstream asks."""

    type: Literal["auto", "binary", "multiclass", "ordinal", "multilabel"] = "auto"
    """auto: 2 classes -> binary, more -> multiclass. ordinal must be declared, with `ingest.classes` in grade order
    (lowest first). multilabel (issue 25): an image has any number of findings, one sigmoid each; the findings are
    `task.labels`."""
    labels: list[str] = Field(default_factory=list)
    """multilabel: the findings, in output order; for a manifest source, the names of its 0/1 label columns (an
    image with every column 0, e.g. "no finding", is legal)."""
    label_rule: Literal["target_sensitivity", "f1"] = "target_sensitivity"
    """multilabel: how each finding's threshold is fitted on validation: for `evaluate.target_sensitivity`, or for
    the best F1."""
    label_rules: dict[str, Literal["target_sensitivity", "f1"] | float] = Field(default_factory=dict)
    """multilabel: a rule per finding, over `label_rule`: `f1`, `target_sensitivity`, or a number (that finding's
    own target sensitivity, e.g. `glaucoma: 0.9`)."""
    critical_classes: list[str] = Field(default_factory=list)
    """multiclass: classes (e.g. mel, bcc, akiec) also flagged when p >= a threshold fitted on validation for
    `evaluate.target_sensitivity`; the prediction itself stays the argmax."""
    referable_from: str | None = None
    """ordinal: the lowest referable grade (a class name, e.g. the moderate DR grade): the referable view is
    P(grade >= it), called at a threshold fitted on validation for `evaluate.target_sensitivity`."""
    ordinal_rule: Literal["expected_grade", "argmax"] = "expected_grade"
    """ordinal: expected_grade cuts E[grade] = sum_k k p_k at cut-points fitted on validation for the best quadratic
    weighted kappa; argmax takes the most probable grade."""

    def resolved(self, n_classes: int) -> Literal["binary", "multiclass", "ordinal", "multilabel"]:
        """The task type for `n_classes` classes (`auto` decided)."""
        if self.type == "auto":
            return "binary" if n_classes == 2 else "multiclass"
        return self.type


# --------------------------------------------------------------------------- validate
class Validate(_Section):
    severity: dict[str, Severity] = Field(default_factory=dict)
    """Per-check severity overrides (check name -> error|warn|off)."""
    min_size: int = Field(16, ge=1)
    """Smallest original side in pixels (check `image_size`); a registered model refuses smaller inputs."""
    max_size: int = Field(4096, ge=1)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    """Largest long side / short side of an original image (check `aspect_ratio`, a warning by default);
    a registered model refuses more elongated inputs (e.g. a 4000×40 sliver) with this reason."""
    prevalence_bounds: tuple[float, float] = (0.05, 0.95)
    max_prevalence_gap: float = Field(0.10, ge=0, le=1)
    """Largest allowed difference of a class's share between splits."""
    split_fraction_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"train": (0.5, 0.9), "val": (0.05, 0.3), "test": (0.05, 0.3)}
    )
    blank_std_max: float = 2.0
    low_contrast_std_max: float = 8.0
    saturated_fraction_max: float = 0.5
    inverted_border_mean_min: float = 200.0
    inverted_center_contrast_min: float = -15.0
    """Check `inverted`: the centre of the image must be at least this much brighter than its border."""
    near_duplicate_hash_size: int = Field(16, ge=4, le=32)
    """Perceptual hash side: 16 → 256-bit pHash. 64-bit (8) hashes collide between different chest X-rays."""
    near_duplicate_max_distance: int = Field(10, ge=0)
    """Largest Hamming distance (in bits of the hash) that counts as a near-duplicate."""
    drift_psi_max: float = 0.2
    drift_prevalence_max: float = 0.10
    max_examples: int = Field(10, ge=1)
    min_finding_positives: int = Field(10, ge=0)
    """Multi-label (issue 25): a finding with fewer positive images than this in val or test is too rare to
    evaluate (check `rare_finding`, a warning naming the finding and the split)."""

    @field_validator("severity")
    @classmethod
    def _known_checks(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; choose from {sorted(CHECKS)}")
        return v

    @field_validator("split_fraction_bounds")
    @classmethod
    def _known_splits(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        unknown = sorted(set(v) - {"train", "val", "test"})
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; use train, val, test")
        return v


# --------------------------------------------------------------------------- augment
class AugmentPolicy(_Section):
    rotation_deg: float = Field(0.0, ge=0, le=180)
    zoom: float = Field(0.0, ge=0, le=0.5)
    translate: float = Field(0.0, ge=0, le=0.5)
    horizontal_flip: bool = False
    vertical_flip: bool = False
    contrast: float = Field(0.0, ge=0, le=1)
    brightness: float = Field(0.0, ge=0, le=1)


PRESETS: dict[str, AugmentPolicy] = {
    "chest_xray": AugmentPolicy(rotation_deg=7, zoom=0.1, translate=0.06, contrast=0.15, brightness=0.1),
    "dermoscopy": AugmentPolicy(
        rotation_deg=180, zoom=0.15, horizontal_flip=True, vertical_flip=True, contrast=0.2, brightness=0.15
    ),
    "fundus": AugmentPolicy(rotation_deg=30, zoom=0.05, contrast=0.1, brightness=0.1),
    "ultrasound": AugmentPolicy(rotation_deg=10, zoom=0.1, translate=0.05, horizontal_flip=True, contrast=0.2),
    "mammography": AugmentPolicy(rotation_deg=5, zoom=0.1, horizontal_flip=True, contrast=0.1),
    "none": AugmentPolicy(),
}


class Augment(_Section):
    preset: str = "chest_xray"
    overrides: dict[str, Any] = Field(default_factory=dict)
    balance: bool = True
    target_ratio: float = Field(1.0, gt=0, le=1)
    """Minority/majority ratio after offline oversampling."""
    seed: int = 7
    preview_n: int = Field(16, ge=1, le=64)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset '{v}'; choose one of {sorted(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _valid_overrides(self) -> Augment:
        unknown = sorted(set(self.overrides) - set(AugmentPolicy.model_fields))
        if unknown:
            raise ValueError(f"overrides: unknown key(s) {unknown}; choose from {sorted(AugmentPolicy.model_fields)}")
        try:
            self.policy()  # out-of-range values fail here, at parse time, not mid-training
        except ValidationError as err:
            bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"overrides: {bad}") from None
        return self

    def policy(self) -> AugmentPolicy:
        """The preset with `overrides` applied (validated like any other value)."""
        return AugmentPolicy(**{**PRESETS[self.preset].model_dump(), **self.overrides})


# --------------------------------------------------------------------------- train
class Train(_Section):
    backbone: str = "mobilenet_v2"
    weights: str = "offline:mobilenet_v2"
    """`imagenet`, `none`, or a local / s3:// path to a weights file (.weights.h5 or torchvision .pth)."""
    input_size: Annotated[int, Field(ge=32, le=1024)] | Literal["auto"] | None = "auto"
    """Resize inside the model. None keeps the ingest size; `auto` (the default) upsamples images smaller than
    96 px to 96-128 px when the weights are pretrained (ImageNet features are learned at 224 px: at 28 px, test
    AUC 0.968 vs 0.806 upsampled vs not, docs/PERFORMANCE.md), and to the backbone's smallest size otherwise."""
    preprocessing: Literal["auto"] | Mode = "auto"
    """auto: the backbone's own keras preprocess_input mode (torch for torchvision .pth weights)."""
    width: float = Field(1.0, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    head_epochs: int = Field(3, ge=0)
    finetune_epochs: int = Field(5, ge=0)
    unfreeze_top: int = Field(40, ge=0)
    head_lr: float = Field(1e-3, gt=0)
    finetune_lr: float = Field(1e-4, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """Per phase: linear warm-up over `warmup_epochs`, then cosine decay."""
    loss: Literal["crossentropy", "focal"] = "crossentropy"
    focal_gamma: float = Field(2.0, ge=0)
    class_weights: bool = True
    early_stopping_patience: int = Field(10, ge=0)
    calibration: Literal["temperature", "none"] = "temperature"
    """temperature: fit T on val after the best epoch and fold it into the saved model
    (`medclf.evaluation.calibration`)."""
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = "auto"
    online_augment: bool = True
    augment_workers: int = Field(2, ge=0)
    jit_compile: Literal["auto", True, False] = "auto"
    compile_cache: bool = True
    """JAX: persistent compilation cache under paths.cache_dir/jax (warm starts skip recompiling)."""
    seed: int = 1234
    tune: Tune = Tune()
    """A hyperparameter search before the final fit (`medclf.training.tuning`); off by default."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone '{v}'; choose one of {sorted(BACKBONES)}")
        return v

    @model_validator(mode="after")
    def _tunable(self) -> Train:
        self.tune.check_keys(type(self).model_fields)
        return self


# --------------------------------------------------------------------------- evaluate
class Gates(_Section):
    min_f1: float = Field(0.7, ge=0, le=1)
    """binary: F1 at the operating threshold."""
    min_recall: float = Field(0.8, ge=0, le=1)
    """binary: sensitivity at the operating threshold."""
    min_auc: float | None = None
    min_specificity: float | None = None
    non_inferiority_margin: float = Field(0.02, ge=0, le=1)
    bounds: dict[str, float] = Field(default_factory=dict)
    """`{metric: bound}` floors for any task type, e.g. `balanced_accuracy: 0.7`, `recall[mel]: 0.75`, `qwk: 0.6`,
    `referable.sensitivity: 0.9` (the task's gateable metrics: docs/TASKS.md). Empty: the task family's defaults
    (binary: the min_* keys above; multiclass and ordinal: `medclf.config.vocabulary.FAMILY_GATES`)."""

    @field_validator("bounds")
    @classmethod
    def _bounds_are_fractions(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: b for k, b in v.items() if not 0 <= b <= 1}
        if bad:
            raise ValueError(f"{bad}: every bound is a floor in [0, 1]")
        return v


class ExternalSet(_Section):
    """An external validation set (issue 26): images from another site or time, scored at the registered
    operating point with the internal test's metrics and CIs, never used to fit anything."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    """A short slug, e.g. `site_b`: the key of its figures in metrics.json, tags and the version page."""
    source: Source
    """Any source kind, as `ingest.source`; its labels must be `ingest.classes`; under `paths.external_data`."""
    gates: dict[str, float] = {}
    """Optional floors on this set's metrics (the task's metric names, e.g. `{auc: 0.95, recall: 0.9}`)."""


class Robustness(_Section):
    """The robustness report (issue 26): the test metrics under controlled acquisition shifts
    (`medclf.evaluation.robustness`), the proxy for another site's images that the project can measure itself."""

    enabled: bool = True
    perturbations: list[str] | None = None
    """None: every registered shift; a list picks some (the others are reported as "not selected")."""
    max_drop: float | None = Field(None, gt=0, le=1)
    """Optional gate: the largest drop of the headline metric (binary ROC-AUC, K-class macro AUC) under any shift."""


class Evaluate(_Section):
    threshold_rule: Literal["target_sensitivity", "max_f1", "youden"] = "target_sensitivity"
    target_sensitivity: float = Field(0.95, gt=0, le=1)
    bootstrap: int = Field(500, ge=0)
    seed: int = 0
    gradcam_n: int = Field(4, ge=0)
    gates: Gates = Gates()
    robustness: Robustness = Robustness()
    external: list[ExternalSet] = []
    """External validation sets (docs/TASKS.md, "External validation"); an overlap with the training data by
    patient or image hash is refused."""

    @model_validator(mode="after")
    def _external_names_unique(self) -> Evaluate:
        names = [e.name for e in self.external]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"evaluate.external: the set name(s) {dup} appear more than once")
        return self


# --------------------------------------------------------------------------- register
class Register(_Section):
    model_name: str = "medclf-demo"
    experiment: str = "medclf"
    alias: str = "challenger"


class MLflowCfg(_Section):
    tracking_uri: str = "http://127.0.0.1:5000"
    """Overridden by the MLFLOW_TRACKING_URI environment variable."""
    ui_url: str | None = Field(None, pattern=r"^https?://\S+$")
    """The MLflow UI's public address (e.g. `https://mlflow.example.org/mlflow`) for the links on a version page;
    None (the default): relative links (`#/experiments/...`), which open on whatever host, port and path prefix
    the reviewer reached the UI by (`medclf.release.model_card.run_links`)."""

    def resolved_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


class Settings(_Section):
    paths: Paths = Paths()
    ingest: Ingest = Ingest()
    task: Task = Task()
    validate_: Validate = Field(Validate(), alias="validate")
    augment: Augment = Augment()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    register_: Register = Field(Register(), alias="register")
    mlflow: MLflowCfg = MLflowCfg()
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _source_under_raw_data(self) -> Settings:
        """A source outside `paths.raw_data` would be invisible to DVC: a silent "no change" forever."""
        where = source_location(self.ingest.source)
        if where is not None and not is_under(where, self.paths.raw_data):
            raise ValueError(
                f"ingest.source reads {where!r}, which is not under paths.raw_data {self.paths.raw_data!r}. "
                "DVC tracks paths.raw_data as ingest's input, so changes to this source would never trigger a "
                "retrain: set paths.raw_data to the source's folder (or a folder that contains it)"
            )
        for ext in self.evaluate.external:
            where = source_location(ext.source)
            if where is None or not is_under(where, self.paths.external_data):
                raise ValueError(
                    f"evaluate.external: set {ext.name!r} reads {where!r}, which is not under paths.external_data "
                    f"{self.paths.external_data!r}: DVC tracks that folder as evaluate's external input"
                )
        return self

    @model_validator(mode="after")
    def _task_fits_the_classes(self) -> Settings:
        """The task type, its options and `ingest.classes` agree (each error names its dotted key)."""
        task, classes = self.task, self.ingest.classes
        if task.type == "multilabel" or task.labels or task.label_rules:
            self._multilabel_fits()
            classes = list(task.labels)
        k = len(classes) if classes else None
        if task.type == "ordinal" and not classes:
            raise ValueError("task.type: ordinal needs ingest.classes in grade order (lowest grade first)")
        if k is not None and task.type == "binary" and k != 2:
            raise ValueError(f"task.type: binary needs 2 classes; ingest.classes has {k}: use multiclass or ordinal")
        if k is not None and task.type in ("multiclass", "ordinal") and k < 3:
            raise ValueError(f"task.type: {task.type} needs at least 3 classes; ingest.classes has {k} (binary)")
        kind = task.resolved(k) if k is not None else task.type
        if self.ingest.positive_class is not None and kind in ("multiclass", "ordinal"):
            raise ValueError(
                f"ingest.positive_class: applies to binary tasks only; this task is {kind}: use task.critical_classes "
                "(multiclass) or task.referable_from (ordinal) for a class that must not be missed"
            )
        if task.critical_classes and kind not in ("multiclass", "auto"):
            raise ValueError(f"task.critical_classes: applies to multiclass tasks only; this task is {kind}")
        if task.referable_from is not None and kind != "ordinal":
            raise ValueError(f"task.referable_from: applies to ordinal tasks only; this task is {kind}")
        for key, names in (
            ("task.critical_classes", task.critical_classes),
            ("task.referable_from", [task.referable_from]),
        ):
            unknown = [n for n in names if n is not None and classes and n not in classes]
            if unknown:
                raise ValueError(f"{key}: {unknown} not among ingest.classes {classes}")
        if task.referable_from is not None and classes and classes.index(task.referable_from) == 0:
            raise ValueError(
                f"task.referable_from: {task.referable_from!r} is the lowest grade: every case would be referable"
            )
        dupes = sorted({c for c in task.critical_classes if task.critical_classes.count(c) > 1})
        if dupes:
            raise ValueError(f"task.critical_classes: {dupes} listed twice")
        if k is not None:
            allowed = gateable_metrics(kind, classes or [], task.critical_classes, task.referable_from is not None)
            unknown = [m for m in self.evaluate.gates.bounds if canonical_gate(m) not in allowed]
            if unknown:
                raise ValueError(
                    f"evaluate.gates.bounds: {unknown} not gateable for this {kind} task; choose among "
                    f"{', '.join(sorted(allowed))}"
                )
        return self

    def _multilabel_fits(self) -> None:
        """`task.labels` and `task.label_rules` belong to multilabel tasks, which name their findings there."""
        task = self.task
        if task.type != "multilabel":
            key = "task.labels" if task.labels else "task.label_rules"
            raise ValueError(f"{key}: applies to multilabel tasks only (task.type: multilabel), not {task.type}")
        if len(task.labels) < 2:
            raise ValueError(f"task.labels: a multilabel task needs at least 2 findings; got {task.labels}")
        dupes = sorted({c for c in task.labels if task.labels.count(c) > 1})
        if dupes:
            raise ValueError(f"task.labels: {dupes} listed twice")
        unknown = sorted(set(task.label_rules) - set(task.labels))
        if unknown:
            raise ValueError(f"task.label_rules: {unknown} not among task.labels {task.labels}")
        for name, rule in task.label_rules.items():
            if isinstance(rule, float) and not 0 < rule < 1:
                raise ValueError(f"task.label_rules: {name}: a target sensitivity is in (0, 1), not {rule}")
        if self.ingest.classes:
            raise ValueError("ingest.classes: a multilabel task names its findings in task.labels, not ingest.classes")
        if self.ingest.positive_class is not None:
            raise ValueError("ingest.positive_class: applies to binary tasks only; this task is multilabel")

    @property
    def validation(self) -> Validate:
        """The `validate` section (`validate` itself is a pydantic method name)."""
        return self.validate_

    @property
    def registry(self) -> Register:
        """The `register` section (`register` shadows a pydantic attribute)."""
        return self.register_


def source_location(source: Source) -> str | None:
    """Where a source's bytes live (the folder a manifest's paths are relative to); None if generated."""
    if source.kind in ("folder", "medmnist"):
        return source.uri  # medmnist without uri: an MD5-checked download fixed by its params
    manifest = (source.manifest or source.uri) if source.kind in ("manifest", "dicom") else None
    if not manifest:
        return None
    return manifest.rstrip("/").rpartition("/")[0] if manifest.startswith("s3://") else str(Path(manifest).parent)


def is_under(path: str, root: str) -> bool:
    """`path` equals `root` or lies below it (local paths normalised, `s3://` compared by prefix)."""
    if path.startswith("s3://") or root.startswith("s3://"):
        p, r = path.rstrip("/"), root.rstrip("/")
        return p == r or p.startswith(r + "/")
    lp, lr = Path(os.path.abspath(os.path.expanduser(path))), Path(os.path.abspath(os.path.expanduser(root)))
    return lp == lr or lp.is_relative_to(lr)


_DOTTED = re.compile(r"^(?:Value error, )?([a-z_]+(?:\.[a-z_]+)+): (.*)$", re.S)


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        named = _DOTTED.match(msg) if key == "<root>" else None
        if named:  # a cross-section check names its own dotted key first ("task.type: ...")
            key, msg = named.group(1), named.group(2)
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml in the repository for the schema)"
        lines.append(f"  - {key}: {msg}")
    return "\n".join(lines)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `base` with `over` laid on top, nested dicts merged key by key (inputs untouched)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def settings_from_dict(data: dict[str, Any], source: str = "<dict>") -> Settings:
    try:
        return Settings.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def _refuse_anchors(text: str, source: str) -> None:
    """Raise ConfigError at the first YAML alias (`*name`, `<<: *name` included), else the first anchor (`&name`).

    An alias makes one node stand for another, so a kilobyte can describe billions of values (a "billion
    laughs" document): it loads as a shared graph in seconds, then expands when anything serialises it (the
    train stage logging its params, `dvc status` hashing them). params.yaml has no use for either, so both are
    refused, naming the line and the dotted key. Only the event stream is read: time and memory are linear in
    the size of the text, however much the aliases would expand to.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.events import (
        AliasEvent,
        CollectionEndEvent,
        MappingStartEvent,
        NodeEvent,
        ScalarEvent,
        SequenceStartEvent,
    )

    # one frame per open collection: [its dotted key, is a mapping, next is a key, last key, next index]
    stack: list[list[Any]] = []
    anchor: tuple[int, str, str] | None = None
    for event in YAML(typ="safe", pure=True).parse(text):
        if isinstance(event, CollectionEndEvent):
            stack.pop()
            continue
        if not isinstance(event, NodeEvent):
            continue
        where, is_key = "", False
        if stack:
            frame = stack[-1]
            if frame[1]:  # a mapping: keys and values alternate
                is_key = frame[2]
                where = frame[0] if is_key else f"{frame[0]}.{frame[3]}" if frame[0] else str(frame[3])
                frame[2] = not frame[2]
                if is_key:
                    frame[3] = (
                        event.value
                        if isinstance(event, ScalarEvent)
                        else f"*{event.anchor}"
                        if isinstance(event, AliasEvent)
                        else "?"
                    )
            else:
                where = f"{frame[0]}[{frame[4]}]"
                frame[4] += 1
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, AliasEvent):
            what = f"alias '*{event.anchor}'" + (" (as a key)" if is_key else "")
            raise ConfigError(
                f"{source}: line {line}: {where or '<root>'}: YAML anchors and aliases are not "
                f"allowed in the parameters file ({what}); write the value out in full"
            )
        if event.anchor is not None and anchor is None:
            anchor = (line, where or "<root>", event.anchor)
        if isinstance(event, (MappingStartEvent, SequenceStartEvent)):
            stack.append([where, isinstance(event, MappingStartEvent), True, None, 0])
    if anchor is not None:
        line, where, name = anchor
        raise ConfigError(
            f"{source}: line {line}: {where}: YAML anchors and aliases are not allowed in the "
            f"parameters file (anchor '&{name}'); write the value out in full"
        )


def read_params_yaml(path: Path) -> Any:
    """params.yaml as DVC reads and writes it: YAML 1.2 (ruamel.yaml, which DVC uses), so `off`, `no` and `on`
    are strings and `1e-4` is a float. `dvc exp run -S` rewrites the file with a 1.2 writer, which drops the
    quotes a YAML 1.1 reader needs around `'off'`; reading it any other way would change its meaning.
    Duplicate keys are an error (1.1 readers keep the last one silently). Anchors and aliases are refused."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    text = path.read_text()
    try:
        _refuse_anchors(text, str(path))
        return YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as err:  # one line: where, then what (ruamel's own text spans many lines)
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {at}{err.problem or err.context}") from None
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_settings(path: str | Path = DEFAULT_PARAMS) -> Settings:
    """Parse `params.yaml` into `Settings`; errors name the key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such parameters file (run from the project root or pass --params)")
    data = read_params_yaml(path) or {}
    if not data:  # an empty (or all-commented) file would silently run the built-in synthetic demo
        raise ConfigError(f"{path}: the parameters file is empty (no sections); see params.yaml in the repository")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return settings_from_dict(data, str(path))
