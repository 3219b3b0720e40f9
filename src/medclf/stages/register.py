"""register: a model that passed the gates becomes a registry version with the alias `challenger`.

What is registered is the pyfunc in `medclf.release.serving` (raw images in, probabilities and the task's
decision out: the label at the validation-chosen threshold for a binary task, the argmax or ordinal grade with its
flags for a K-class task; docs/TASKS.md), with the `.keras` file as its artifact: that is what
`mlflow models serve` and `medclf predict` load. The plain Keras flavour is logged beside it
(`keras_model_uri` tag) for `mlflow.keras.load_model`.

Guarantees:
* refuses unless `gates.json` passed *for this very model file* and the champion it was compared
  with is still the champion (a gate result is evidence about one model and one champion);
* idempotent: a version already registered for (training run, model sha256) is reused;
* all-or-nothing: if anything fails after the version exists (alias, readiness), the version,
  its logged models and a registered model created by this call are deleted again.

This module decides and says what is registered; the version protocol that does it (finding a version,
creating one all-or-nothing, settling a concurrent registration, aliases) is `medclf.release.versions`'s.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from medclf.config import Settings
from medclf.config.vocabulary import HEADLINE, KCLASS_HEADLINE, MULTILABEL_HEADLINE
from medclf.infra import catalog
from medclf.infra.io import file_digest
from medclf.infra.tracking import final_step
from medclf.pipeline import declared
from medclf.release import registry, versions
from medclf.release.model_card import (
    model_card,
    model_card_json,
    run_links,
    version_description,
)
from medclf.release.versions import RegisterError as RegisterError  # raised by `run`, re-exported

log = logging.getLogger(__name__)

PYFUNC_NAME, KERAS_NAME = "medclf_pyfunc", "keras_model"
_REQUIREMENTS = (
    "mlflow",
    "keras",
    "tensorflow-cpu",
    "tensorflow",
    "numpy",
    "pandas",
    "pillow",
    "pydicom",
    "scikit-learn",
    "pydantic",
)
_TAG_MAX = 5000


class RegisterRefused(RuntimeError):
    """Registration is not allowed (failed/missing gates, changed model or champion)."""

    transient = False  # refused again on every attempt (medclf.cli.is_transient)


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


def version_tags(
    gates: dict[str, Any],
    metrics_doc: dict[str, Any],
    meta: dict[str, Any],
    train_run: dict[str, Any],
    provenance: dict[str, str],
) -> dict[str, str]:
    """The version's tags: one short scalar per fact, that a reviewer can read and search (`gates = 'passed'`,
    `metric.roc_auc > '0.95'`, `raw_data_md5`). No JSON, no long decimals: numbers have `versions.TAG_DIGITS`
    decimals (the non-inferiority gate reads the `metric.*` ones, `registry.version_metrics`). The documents
    behind them (gates.json, metrics.json with the exact threshold, the CI table) are artifacts of the training
    run, and the served model keeps its exact threshold in its own config (`serving.ServingConfig`).

    A binary version carries its threshold, rule and positive class, and its headline test metrics
    (`vocabulary.HEADLINE`). A multi-class, ordinal or multi-label version carries its `task` and `decision_rule`
    instead (no threshold, no positive class), and its headline and gated test metrics."""
    test, kind = metrics_doc["test"], str(gates.get("task", "binary"))
    if kind == "binary":
        metric_keys: dict[str, None] = dict.fromkeys(HEADLINE)
        specific = {
            versions.TAG_THRESHOLD: versions.tag_number(gates["threshold"]),
            "threshold_rule": str(gates["threshold_rule"]),
            "positive_class": str(meta["positive_class"]),
        }
    else:
        headline = (
            MULTILABEL_HEADLINE
            if kind == "multilabel"
            else KCLASS_HEADLINE + (("qwk", "mae") if kind == "ordinal" else ())
        )
        metric_keys = dict.fromkeys([*headline, *(g["metric"] for g in gates.get("gates", []))])
        specific = {"task": kind, "decision_rule": str(gates["threshold_rule"])}
    tags = {
        versions.TAG_TRAIN_RUN: str(train_run["run_id"]),
        versions.TAG_MODEL_SHA: gates["model_sha256"],
        versions.TAG_TEST_DIGEST: gates["test_set_digest"],
        "gates": "passed",
        "non_inferiority": _ni_word(gates.get("non_inferiority") or {}),
        versions.TAG_CLASSES: versions.tag_classes(list(meta["classes"])),
        "image_size": str(meta["image_size"]),
        "channels": str(meta["channels"]),
        "backbone": str(train_run.get("backbone", "")),
        **specific,
        **{
            f"{versions.TAG_METRIC}{k}": versions.tag_number(test[k])
            for k in metric_keys
            if isinstance(test.get(k), (int, float)) and math.isfinite(float(test[k]))
        },
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
        raise RegisterRefused(
            f"{gates_file}: the release gates did not pass, nothing registered: "
            + "; ".join(gates.get("failures") or ["no gate result"])
        )
    if gates.get("model_sha256") != model_sha256:
        raise RegisterRefused(
            f"{gates_file}: it evaluated a different model file than the current one "
            "(model changed after evaluation); re-run `medclf evaluate`"
        )


# ----------------------------------------------------------------------------- logging the models
def _png_example(meta: dict[str, Any]) -> Any:
    """A blank image of the model's size as base64 PNG: the input example the pyfunc validates."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from medclf.release.serving import INPUT_COLUMN, encode_file

    s, c = int(meta["image_size"]), int(meta["channels"])
    img = np.zeros((s, s) if c == 1 else (s, s, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [encode_file(buf.getvalue())]})


