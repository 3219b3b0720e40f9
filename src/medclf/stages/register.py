"""register: a model that passed the gates becomes a registry version with the alias `challenger`.

What is registered is the pyfunc in `medclf.serving` (raw images in, probabilities + label at
the validation-chosen threshold out), with the `.keras` file as its artifact: that is what
`mlflow models serve` and `medclf predict` load. The plain Keras flavour is logged beside it
(`keras_model_uri` tag) for `mlflow.keras.load_model`.

Guarantees:
* refuses unless `gates.json` passed *for this very model file* and the champion it was compared
  with is still the champion (a gate result is evidence about one model and one champion);
* idempotent: a version already registered for (training run, model sha256) is reused;
* all-or-nothing: if anything fails after the version exists (alias, readiness), the version,
  its logged models and a registered model created by this call are deleted again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from medclf import catalog as c
from medclf import registry as R
from medclf.config import Settings
from medclf.io import file_digest
from medclf.model_card import (
    CARD_ARTIFACT,
    CARD_JSON_ARTIFACT,
    model_card,
    model_card_json,
    run_links,
    version_description,
)
from medclf.pipeline import declared
from medclf.tracking import final_step

log = logging.getLogger(__name__)

PYFUNC_NAME, KERAS_NAME = "medclf_pyfunc", "keras_model"
_REQUIREMENTS = ("mlflow", "keras", "tensorflow-cpu", "tensorflow", "numpy", "pandas", "pillow", "pydicom",
                 "scikit-learn", "pydantic")
_TAG_MAX = 5000
# Gated metrics get their own full-precision tag, read by the non-inferiority gate.
_METRIC_TAGS = ("f1", "recall", "specificity", "roc_auc")
# Searchable 3-decimal copies for the registry's version table (`tags.auc > '0.95'` style filters).
_SHORT_TAGS = (("auc", "roc_auc"), ("sensitivity", "recall"), ("specificity", "specificity"), ("f1", "f1"))


class RegisterRefused(RuntimeError):
    """Registration is not allowed (failed/missing gates, changed model or champion)."""

    transient = False  # refused again on every attempt (medclf.cli.is_transient)


class RegisterError(RuntimeError):
    """Registration failed part-way; anything it had created was removed again."""


# ----------------------------------------------------------------------------- pure helpers
def pip_requirements() -> list[str]:
    """Pinned runtime requirements of the pyfunc (skips requirement inference, which imports TF twice)."""
    out = []
    for dist in _REQUIREMENTS:
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def version_tags(gates: dict[str, Any], metrics_doc: dict[str, Any], meta: dict[str, Any], train_run: dict[str, Any],
                 provenance: dict[str, str]) -> dict[str, str]:
    """The version's tags: short scalars a reviewer can read and search (`gates = 'passed'`, `auc`,
    `raw_data_md5`). The documents behind them (gates.json, metrics.json, the CI table) are artifacts
    of the training run; the machine-read `metric.*` and `threshold` tags keep full precision."""
    test = metrics_doc["test"]
    tags = {
        R.TAG_TRAIN_RUN: str(train_run["run_id"]), R.TAG_MODEL_SHA: gates["model_sha256"],
        R.TAG_TEST_DIGEST: gates["test_set_digest"], R.TAG_THRESHOLD: repr(float(gates["threshold"])),
        "threshold_rule": str(gates["threshold_rule"]), "threshold_source": "validation",
        "gates_passed": "true", "gates": "passed",
        "non_inferiority": _ni_word(gates.get("non_inferiority") or {}),
        R.TAG_CLASSES: json.dumps(meta["classes"]), "positive_class": str(meta["positive_class"]),
        "image_size": str(meta["image_size"]), "channels": str(meta["channels"]),
        "backbone": str(train_run.get("backbone", "")),
        **{f"{R.TAG_METRIC}{k}": repr(float(test[k])) for k in _METRIC_TAGS if test.get(k) is not None},
        **{k: f"{float(test[m]):.3f}" for k, m in _SHORT_TAGS if test.get(m) is not None},
        **{k: v for k, v in provenance.items() if v},
    }
    return {k: str(v)[:_TAG_MAX] for k, v in tags.items()}


def _ni_word(ni: dict[str, Any]) -> str:
    if ni.get("skipped") or not ni.get("entries"):
        return "not checked"
    return "passed" if all(e.get("passed") for e in ni["entries"]) else "failed"


def check_gates(gates: dict[str, Any], model_sha256: str, gates_file: Path) -> None:
    """Refuse unless the gate report passed and is about this exact model file."""
    if not gates.get("passed"):
        raise RegisterRefused(f"{gates_file}: the release gates did not pass, nothing registered: "
                              + "; ".join(gates.get("failures") or ["no gate result"]))
    if gates.get("model_sha256") != model_sha256:
        raise RegisterRefused(f"{gates_file}: it evaluated a different model file than the current one "
                              "(model changed after evaluation); re-run `medclf evaluate`")


# ----------------------------------------------------------------------------- MLflow edge
def _png_example(meta: dict[str, Any]) -> Any:
    """A blank image of the model's size as base64 PNG: the input example the pyfunc validates."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from medclf.serving import INPUT_COLUMN, encode_file

    s, c = int(meta["image_size"]), int(meta["channels"])
    img = np.zeros((s, s) if c == 1 else (s, s, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [encode_file(buf.getvalue())]})


