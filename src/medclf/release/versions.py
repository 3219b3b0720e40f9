"""The model-version protocol `medclf register` follows: finding and creating registry versions idempotently.

One version per model file (sha256) and training run, reused when found (`find_version`), created
all-or-nothing (`create_version`; `undo_registration` removes what a failed call created), and exactly one kept
when two registrations of the same model race (`first_of_model`). `set_alias` and `alias_version` are the alias
steps the protocol needs. What is registered, and whether it may be, is `medclf.stages.register`'s; promotion,
rollback and the champion's reference metrics are `medclf.release.registry`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Version tags written by `medclf register` (read back by gates, promote and predict).
TAG_TRAIN_RUN = "train_run_id"
TAG_MODEL_SHA = "model_sha256"
TAG_TEST_DIGEST = "test_set_digest"
TAG_THRESHOLD = "threshold"
TAG_METRIC = "metric."
TAG_CLASSES = "classes"
TAG_KERAS_URI = "keras_model_uri"
TAG_GIT_COMMIT = "git_commit"
TAG_DIGITS = 4
PREVIOUS_PREFIX = "previous-"
"""`previous-<alias>`: where the alias was before its last move (`medclf rollback` goes back to it)."""
"""Decimals of a version's numeric tags (`metric.*`, `threshold`): what a reviewer reads, and what the champion
non-inferiority gate compares (an error of at most 5e-5, far under any margin). The exact values stay in the
training run's gates.json / metrics.json, and the served threshold in the model's own config."""


def tag_number(value: float) -> str:
    """A number as a version tag: `TAG_DIGITS` decimals (`0.2697`, not `0.2696778178215027`)."""
    return f"{float(value):.{TAG_DIGITS}f}"


def tag_classes(classes: list[str]) -> str:
    """The class names as one tag: comma-separated (`NORMAL,PNEUMONIA`); JSON only when a name holds a comma."""
    import json

    names = [str(c) for c in classes]
    return json.dumps(names) if any("," in c for c in names) else ",".join(names)


def read_classes(value: str | None) -> list[str] | None:
    """The class names of a `classes` tag: comma-separated, or the JSON list older versions (and names with a
    comma) carry; None when there is no tag."""
    import json

    if not value:
        return None
    if value.lstrip().startswith("["):
        return [str(c) for c in json.loads(value)]
    return value.split(",")


MODEL_DESCRIPTION = (
    "medclf image classifier (research use only; not for clinical decisions without regulatory clearance)"
)
"""The description of a registered model this module creates."""


class RegisterError(RuntimeError):
    """Registration failed part-way; anything it had created was removed again."""


def not_found(err: Exception) -> bool:
    """Missing model/version (RESOURCE_DOES_NOT_EXIST) or missing alias (the server answers
    INVALID_PARAMETER_VALUE "Registered model alias X not found" for that, in MLflow 3.17)."""
    code, msg = getattr(err, "error_code", ""), str(err).lower()
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in msg and "not found" in msg
    )


def alias_version(cl: Any, name: str, alias: str) -> Any | None:
    """The ModelVersion an alias points to, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return cl.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if not_found(err):
            return None
        raise


