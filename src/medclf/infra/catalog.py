"""The catalog: every artifact the stages and the orchestrator exchange, named once.

A stage never spells a file name: it asks the catalog (`catalog.MODEL.path(settings.paths)`, or
`catalog.IMAGES.under(staging_dir, split="val")` while it builds an output in a staging directory).
The orchestrator reads results through the same entries. Paths are `params.yaml`'s `paths.*` roots
joined with the relative name declared here; `dvc.yaml` templates the same roots (`${paths.*}`), and
tests/test_dvc_deps.py checks that each stage's declared outputs are the ones dvc.yaml lists.

Like Kedro's `catalog.yml`, adapted: DVC stays the single record of what ran, so the catalog only names
files and gives them typed load/save; it never decides whether something is stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

    from medclf.config import Paths

Root = Literal["raw_data", "external_data", "ingest_dir", "augment_dir", "model_dir", "reports_dir", "cache_dir"]
Kind = Literal["json", "npy", "csv", "parquet", "png", "keras", "md", "dir", "jsonl", "npz", "weights", "sqlite"]


@dataclass(frozen=True)
class Artifact:
    """One named file (or directory) under one of the `paths.*` roots.

    `rel` may hold `{split}` (or other `str.format` fields), filled by the keyword arguments of
    `path`, `under`, `load` and `save`."""

    name: str
    root: Root
    rel: str
    kind: Kind
    doc: str = ""

    def path(self, paths: Paths, **fields: str) -> Path:
        """Where the artifact lives in the project."""
        return Path(getattr(paths, self.root)) / self.rel.format(**fields)

    def under(self, base: str | Path, **fields: str) -> Path:
        """The same relative name under another directory: a stage's staging copy of its output root."""
        return Path(base) / self.rel.format(**fields)

    def load(self, paths: Paths, *, mmap: bool = False, **fields: str) -> Any:
        """Read it: JSON → object, npy → array (memory-mapped on request), csv/parquet → DataFrame."""
        return load_file(self.path(paths, **fields), self.kind, mmap=mmap)

    def save(self, paths_or_dir: Paths | str | Path, data: Any, **fields: str) -> Path:
        """Write it atomically (JSON, npy, csv/parquet DataFrames). A `Path`/`str` is a staging directory
        that stands for this artifact's root."""
        target = (
            self.under(paths_or_dir, **fields)
            if isinstance(paths_or_dir, (str, Path))
            else self.path(paths_or_dir, **fields)
        )
        save_file(target, self.kind, data)
        return target


def load_file(path: Path, kind: Kind, *, mmap: bool = False) -> Any:
    if kind == "json":
        return json.loads(path.read_text())
    if kind == "npy":
        import numpy as np

        return np.load(path, mmap_mode="r" if mmap else None)
    if kind == "csv":
        import pandas as pd

        return pd.read_csv(path)
    if kind == "parquet":
        import pandas as pd

        return pd.read_parquet(path)
    if kind in ("md",):
        return path.read_text()
    raise TypeError(f"{path}: the catalog has no loader for kind {kind!r}")


def save_file(path: Path, kind: Kind, data: Any) -> None:
    from medclf.infra.io import atomic_file, write_json

    if kind == "json":
        write_json(path, data)
    elif kind == "npy":
        import numpy as np

        with atomic_file(path, "wb") as fh:
            np.save(fh, np.asarray(data))
    elif kind in ("csv", "parquet"):
        with atomic_file(path, "wb") as fh:
            (data.to_csv if kind == "csv" else data.to_parquet)(fh, index=False)
    elif kind == "md":
        with atomic_file(path) as fh:
            fh.write(str(data))
    else:
        raise TypeError(f"{path}: the catalog has no writer for kind {kind!r}")