def _log_models(
    settings: Settings,
    model_file: Path,
    meta: dict[str, Any],
    gates: dict[str, Any],
    run_id: str,
    step: int,
    card: str,
    card_json: dict[str, Any],
) -> tuple[Any, Any]:
    """Log the serving pyfunc (with input example + signature) and the Keras flavour into the run."""
    import mlflow
    import mlflow.keras
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, ServingConfig, load_keras, signature, task_keys

    binary = gates.get("task", "binary") == "binary"
    cfg = ServingConfig(
        classes=list(meta["classes"]),
        positive_class=str(meta["positive_class"]),
        threshold=float(gates["threshold"]) if binary else float(gates.get("threshold", 0.5)),  # K-class: unused
        image_size=int(meta["image_size"]),
        channels=int(meta["channels"]),
        resize=settings.ingest.resize,
        min_size=settings.validation.min_size,
        max_aspect_ratio=settings.validation.max_aspect_ratio,
        max_pixels=settings.ingest.max_image_pixels,
        modality=settings.ingest.modality,
        **task_keys(gates),
    )
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
            name=PYFUNC_NAME,
            python_model=MedclfModel(),
            artifacts={KERAS_ARTIFACT: str(model_file)},
            model_config=cfg.to_dict(),
            signature=signature(cfg),
            metadata={"output_schema_version": cfg.schema_version},  # in the MLmodel file (serving.py docstring)
            input_example=_png_example(meta),
            pip_requirements=reqs,
            step=step,
        )  # step: links the test metrics evaluate logged there
        mlflow.log_text(card, catalog.RUN_CARD)
        mlflow.log_dict(card_json, catalog.RUN_CARD_JSON)
        if Path("dvc.lock").is_file():  # the run's full record: raw-data hash, every stage's inputs/outputs
            mlflow.log_artifact("dvc.lock", artifact_path=catalog.RUN_LINEAGE)
        try:
            s, c, k = cfg.image_size, cfg.channels, len(cfg.classes)
            sig = ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, s, s, c))]),
                outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))]),
            )
            keras = mlflow.keras.log_model(
                load_keras(str(model_file)), name=KERAS_NAME, signature=sig, pip_requirements=reqs, step=step
            )
        except Exception:
            versions.delete_logged_models(pyfunc)
            raise
    return pyfunc, keras