def _log_models(settings: Settings, model_file: Path, meta: dict[str, Any], gates: dict[str, Any],
                run_id: str, step: int, card: str, card_json: dict[str, Any]) -> tuple[Any, Any]:
    """Log the serving pyfunc (with input example + signature) and the Keras flavour into the run."""
    import mlflow
    import mlflow.keras
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from medclf.serving import KERAS_ARTIFACT, MedclfModel, ServingConfig, load_keras, signature

    cfg = ServingConfig(classes=list(meta["classes"]), positive_class=str(meta["positive_class"]),
                        threshold=float(gates["threshold"]), image_size=int(meta["image_size"]),
                        channels=int(meta["channels"]), resize=settings.ingest.resize,
                        min_size=settings.validation.min_size, max_aspect_ratio=settings.validation.max_aspect_ratio,
                        max_pixels=settings.ingest.max_image_pixels, modality=settings.ingest.modality)
    reqs = pip_requirements()
    # MLflow prints "View run ..." links to stdout when the run ends; `medclf register` prints its
    # JSON result there, so those lines go to stderr instead.
    # MLflow refuses to reopen a run of another experiment than the process's active one (set by an
    # earlier `mlflow.set_experiment` in this process, or MLFLOW_EXPERIMENT_NAME/_ID): take the run's own
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with contextlib.redirect_stdout(sys.stderr), mlflow.start_run(run_id=run_id):
        # input_example works for the pyfunc flavour (mlflow.keras.log_model(input_example=...) raised
        # FileNotFoundError in 3.17.2); MLflow runs predict() on it, so a broken model fails here.
        pyfunc = mlflow.pyfunc.log_model(
            name=PYFUNC_NAME, python_model=MedclfModel(), artifacts={KERAS_ARTIFACT: str(model_file)},
            model_config=cfg.to_dict(), signature=signature(cfg.classes), input_example=_png_example(meta),
            pip_requirements=reqs, step=step)  # step: links the test metrics evaluate logged there
        mlflow.log_text(card, CARD_ARTIFACT)
        mlflow.log_dict(card_json, CARD_JSON_ARTIFACT)
        if Path("dvc.lock").is_file():  # the run's full record: raw-data hash, every stage's inputs/outputs
            mlflow.log_artifact("dvc.lock", artifact_path="lineage")
        try:
            s, c, k = cfg.image_size, cfg.channels, len(cfg.classes)
            sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, s, s, c))]),
                                 outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))]))
            keras = mlflow.keras.log_model(load_keras(str(model_file)), name=KERAS_NAME, signature=sig,
                                           pip_requirements=reqs, step=step)
        except Exception:
            _delete_logged(pyfunc)
            raise
    return pyfunc, keras