def load_split(paths: Paths, split: str, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(images N×H×W×C uint8, labels N int64) of one ingest split."""
    return IMAGES.load(paths, split=split, mmap=mmap), LABELS.load(paths, split=split)


# --------------------------------------------------------------------------- ingest (paths.ingest_dir)
RAW_DATA = Artifact("raw_data", "raw_data", "", "dir", "the raw source (folder, file or s3:// prefix) ingest reads")
EXTERNAL_DATA = Artifact(
    "external_data", "external_data", "", "dir", "the raw external validation sets evaluate reads (evaluate.external)"
)
CLASSES = Artifact("classes", "ingest_dir", "classes.json", "json", "class names, positive class, image size")
MANIFEST = Artifact("manifest", "ingest_dir", "manifest.parquet", "parquet", "one row per image (hashed ids)")
IMAGES = Artifact("images", "ingest_dir", "{split}_images.npy", "npy", "N×H×W×C uint8 per split")
LABELS = Artifact("labels", "ingest_dir", "{split}_labels.npy", "npy", "N int64 class indices per split")
INGEST_REPORTS = Artifact("ingest_reports", "reports_dir", "ingest", "dir")
QUARANTINE = Artifact("quarantine", "reports_dir", "ingest/quarantine.csv", "csv", "refused images, a reason each")
INGEST_SUMMARY = Artifact(
    "ingest_summary",
    "reports_dir",
    "ingest/summary.json",
    "json",
    "counts per split and class, patients, what changed since the last run (detail)",
)
INGEST_FAILED_RUN = Artifact("ingest_failed_run", "reports_dir", "ingest/failed_run.json", "json")
INGEST_FAILED_QUARANTINE = Artifact("ingest_failed_quarantine", "reports_dir", "ingest/failed_quarantine.csv", "csv")
INGEST_METRICS = Artifact(
    "ingest_metrics", "reports_dir", "ingest.json", "json", "headline (DVC metrics): images kept, images quarantined"
)

# --------------------------------------------------------------------------- validate
VALIDATION_SITE = Artifact("validation_site", "reports_dir", "validation/site", "dir", "Data Docs + report.md")
VALIDATION_SUMMARY = Artifact(
    "validation_summary",
    "reports_dir",
    "validation/summary.json",
    "json",
    "verdict, failed/warned checks, per-check counts, leakage, drift (detail)",
)
VALIDATION_BASELINE = Artifact(
    "validation_baseline",
    "cache_dir",
    "validation_baseline.json",
    "json",
    "the drift reference: first accepted run's prevalence and intensities",
)
VALIDATE_METRICS = Artifact(
    "validate_metrics",
    "reports_dir",
    "validate.json",
    "json",
    "headline (DVC metrics): failed (error-severity) and warning check counts",
)


def inside(directory: Artifact, artifact: Artifact, staging: str | Path, **fields: str) -> Path:
    """Where `artifact`, a file inside the `directory` artifact, goes in that directory's staging copy."""
    return Path(staging) / Path(artifact.rel.format(**fields)).relative_to(directory.rel)


# inside VALIDATION_SITE (built in a staging directory: `inside(VALIDATION_SITE, X, staging)`)
VALIDATION_CHECKS = Artifact(
    "validation_checks",
    "reports_dir",
    "validation/site/checks.json",
    "json",
    "every check with its bound and examples, timings",
)
VALIDATION_REPORT = Artifact("validation_report", "reports_dir", "validation/site/report.md", "md")
VALIDATION_LEAKAGE = Artifact(
    "validation_leakage", "reports_dir", "validation/site/leakage.csv", "csv", "every duplicate / shared-patient pair"
)
VALIDATION_DOCS = Artifact("validation_docs", "reports_dir", "validation/site/index.html", "md", "GX Data Docs")

# --------------------------------------------------------------------------- augment (paths.augment_dir)
TRAIN_IMAGES = Artifact("train_images", "augment_dir", "train_images.npy", "npy", "balanced training images")
TRAIN_LABELS = Artifact("train_labels", "augment_dir", "train_labels.npy", "npy", "their labels")
TRAIN_IS_SYNTHETIC = Artifact(
    "train_is_synthetic", "augment_dir", "train_is_synthetic.npy", "npy", "which rows are oversampled copies"
)
TRAIN_SOURCE_ROW = Artifact(
    "train_source_row", "augment_dir", "train_source_row.npy", "npy", "each row's ingest train row"
)
AUGMENT_SUMMARY = Artifact("augment_summary", "augment_dir", "augment.json", "json", "policy and class counts")
AUGMENT_PREVIEW = Artifact(
    "augment_preview", "reports_dir", "augment/preview.png", "png", "a grid of augmented training images"
)

# --------------------------------------------------------------------------- train (paths.model_dir)
MODEL = Artifact("model", "model_dir", "model.keras", "keras", "the trained Keras model (takes raw uint8)")
TRAIN_RUN = Artifact("train_run", "model_dir", "train_run.json", "json", "run id, epochs, resume, timings")
HISTORY = Artifact("history", "reports_dir", "train/history.csv", "csv", "per-epoch metrics (DVC plot)")
# train's own cache (paths.cache_dir, outside model_dir, which DVC deletes before a rerun)
TRAIN_BACKUP = Artifact(
    "train_backup",
    "cache_dir",
    "train_backup",
    "dir",
    "what a killed run leaves for its retry; keyed by a params+data fingerprint, deleted on success",
)
TRAIN_STATE = Artifact(
    "train_state",
    "cache_dir",
    "train_backup/state.json",
    "json",
    "fingerprint, attempt, phases done, best epoch, MLflow run id",
)
TRAIN_EPOCHS = Artifact(
    "train_epochs", "cache_dir", "train_backup/history.jsonl", "jsonl", "one row per finished epoch"
)
TRAIN_WEIGHTS = Artifact(
    "train_weights",
    "cache_dir",
    "train_backup/{name}.npz",
    "npz",
    "`best` and `phase<n>_end` weights (np.savez of get_weights())",
)
TRAIN_PHASE_BACKUP = Artifact(
    "train_phase_backup",
    "cache_dir",
    "train_backup/phase{phase}",
    "dir",
    "Keras BackupAndRestore of an unfinished phase",
)
TUNE_STUDY = Artifact(
    "tune_study",
    "cache_dir",
    "tune/study.db",
    "sqlite",
    "train.tune's Optuna study (SQLite): resumed by a killed or extended search; trials' backups beside it",
)
JAX_CACHE = Artifact("jax_cache", "cache_dir", "jax", "dir", "JAX persistent compilation cache (train.compile_cache)")
WEIGHTS_CACHE = Artifact(
    "weights_cache", "cache_dir", "weights/{bucket}/{key}", "weights", "an s3:// train.weights file, downloaded once"
)

# --------------------------------------------------------------------------- evaluate
EVALUATE_METRICS = Artifact(
    "evaluate_metrics",
    "reports_dir",
    "evaluate.json",
    "json",
    "headline (DVC metrics): test auc, f1, recall, specificity, threshold, failed gates",
)
METRICS = Artifact(
    "metrics",
    "reports_dir",
    "metrics.json",
    "json",
    "every test/val metric with its 95 % CI, at the chosen and at the 0.5 threshold (detail)",
)
GATES = Artifact(
    "gates",
    "reports_dir",
    "gates.json",
    "json",
    "the release decision: each gate, non-inferiority, champion, comparison (detail)",
)
EVALUATE_REPORTS = Artifact("evaluate_reports", "reports_dir", "evaluate", "dir", "figures, predictions, CIs")
PLOTS = Artifact("plots", "reports_dir", "plots/{name}.json", "json", "ROC/PR/calibration points (DVC plots)")
PLOTS_DIR = Artifact("plots_dir", "reports_dir", "plots", "dir", "the directory of PLOTS")
# inside EVALUATE_REPORTS (written into its staging directory: `inside(EVALUATE_REPORTS, X, staging)`)
TEST_PREDICTIONS = Artifact(
    "test_predictions",
    "reports_dir",
    "evaluate/test_predictions.csv",
    "csv",
    "per-image test probabilities, keyed by manifest id",
)
THRESHOLD = Artifact("threshold", "reports_dir", "evaluate/threshold.json", "json", "the validation-chosen threshold")
CHAMPION_COMPARISON = Artifact(
    "champion_comparison",
    "reports_dir",
    "evaluate/champion_comparison.json",
    "json",
    "challenger minus champion, paired bootstrap CIs",
)
ROBUSTNESS = Artifact(
    "robustness",
    "reports_dir",
    "evaluate/robustness.json",
    "json",
    "test metrics under each acquisition shift, the worst drop and its gate",
)
EXTERNAL_REPORT = Artifact(
    "external_report",
    "reports_dir",
    "evaluate/external.json",
    "json",
    "each external set: metrics with CIs at the registered operating point, champion, internal-external gap",
)
FIGURE = Artifact(
    "figure",
    "reports_dir",
    "evaluate/{name}.png",
    "png",
    "confusion, roc, pr, calibration, gradcam, champion_comparison",
)

# --------------------------------------------------------------------------- register
REGISTER = Artifact("register", "reports_dir", "register.json", "json", "the registered version (or why none)")

# --------------------------------------------------------------------------- every stage
STAGE_RESULT = Artifact(
    "stage_result",
    "cache_dir",
    "runs/{stage}.json",
    "json",
    "what `medclf <stage>` returned, or its structured error (the orchestrator reads this)",
)
PROJECT_LOCK = Artifact(
    "project_lock",
    "cache_dir",
    "locks/project.lock",
    "json",
    "flock'd by whoever holds the checkout (a flow run, a `medclf <stage>`): its pid, host, "
    "what, since and the token its stage processes inherit (medclf/infra/lock.py)",
)
STAGE_LOCK = Artifact(
    "stage_lock",
    "cache_dir",
    "locks/stage.lock",
    "json",
    "flock'd by the `medclf <stage>` process now running (outlives a killed flow)",
)


ENTRIES: tuple[Artifact, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, Artifact))
"""Every entry, in declaration order."""


# --------------------------------------------------------------------------- MLflow run artifacts
# Where files lie among a training run's MLflow artifacts (the version page links them; `run_links`).
RUN_CARD = "review/model_card.md"
"""The model card (markdown), logged by register."""
RUN_CARD_JSON = "review/model_card.json"
"""The same card as data, beside it."""
RUN_CI_TABLE = "evaluate/metrics_ci.json"
"""Every test metric with its 95 % CI, logged by evaluate as an MLflow table."""
RUN_LINEAGE = "lineage"
"""The folder holding the `dvc.lock` the version was built from."""