def _create_version(
    cl: Any,
    settings: Settings,
    model_file: Path,
    meta: dict[str, Any],
    gates: dict[str, Any],
    tags: dict[str, str],
    train_run: dict[str, Any],
    metrics_doc: dict[str, Any],
    inputs: dict[str, str] | None = None,
) -> tuple[Any, bool]:
    """The version's description and model card (quoting the validation summary when there is one), then the
    registry's all-or-nothing `create_version` with the models `_log_models` logs into the training run."""
    run_id = str(train_run["run_id"])
    vfile = catalog.VALIDATION_SUMMARY.path(settings.paths)
    validation = catalog.VALIDATION_SUMMARY.load(settings.paths) if vfile.exists() else None
    prov = {**tags, "positive_class": str(meta["positive_class"])}
    drawn = [f.stem for f in catalog.EVALUATE_REPORTS.path(settings.paths).glob("*.png")]  # logged to the run
    champion = str((gates.get("champion") or {}).get("version") or "") or None  # the version compared with
    links = run_links(
        settings.mlflow.resolved_uri(),
        train_run.get("experiment_id"),
        run_id,
        drawn,
        settings.mlflow.ui_url,
        settings.registry.model_name,
        champion,
    )
    fitted = train_run.get("calibration")  # train's calibration record: says why a model is not calibrated
    desc = version_description(gates, metrics_doc, prov, run_id, validation, links, fitted)
    splits = {k: int(v) for k, v in ((validation or {}).get("splits") or {}).items()}
    train = settings.train.model_dump(mode="json")
    card = model_card(
        version_description(gates, metrics_doc, prov, run_id, validation, None, fitted, limit=None),  # uncut
        meta,
        prov,
        train_run,
        splits,
        train,
        gates,
    )
    card_json = model_card_json(meta, prov, train_run, splits, train, gates, metrics_doc, validation)
    return versions.create_version(
        cl,
        settings.registry.model_name,
        settings.registry.alias,
        run_id,
        lambda: _log_models(settings, model_file, meta, gates, run_id, final_step(train_run), card, card_json),
        tags,
        desc,
        inputs,
    )


def _provenance(settings: Settings, train_run: dict[str, Any]) -> dict[str, str]:
    from medclf.infra.tracking import data_version, git_commit, params_hash, raw_data_version

    dv = data_version(settings.paths.ingest_dir)
    raw = train_run.get("raw_data") or raw_data_version(settings.paths.raw_data)
    return {
        "raw_data_md5": str(raw.get("md5") or ""),
        "raw_data_nfiles": str(raw.get("nfiles") or ""),
        "raw_data": str(raw.get("path") or ""),
        # the commit the model was trained at (register's own checkout when the training run does not say)
        versions.TAG_GIT_COMMIT: str(train_run.get("git_commit") or git_commit() or ""),
        "data_digest": dv.get("data_digest", ""),
        "dvc_md5": dv.get("dvc_md5", ""),
        "params_hash": params_hash(settings.ingest, settings.augment, settings.train, settings.evaluate),
    }


EXPERIMENT_ENV = "DVC_EXP_NAME"
"""Set by `dvc exp run` for every stage command (`dvc.env`; DVCLive reads it too): the experiment's name."""
FROM_EXPERIMENT_ENV = "MEDCLF_FROM_EXPERIMENT"
"""Set by `medclf register --from-exp NAME` for the register it runs: the applied experiment being released."""


def experiment_name() -> str | None:
    """The DVC experiment this stage runs in, or None for a main-line run (`dvc repro`, the flow, `make retrain`)."""
    return os.environ.get(EXPERIMENT_ENV) or None