def search_versions(cl: Any, name: str) -> list[Any]:
    """Every version of the registered model `name` (MLflow's search: without aliases); [] when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return list(cl.search_model_versions(f"name = '{name}'"))
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise


def is_same_model(mv: Any, run_id: str, sha: str, inputs: dict[str, str] | None) -> bool:
    """`mv` is this exact model file (sha256), from this run or evaluated on the same inputs."""
    tags = mv.tags or {}
    if tags.get(TAG_MODEL_SHA) != sha:
        return False
    return mv.run_id == run_id or bool(inputs and all(tags.get(k) == v for k, v in inputs.items()))


def find_version(cl: Any, name: str, run_id: str, sha: str, inputs: dict[str, str] | None = None) -> Any | None:
    """A READY version of `name` for this exact model file: from this run, or (registry hygiene) from any
    run when it was also evaluated on the same inputs (every key of `inputs` equal among its tags).

    A forced rerun that reproduces the same bytes from the same data is the same model; registering
    it again would show a reviewer two versions with identical figures. The version comes with its aliases.
    """
    ready = [mv for mv in search_versions(cl, name) if mv.status == "READY"]
    same_run = [mv for mv in ready if mv.run_id == run_id and is_same_model(mv, run_id, sha, None)]
    same_inputs = [mv for mv in ready if is_same_model(mv, run_id, sha, inputs)]
    hits = same_run or same_inputs
    if not hits:
        return None
    # a search result carries no aliases (MLflow 3.17): the version itself says whether it is the champion
    return cl.get_model_version(name, min(hits, key=lambda mv: int(mv.version)).version)


def first_of_model(cl: Any, name: str, run_id: str, sha: str, inputs: dict[str, str] | None) -> Any | None:
    """The lowest-numbered version of this model that is not a failed registration (READY or still pending).

    The race it settles: two `medclf register` of one training run (two checkouts, two hosts: the project
    lock is per checkout) both find no version, and both create one. The registry numbers versions
    max + 1 in the transaction that creates them, so a version N was committed before version N+1 was;
    the creator of N+1, searching after its own create, always sees N. Each creator keeps its version
    only if it is the lowest of its model: exactly one survives, whatever the interleaving."""
    same = [
        mv
        for mv in search_versions(cl, name)
        if mv.status != "FAILED_REGISTRATION" and is_same_model(mv, run_id, sha, inputs)
    ]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def wait_ready(cl: Any, name: str, version: str, timeout: float = 120) -> None:
    """Return once `version` of `name` is READY; RegisterError when it failed or `timeout` seconds passed."""
    t0 = time.time()
    while True:
        mv = cl.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.time() - t0 > timeout:
            raise RegisterError(f"{name} version {version} did not become READY ({mv.status}: {mv.status_message})")
        time.sleep(0.5)


def ensure_registered_model(cl: Any, name: str) -> bool:
    """Create the registered model if needed; True when this call created it."""
    from mlflow.exceptions import MlflowException

    try:
        cl.get_registered_model(name)
        return False
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        cl.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as err:  # a concurrent `medclf register` created it first: use it, it is not ours
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    return True


def set_alias(cl: Any, name: str, alias: str, version: str) -> None:
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
        now = alias_version(cl, name, alias)
        if now is None or str(now.version) != str(version):
            raise


def create_version(
    cl: Any,
    name: str,
    alias: str,
    run_id: str,
    log_models: Callable[[], tuple[Any, Any]],
    tags: dict[str, str],
    description: str,
    inputs: dict[str, str] | None = None,
) -> tuple[Any, bool]:
    """Log, register, tag and alias as one unit: any failure removes what this call created.

    `log_models` logs the models into the training run `run_id` and returns their infos (pyfunc, keras): the
    version's source is the pyfunc, the Keras flavour is named by the `keras_model_uri` tag. `tags[TAG_MODEL_SHA]`
    identifies the model (with `run_id`, or `inputs`: `find_version`).

    Returns (version, True), or (the other version, False) when a concurrent registration of the same
    model (`first_of_model`) got the lower number: this call's duplicate and its logged models are then
    deleted again, before any alias points at it. RegisterError (the cause chained) when it failed and was
    rolled back."""
    created_model = ensure_registered_model(cl, name)
    infos: tuple[Any, Any] = (None, None)
    mv: Any = None
    try:
        infos = log_models()
        pyfunc, keras = infos
        tags = {**tags, TAG_KERAS_URI: keras.model_uri}
        mv = cl.create_model_version(
            name, source=pyfunc.model_uri, run_id=run_id, tags=tags, description=description, model_id=pyfunc.model_id
        )
        wait_ready(cl, name, mv.version)
        first = first_of_model(cl, name, run_id, tags[TAG_MODEL_SHA], inputs)
        if first is not None and first.version != mv.version:
            log.warning(
                "register: %s version %s is the same model, registered concurrently; removing the duplicate version %s",
                name,
                first.version,
                mv.version,
            )
            undo_registration(cl, name, mv, infos, created_model=False)
            wait_ready(cl, name, first.version)
            return cl.get_model_version(name, first.version), False
        set_alias(cl, name, alias, mv.version)
        return cl.get_model_version(name, mv.version), True
    except Exception as err:
        undo_registration(cl, name, mv, infos, created_model)
        raise RegisterError(
            f"registering {name} failed and was rolled back (no version left behind): {type(err).__name__}: {err}"
        ) from err


def undo_registration(cl: Any, name: str, mv: Any, infos: tuple[Any, ...], created_model: bool) -> None:
    """Roll back a partial registration, best-effort (a failed step is logged, never raised): delete the version
    `mv` (None: none was created), the registered model when this call created it and no version is left, and
    the logged models `infos`."""
    try:
        if mv is not None:
            cl.delete_model_version(name, mv.version)
        if created_model and not cl.search_model_versions(f"name = '{name}'"):
            cl.delete_registered_model(name)
    except Exception as cleanup_err:  # noqa: BLE001 - report, but keep the original error
        log.error("cleanup after failed registration incomplete: %s", cleanup_err)
    delete_logged_models(*infos)


def delete_logged_models(*infos: Any) -> None:
    """Delete logged models (their ModelInfo; None is skipped), best-effort: a failure is logged, never raised."""
    from mlflow import MlflowClient

    for info in infos:
        if info is None:
            continue
        try:
            MlflowClient().delete_logged_model(info.model_id)
        except Exception as err:  # noqa: BLE001 - best-effort cleanup must not mask the real error
            log.warning("could not delete logged model %s: %s", info.model_id, err)