def _delete_logged(*infos: Any) -> None:
    from mlflow import MlflowClient

    for info in infos:
        if info is None:
            continue
        try:
            MlflowClient().delete_logged_model(info.model_id)
        except Exception as err:  # noqa: BLE001 - best-effort cleanup must not mask the real error
            log.warning("could not delete logged model %s: %s", info.model_id, err)


def _same_model(mv: Any, run_id: str, sha: str, inputs: dict[str, str] | None) -> bool:
    """`mv` is this exact model file (sha256), from this run or evaluated on the same inputs."""
    tags = mv.tags or {}
    if tags.get(R.TAG_MODEL_SHA) != sha:
        return False
    return mv.run_id == run_id or bool(inputs and all(tags.get(k) == v for k, v in inputs.items()))


def _search(cl: Any, name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return list(cl.search_model_versions(f"name = '{name}'"))
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def _existing(cl: Any, name: str, run_id: str, sha: str, inputs: dict[str, str] | None = None) -> Any | None:
    """A READY version of `name` for this exact model file: from this run, or (registry hygiene) from any
    run when it was also evaluated on the same inputs (every key of `inputs` equal among its tags).

    A forced rerun that reproduces the same bytes from the same data is the same model; registering
    it again would show a reviewer two versions with identical figures.
    """
    ready = [mv for mv in _search(cl, name) if mv.status == "READY"]
    same_run = [mv for mv in ready if mv.run_id == run_id and _same_model(mv, run_id, sha, None)]
    same_inputs = [mv for mv in ready if _same_model(mv, run_id, sha, inputs)]
    hits = same_run or same_inputs
    if not hits:
        return None
    # a search result carries no aliases (MLflow 3.17): the version itself says whether it is the champion
    return cl.get_model_version(name, min(hits, key=lambda mv: int(mv.version)).version)


def _first_of_model(cl: Any, name: str, run_id: str, sha: str, inputs: dict[str, str] | None) -> Any | None:
    """The lowest-numbered version of this model that is not a failed registration (READY or still pending).

    The race it settles: two `medclf register` of one training run (two checkouts, two hosts: the project
    lock is per checkout) both find no version, and both create one. The registry numbers versions
    max + 1 in the transaction that creates them, so a version N was committed before version N+1 was;
    the creator of N+1, searching after its own create, always sees N. Each creator keeps its version
    only if it is the lowest of its model: exactly one survives, whatever the interleaving."""
    same = [mv for mv in _search(cl, name)
            if mv.status != "FAILED_REGISTRATION" and _same_model(mv, run_id, sha, inputs)]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def _wait_ready(cl: Any, name: str, version: str, timeout: float = 120) -> None:
    t0 = time.time()
    while True:
        mv = cl.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.time() - t0 > timeout:
            raise RegisterError(f"{name} version {version} did not become READY ({mv.status}: "
                                f"{mv.status_message})")
        time.sleep(0.5)


def _ensure_registered_model(cl: Any, name: str) -> bool:
    """Create the registered model if needed; True when this call created it."""
    from mlflow.exceptions import MlflowException

    try:
        cl.get_registered_model(name)
        return False
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        cl.create_registered_model(name, description="medclf image classifier (research use only; "
                                                     "not for clinical decisions without regulatory clearance)")
    except MlflowException as err:  # a concurrent `medclf register` created it first: use it, it is not ours
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    return True


def _set_alias(cl: Any, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`. Two processes setting the same alias at once can make the MLflow server
    fail one of them (a unique-key conflict, BAD_REQUEST, seen with SQLite); that is no failure when the
    alias now points where this call wanted it. A refused alias (INVALID_PARAMETER_VALUE: `latest` is
    reserved, and reads as the newest version) is never a race."""
    from mlflow.exceptions import MlflowException

    try:
        cl.set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "INVALID_PARAMETER_VALUE":
            raise
        now = R.alias_version(cl, name, alias)
        if now is None or str(now.version) != str(version):
            raise


def _create_version(cl: Any, settings: Settings, model_file: Path, meta: dict[str, Any], gates: dict[str, Any],
                    tags: dict[str, str], train_run: dict[str, Any], metrics_doc: dict[str, Any],
                    inputs: dict[str, str] | None = None) -> tuple[Any, bool]:
    """Log, register, tag and alias as one unit: any failure removes what this call created.

    Returns (version, True), or (the other version, False) when a concurrent registration of the same
    model (`_first_of_model`) got the lower number: this call's duplicate and its logged models are then
    deleted again, before any alias points at it."""
    name, alias = settings.registry.model_name, settings.registry.alias
    created_model = _ensure_registered_model(cl, name)
    infos: tuple[Any, Any] = (None, None)
    mv: Any = None
    run_id = str(train_run["run_id"])
    vfile = c.VALIDATION_SUMMARY.path(settings.paths)
    validation = c.VALIDATION_SUMMARY.load(settings.paths) if vfile.exists() else None
    prov = {**tags, "positive_class": str(meta["positive_class"])}
    links = run_links(settings.mlflow.resolved_uri(), train_run.get("experiment_id"), run_id)
    desc = version_description(gates, metrics_doc, prov, run_id, validation, links)
    splits = {k: int(v) for k, v in ((validation or {}).get("splits") or {}).items()}
    train = settings.train.model_dump(mode="json")
    card = model_card(version_description(gates, metrics_doc, prov, run_id, validation), meta, prov, train_run,
                      splits, train)
    card_json = model_card_json(meta, prov, train_run, splits, train, gates, metrics_doc, validation)
    try:
        infos = _log_models(settings, model_file, meta, gates, run_id, final_step(train_run), card, card_json)
        pyfunc, keras = infos
        tags = {**tags, "keras_model_uri": keras.model_uri}
        mv = cl.create_model_version(name, source=pyfunc.model_uri, run_id=run_id, tags=tags, description=desc,
                                     model_id=pyfunc.model_id)
        _wait_ready(cl, name, mv.version)
        first = _first_of_model(cl, name, run_id, tags[R.TAG_MODEL_SHA], inputs)
        if first is not None and first.version != mv.version:
            log.warning("register: %s version %s is the same model, registered concurrently; removing the "
                        "duplicate version %s", name, first.version, mv.version)
            _rollback_partial(cl, name, mv, infos, created_model=False)
            _wait_ready(cl, name, first.version)
            return cl.get_model_version(name, first.version), False
        _set_alias(cl, name, alias, mv.version)
        return cl.get_model_version(name, mv.version), True
    except Exception as err:
        _rollback_partial(cl, name, mv, infos, created_model)
        raise RegisterError(f"registering {name} failed and was rolled back "
                            f"(no version left behind): {type(err).__name__}: {err}") from err


def _rollback_partial(cl: Any, name: str, mv: Any, infos: tuple[Any, Any], created_model: bool) -> None:
    try:
        if mv is not None:
            cl.delete_model_version(name, mv.version)
        if created_model and not cl.search_model_versions(f"name = '{name}'"):
            cl.delete_registered_model(name)
    except Exception as cleanup_err:  # noqa: BLE001 - report, but keep the original error
        log.error("cleanup after failed registration incomplete: %s", cleanup_err)
    _delete_logged(*infos)


def _provenance(settings: Settings, train_run: dict[str, Any]) -> dict[str, str]:
    from medclf.tracking import data_version, git_commit, params_hash, raw_data_version

    dv = data_version(settings.paths.ingest_dir)
    raw = train_run.get("raw_data") or raw_data_version(settings.paths.raw_data)
    return {"raw_data_md5": str(raw.get("md5") or ""), "raw_data_nfiles": str(raw.get("nfiles") or ""),
            "raw_data": str(raw.get("path") or ""), "git_commit": git_commit() or "", "train_git_commit": str(train_run.get("git_commit") or ""),
            "data_digest": dv.get("data_digest", ""), "dvc_md5": dv.get("dvc_md5", ""),
            "params_hash": params_hash(settings.ingest, settings.augment, settings.train, settings.evaluate)}


@declared
def run(settings: Settings, attempts: int = 5) -> dict[str, Any]:
    paths, reg = settings.paths, settings.registry
    gates_file, model_file = c.GATES.path(paths), c.MODEL.path(paths)
    run_file, metrics_file = c.TRAIN_RUN.path(paths), c.METRICS.path(paths)
    for f, stage in ((gates_file, "evaluate"), (metrics_file, "evaluate"), (model_file, "train"),
                     (run_file, "train")):
        if not f.exists():
            raise RegisterRefused(f"{f}: missing (run `medclf {stage}` first); nothing registered")
    gates, sha = c.GATES.load(paths), file_digest(model_file)
    check_gates(gates, sha, gates_file)
    train_run = c.TRAIN_RUN.load(paths)
    if not train_run.get("run_id"):
        raise RegisterRefused(f"{run_file}: no run_id; the training run to log the model into is unknown")
    run_id = str(train_run["run_id"])
    cl = R.client(settings, attempts)  # reachability check with retries, then a clear error
    try:
        cl.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - any lookup failure means we cannot link the version
        raise RegisterRefused(f"{run_file}: training run {run_id} not found at {settings.mlflow.resolved_uri()} "
                              f"({type(err).__name__}); nothing registered") from None
    champ = R.alias_version(cl, reg.model_name, "champion")
    evaluated = (gates.get("champion") or {}).get("version")
    if (champ.version if champ else None) != evaluated:
        raise RegisterRefused(f"{gates_file}: evaluated against champion {evaluated or 'none'}, but the champion "
                              f"is now {champ.version if champ else 'none'}; re-run `medclf evaluate`")
    provenance = _provenance(settings, train_run)
    inputs = {k: v for k, v in (("test_set_digest", str(gates.get("test_set_digest") or "")),
                                 ("raw_data_md5", provenance.get("raw_data_md5", "")),
                                 ("data_digest", provenance.get("data_digest", ""))) if v}
    if "test_set_digest" not in inputs or "data_digest" not in inputs:
        inputs = {}  # too little known about the inputs to call two runs identical
    mv = _existing(cl, reg.model_name, run_id, sha, inputs)
    created, note = False, ""
    if mv is None:
        meta, metrics_doc = c.CLASSES.load(paths), c.METRICS.load(paths)
        tags = version_tags(gates, metrics_doc, meta, train_run, provenance)
        mv, created = _create_version(cl, settings, model_file, meta, gates, tags, train_run, metrics_doc, inputs)
        if not created:
            note = "registered concurrently by another `medclf register` of the same model; reused"
    elif mv.run_id != run_id:
        note = f"identical model file and inputs to version {mv.version} (run {mv.run_id}); not registered again"
    else:
        note = "already registered for this run; reused"
    if not created:
        if "champion" in (mv.aliases or []):
            note += "; it is the champion, so no challenger alias was set"
        elif reg.alias not in (mv.aliases or []):
            _set_alias(cl, reg.model_name, reg.alias, mv.version)
    out = {"model_name": reg.model_name, "version": int(mv.version), "alias": reg.alias, "run_id": run_id,
           "model_uri": f"models:/{reg.model_name}/{mv.version}",
           "alias_uri": f"models:/{reg.model_name}@{reg.alias}", "created": created,
           **({"note": note} if note else {})}
    c.REGISTER.save(paths, out)
    log.info("register: %s version %s (%s) %s", reg.model_name, mv.version, reg.alias, note or "created")
    return out