def _experiment_not_registered(settings: Settings, cl: Any, run_id: str, experiment: str) -> dict[str, Any]:
    """An experiment is tracked, never registered: its training run is tagged with the experiment's name, the
    registry and its aliases are left as they are, and register.json says why."""
    note = (
        f"DVC experiment {experiment!r} (`dvc exp run`): tracked in MLflow run {run_id}, not registered and no "
        f"alias moved; to release it: `dvc exp apply {experiment}`, commit, then `dvc repro` (or `medclf register`)"
    )
    for key, value in (("dvc.experiment", experiment), ("medclf.registered", "no: DVC experiment run")):
        cl.set_tag(run_id, key, value)
    out = {
        "model_name": settings.registry.model_name,
        "version": None,
        "alias": None,
        "run_id": run_id,
        "created": False,
        "experiment": experiment,
        "note": note,
    }
    catalog.REGISTER.save(settings.paths, out)
    log.info("register: %s", note)
    return out


@declared
def run(settings: Settings, attempts: int = 5) -> dict[str, Any]:
    paths, reg = settings.paths, settings.registry
    gates_file, model_file = catalog.GATES.path(paths), catalog.MODEL.path(paths)
    run_file, metrics_file = catalog.TRAIN_RUN.path(paths), catalog.METRICS.path(paths)
    for f, stage in ((gates_file, "evaluate"), (metrics_file, "evaluate"), (model_file, "train"), (run_file, "train")):
        if not f.exists():
            raise RegisterRefused(f"{f}: missing (run `medclf {stage}` first); nothing registered")
    gates, sha = catalog.GATES.load(paths), file_digest(model_file)
    check_gates(gates, sha, gates_file)
    train_run = catalog.TRAIN_RUN.load(paths)
    if not train_run.get("run_id"):
        raise RegisterRefused(f"{run_file}: no run_id; the training run to log the model into is unknown")
    run_id = str(train_run["run_id"])
    cl = registry.client(settings, attempts)  # reachability check with retries, then a clear error
    try:
        cl.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - any lookup failure means we cannot link the version
        raise RegisterRefused(
            f"{run_file}: training run {run_id} not found at {settings.mlflow.resolved_uri()} "
            f"({type(err).__name__}); nothing registered"
        ) from None
    experiment = experiment_name()
    if experiment:
        return _experiment_not_registered(settings, cl, run_id, experiment)
    champ = versions.alias_version(cl, reg.model_name, "champion")
    evaluated = (gates.get("champion") or {}).get("version")
    if (champ.version if champ else None) != evaluated:
        raise RegisterRefused(
            f"{gates_file}: evaluated against champion {evaluated or 'none'}, but the champion "
            f"is now {champ.version if champ else 'none'}; re-run `medclf evaluate`"
        )
    provenance = _provenance(settings, train_run)
    inputs = {
        k: v
        for k, v in (
            ("test_set_digest", str(gates.get("test_set_digest") or "")),
            ("raw_data_md5", provenance.get("raw_data_md5", "")),
            ("data_digest", provenance.get("data_digest", "")),
        )
        if v
    }
    if "test_set_digest" not in inputs or "data_digest" not in inputs:
        inputs = {}  # too little known about the inputs to call two runs identical
    mv = versions.find_version(cl, reg.model_name, run_id, sha, inputs)
    created, note = False, ""
    if mv is None:
        meta, metrics_doc = catalog.CLASSES.load(paths), catalog.METRICS.load(paths)
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
            versions.set_alias(cl, reg.model_name, reg.alias, mv.version)
    out = {
        "model_name": reg.model_name,
        "version": int(mv.version),
        "alias": reg.alias,
        "run_id": run_id,
        "model_uri": f"models:/{reg.model_name}/{mv.version}",
        "alias_uri": f"models:/{reg.model_name}@{reg.alias}",
        "created": created,
        **({"note": note} if note else {}),
    }
    released = os.environ.get(FROM_EXPERIMENT_ENV)
    if released:  # `medclf register --from-exp`: the version says which experiment it came from
        cl.set_model_version_tag(reg.model_name, str(mv.version), "dvc.experiment", released)
        cl.set_tag(run_id, "dvc.experiment", released)
        out["experiment"] = released
    catalog.REGISTER.save(paths, out)
    log.info("register: %s version %s (%s) %s", reg.model_name, mv.version, reg.alias, note or "created")
    return out
