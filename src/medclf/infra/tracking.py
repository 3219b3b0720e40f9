"""The thin edge to MLflow, git and DVC metadata (provenance for every run)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from medclf.infra import catalog
from medclf.infra.io import hash_update

log = logging.getLogger(__name__)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached (after retries)."""

    transient = True  # a later attempt may find it up (medclf.cli.is_transient)


RETRY_ENV = ("MEDCLF_MLFLOW_ATTEMPTS", "MEDCLF_MLFLOW_RETRY_DELAY")
"""Environment overrides of the reachability retries: attempts (at least 1) and the first delay in seconds."""


def wait_for_server(uri: str, attempts: int = 5, delay: float = 1.0) -> None:
    """Fail fast and clearly when an http(s) tracking server is down, instead of a deep stack trace.

    `attempts` probes of `/health`, `delay`, 2·`delay`, 4·`delay`… apart (exponential backoff), then a
    TrackingUnavailable naming the server. MEDCLF_MLFLOW_ATTEMPTS / MEDCLF_MLFLOW_RETRY_DELAY override both.
    """
    if not uri.startswith(("http://", "https://")):
        return
    attempts = max(1, int(os.environ.get(RETRY_ENV[0]) or attempts))
    delay = float(os.environ.get(RETRY_ENV[1]) or delay)
    url = uri.rstrip("/") + "/health"
    last: Exception | None = None
    for i in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = err
        if i < attempts - 1:
            log.warning(
                "MLflow server at %s unreachable (attempt %d/%d): retrying in %.1f s",
                uri,
                i + 1,
                attempts,
                delay * (2**i),
            )
            time.sleep(delay * (2**i))
    raise TrackingUnavailable(
        f"MLflow tracking server at {uri} is unreachable after {attempts} attempts ({last}). "
        "Start it with `bash mlflow/server.sh start` or set MLFLOW_TRACKING_URI."
    )


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def configure(tracking_uri: str, experiment: str | None = None, attempts: int = 5) -> str:
    """Point the mlflow client at the server; returns the experiment id (if one is named)."""
    import mlflow

    wait_for_server(tracking_uri, attempts=attempts)
    mlflow.set_tracking_uri(tracking_uri)
    if experiment:
        exp = mlflow.set_experiment(experiment)
        if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            # MLflow 3 opens an experiment without this tag on its GenAI overview; with it, on the runs table
            mlflow.MlflowClient(tracking_uri).set_experiment_tag(
                exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return str(exp.experiment_id)
    return ""


@contextlib.contextmanager
def mlflow_uri(uri: str) -> Iterator[None]:
    """MLflow's *global* tracking and registry URIs set to `uri` for one block, then restored, with the
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI environment variables that setting them also writes.

    `models:/` URIs resolve against the global registry, so loading a registered model needs it set; left
    set, it redirected every later `MlflowClient(tracking_uri=other)` of the process, and every subprocess
    it started, to this server's registry (a test saw "Registered Model ... not found" on its own server)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, [os.environ.get(n) for n in names])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        for name, value in zip(names, saved[2], strict=True):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def final_step(train_run: dict[str, Any]) -> int:
    """The step test metrics are logged at (evaluate) and the models are logged with (register): one past
    the last training epoch, so the logged model links the final figures, not epoch 0's training curve."""
    return int(train_run.get("epochs_run") or 0)


# Files a run itself rewrites: DVC's records of what ran. They are lineage *outputs* (logged with the
# model), so they do not make the code "dirty". See docs/ORCHESTRATION.md, "dvc.lock and the git commit tag".
RUN_RECORDS = (
    "dvc.lock",
    "*.dvc",
    *(a.rel for a in (catalog.INGEST_METRICS, catalog.VALIDATE_METRICS, catalog.EVALUATE_METRICS)),
)
"""dvc.lock, .dvc files, and the headline metrics files (committed, so that `dvc metrics diff HEAD~1`
compares two runs; the rest of reports/ is git-ignored)."""


def git_commit(cwd: str | Path = ".") -> str | None:
    """HEAD, with `-dirty` only when tracked code or config differs from it (index or work tree).

    `dvc.lock`, `.dvc` files and the headline metrics files are excluded: DVC rewrites (and, with autostage,
    stages) them on
    every run, so counting them would tag every fresh-clone run `-dirty` although the code that ran is
    exactly HEAD. Their content is recorded separately (the raw-data hash tag, the logged dvc.lock).
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return None
        excludes = [f":(exclude,glob)**/{pat}" for pat in RUN_RECORDS]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes],
            check=False,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def dir_digest(path: str | Path) -> str:
    """A content hash of a file or directory (names + bytes), stable across machines."""
    path = Path(path)
    h = hashlib.md5(usedforsecurity=False)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        hash_update(h, f)
    return h.hexdigest()


def _lock(lock: str | Path) -> dict[str, Any]:
    import yaml

    lock = Path(lock)
    if not lock.exists():
        return {}
    return yaml.safe_load(lock.read_text()) or {}


def dvc_lock_hash(out_path: str | Path, lock: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for an output in dvc.lock, if the stage ran under DVC."""
    want = str(Path(out_path))
    for stage in (_lock(lock).get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if str(Path(out.get("path", ""))) == want:
                md5: str | None = out.get("md5")
                return md5
    return None


def _same_location(a: str, b: str, base: Path) -> bool:
    if a.startswith("s3://") or b.startswith("s3://"):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.normpath(base / a) == os.path.normpath(base / b)


def raw_data_version(raw_data: str, lock: str | Path = "dvc.lock") -> dict[str, Any]:
    """The hash DVC recorded for the raw source when ingest last ran: {md5, nfiles, size, path}.

    This is the hash of exactly the images the current ingest output (and so any model trained on
    it) was made from: DVC writes it in the same transaction as ingest's outputs. {} when ingest has
    not run under DVC (e.g. `medclf ingest` by hand).
    """
    lock = Path(lock)
    ingest = ((_lock(lock).get("stages") or {}).get("ingest")) or {}
    for dep in ingest.get("deps", []) or []:
        if _same_location(str(dep.get("path", "")), raw_data, lock.resolve().parent):
            md5 = dep.get("md5") or dep.get("etag") or dep.get("checksum")
            return {"path": raw_data, "md5": md5, "nfiles": dep.get("nfiles"), "size": dep.get("size")}
    return {}


def data_version(path: str | Path) -> dict[str, str]:
    """Dataset version: DVC's md5 when available, and always our own content digest."""
    out = {"data_digest": dir_digest(path)}
    dvc = dvc_lock_hash(path)
    if dvc:
        out["dvc_md5"] = dvc
    return out


def params_hash(*sections: BaseModel) -> str:
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flat_params(section: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten a settings section for mlflow.log_params (values stringified, MLflow limit 6000)."""
    out: dict[str, Any] = {}
    for k, v in section.model_dump(mode="json").items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{key}.{k2}"] = str(v2)[:500]
        else:
            out[key] = str(v)[:500]
    return out


# ----------------------------------------------------------------------------- the run's facts (issue 27)
TRAIN, VAL, TEST, TEST_T050, SYSTEM = "train/", "val/", "test/", "test_t050/", "system/"
METRIC_PREFIXES = (TRAIN, VAL, TEST, TEST_T050, SYSTEM)
"""Every metric of a training run is under one of these groups (MLflow's UI charts each group as a section):
`train/` the training set (per epoch: `train/loss`, `train/auc`, `train/lr`; once: `train/epochs_run`,
`train/temperature`), `val/` the validation split (per epoch `val/loss`, `val/auc`; `val/best_auc`; evaluate's
operating point `val/sensitivity` ...), `test/` evaluate's test metrics at the registered threshold (metrics.json
names: `test/roc_auc`, `test/f1`, `test/threshold`), `test_t050/` the same at the fixed 0.5 threshold, and
`system/` telemetry (`system/epoch_seconds`, `system/images_per_second` ...). So `auc` means one thing per
group: `train/auc` is Keras' running AUC on the training batches, `val/auc` the exact AUC on val, `test/roc_auc`
the test AUC the version's `metric.roc_auc` tag carries."""

_EVALUATE_GROUPS = (("test_t050_", TEST_T050), ("test_", TEST), ("val_", VAL))


def evaluate_metric_key(flat: str) -> str:
    """The grouped run-metric name of one of `medclf.evaluation.report.run_metrics`'s flat names:
    `test_f1` -> `test/f1`, `test_t050_f1` -> `test_t050/f1`, `val_f1` -> `val/f1`, `decision_threshold` ->
    `test/threshold`."""
    if flat == "decision_threshold":
        return f"{TEST}threshold"
    for start, group in _EVALUATE_GROUPS:
        if flat.startswith(start):
            return group + flat[len(start) :]
    return TEST + flat


def release_params(settings: Any) -> dict[str, str]:
    """The evaluate settings that decide a release, as run params: the threshold rule and its target sensitivity,
    every gate bound and the non-inferiority margin (`evaluate.gates.*`), the bootstrap size and seed, and the
    external sets' names (`evaluate.external`, only when there are some)."""
    ev = settings.evaluate
    out = {
        "evaluate.threshold_rule": str(ev.threshold_rule),
        "evaluate.target_sensitivity": str(ev.target_sensitivity),
        "evaluate.bootstrap": str(ev.bootstrap),
        "evaluate.seed": str(ev.seed),
        **flat_params(ev.gates, "evaluate.gates."),
    }
    if ev.external:
        out["evaluate.external"] = ",".join(e.name for e in ev.external)
    return out


def ingest_params(ingest: Any) -> dict[str, str]:
    """The ingest settings that decide what the splits hold: the split seed and fractions, the image size,
    channels and resize, and how images are grouped by patient (the source's group column or patient regex)."""
    src = ingest.source
    return {
        "ingest.splits.seed": str(ingest.splits.seed),
        "ingest.splits.val_fraction": str(ingest.splits.val_fraction),
        "ingest.splits.test_fraction": str(ingest.splits.test_fraction),
        "ingest.splits.use_official": str(ingest.splits.use_official),
        "ingest.image_size": str(ingest.image_size),
        "ingest.channels": str(ingest.channels),
        "ingest.resize": str(ingest.resize),
        "ingest.source.kind": str(src.kind),
        "ingest.source.group_column": str(src.group_column),
        "ingest.source.patient_id_regex": str(src.patient_id_regex or ""),
    }


_PARAM_KEY = re.compile(r"[^\w\-. :/]")


def param_key(key: str) -> str:
    """`key` as a valid MLflow param/tag name: a gate bound on a class, `evaluate.gates.bounds.recall[VIRUS]`, is
    `evaluate.gates.bounds.recall.VIRUS`; any other character MLflow refuses becomes `_`."""
    return _PARAM_KEY.sub("_", re.sub(r"\[([^\]]*)\]", r".\1", key))


def log_params_once(cl: Any, run_id: str, params: dict[str, Any]) -> dict[str, str]:
    """Log `params` into run `run_id` with MlflowClient `cl`, never changing one (MLflow refuses that: "Changing
    param values is not allowed"). A key the run does not hold is logged as a param. A key it holds with another
    value (`dvc repro` re-running evaluate with a changed `evaluate.target_sensitivity` on the same training run,
    or a resumed run) keeps its param, and the value used now is set as a *tag* of the same name, which the run
    page shows beside it; the tag is deleted again once the value equals the param. Returns those tags."""
    from mlflow.entities import Param, RunTag

    run = cl.get_run(run_id)
    held, tagged = run.data.params, run.data.tags
    values = {param_key(k): str(v)[:6000] for k, v in params.items() if v is not None}
    new = [Param(k, v) for k, v in values.items() if k not in held]
    changed = {k: v for k, v in values.items() if k in held and held[k] != v}
    for i in range(0, len(new), 100):
        cl.log_batch(run_id, params=new[i : i + 100])
    if changed:
        log.warning(
            "run %s already holds other values of %s (MLflow params are immutable): the values used now are tags",
            run_id,
            ", ".join(sorted(changed)),
        )
        cl.log_batch(run_id, tags=[RunTag(k, v) for k, v in changed.items()])
    for k, v in values.items():
        if k in held and held[k] == v and k in tagged:
            cl.delete_tag(run_id, k)
    return changed


def split_digest(ingest_dir: str | Path, split: str) -> str:
    """The content digest of one ingest split: sha256 over its images and labels files, as evaluate's
    `test_set_digest` (`versions.TAG_TEST_DIGEST`) is for the test split. So the train, val and test datasets of a
    run each carry their own digest (they all carried the whole ingest folder's); "" when the split is missing."""
    from medclf.infra.io import file_digest

    files = [catalog.IMAGES.under(Path(ingest_dir), split=split), catalog.LABELS.under(Path(ingest_dir), split=split)]
    return file_digest(*files) if all(f.is_file() for f in files) else ""
