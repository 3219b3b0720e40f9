"""The MLflow Model Registry edge around the versions: the client, promotion, rollback, and the champion's
reference metrics for the gates.

Aliases, not stages (stages are deprecated): `challenger` is set by `medclf register`,
`champion` is moved by a person (MLflow UI, see docs/PROMOTION.md) or `medclf promote`.
Promotion keeps the version it replaced under the alias `previous-<alias>` and records who,
when and what was replaced as version tags, so `medclf rollback` can walk the history back.

Finding and creating versions (`find_version` ... `undo_registration`, `set_alias`, `alias_version`, the version
tags) is `medclf.release.versions`'s.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
from pathlib import Path
from typing import Any

from medclf.config import Settings
from medclf.release.versions import (
    PREVIOUS_PREFIX,
    TAG_CLASSES,
    TAG_METRIC,
    TAG_TEST_DIGEST,
    alias_version,
    not_found,
    read_classes,
)

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (the message says why)."""


def client(settings: Settings, attempts: int = 5) -> Any:
    """An MlflowClient for the configured server, after the reachability check (with retries)."""
    from mlflow import MlflowClient

    from medclf.infra.tracking import configure

    uri = settings.mlflow.resolved_uri()
    configure(uri, attempts=attempts)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_metrics(mv: Any) -> dict[str, float]:
    """The test metrics `register` stored as `metric.<name>` tags on a version."""
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(TAG_METRIC):
            try:
                out[key[len(TAG_METRIC) :]] = float(value)
            except ValueError:
                continue
    return out


# ----------------------------------------------------------------------------- promotion and rollback
def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _get_version(cl: Any, name: str, version: int | str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        mv = cl.get_model_version(name, str(version))
    except MlflowException as err:
        if not_found(err):
            raise RegistryError(f"model {name!r} has no version {version}") from None
        raise
    if mv.status != "READY":
        raise RegistryError(f"{name} version {version} is {mv.status}, not READY")
    return mv


def promote(
    settings: Settings,
    version: int,
    alias: str = "champion",
    by: str | None = None,
    attempts: int = 5,
    force: bool = False,
) -> dict[str, Any]:
    """Point `alias` at `version`, once it passes the promotion check; the replaced version becomes
    `previous-<alias>`.

    The check (`promotion.check`: gates passed, raw data still dvc.lock's, not blocked) runs first; a failure
    raises RegistryError naming the failed items and changes no alias, unless `force`. Either way the verdict is
    recorded (`promotion.check`, `<alias>.audit` tags, one line of the audit log) before the alias moves.
    Tags on the promoted version: `<alias>.promoted_by`, `<alias>.promoted_at`,
    `<alias>.previous_version` (what it replaced; the rollback chain). Promoting the version
    that already holds the alias changes nothing.
    """
    from medclf.release import promotion

    cl, name = client(settings, attempts), settings.registry.model_name
    mv = _get_version(cl, name, version)
    current = alias_version(cl, name, alias)
    result = {"model_name": name, "alias": alias, "version": int(mv.version), "model_uri": f"models:/{name}@{alias}"}
    if current is not None and current.version == mv.version:
        return {
            **result,
            "changed": False,
            "previous_version": None,
            "note": f"{alias} already points to version {mv.version}",
        }
    who, when = _who(by), _now()
    verdict = promotion.check(cl, name, mv, settings.paths.raw_data, Path("dvc.lock"))
    holder = current.version if current is not None else None
    if not verdict.passed and not force:
        promotion.record(cl, name, mv.version, alias, verdict, "cli, refused", who, when, holder=holder)
        raise RegistryError(
            f"{name} version {mv.version} fails the promotion check ({'; '.join(verdict.reasons)}): {alias} not "
            f"moved (--force promotes it anyway, and the audit records that it was forced)"
        )
    promotion.record(
        cl,
        name,
        mv.version,
        alias,
        verdict,
        "cli",
        who,
        when,
        forced=not verdict.passed,
        holder=mv.version,
        replaced=holder,
    )
    if current is not None:
        cl.set_registered_model_alias(name, PREVIOUS_PREFIX + alias, current.version)
        cl.set_model_version_tag(name, current.version, f"{alias}.replaced_at", when)
    cl.set_model_version_tag(name, mv.version, f"{alias}.promoted_by", who)
    cl.set_model_version_tag(name, mv.version, f"{alias}.promoted_at", when)
    cl.set_model_version_tag(
        name, mv.version, f"{alias}.previous_version", current.version if current is not None else ""
    )
    cl.set_registered_model_alias(name, alias, mv.version)  # the switch itself comes last
    log.info("%s: %s -> version %s (was %s) by %s", name, alias, mv.version, current.version if current else None, who)
    return {
        **result,
        "changed": True,
        "previous_version": int(current.version) if current else None,
        "by": who,
        "at": when,
        "check": verdict.word(forced=force),
    }


def rollback(
    settings: Settings, alias: str = "champion", by: str | None = None, attempts: int = 5, force: bool = False
) -> dict[str, Any]:
    """Move `alias` back to `previous-<alias>`; `previous-<alias>` then steps one further back.

    The target goes through the promotion check as a rollback (gates, blocked; not the data, which is older by
    definition): a failure raises RegistryError and moves nothing, unless `force`; the verdict is recorded.

    The step further back is the restored version's own `<alias>.previous_version` tag (set when
    it was promoted). When that history ends, `previous-<alias>` is removed, so a second rollback
    past the start fails clearly instead of flipping between two versions.
    """
    cl, name = client(settings, attempts), settings.registry.model_name
    prev_alias = PREVIOUS_PREFIX + alias
    current = alias_version(cl, name, alias)
    target = alias_version(cl, name, prev_alias)
    if target is None:
        raise RegistryError(
            f"{name}: no alias {prev_alias!r}, nothing to roll back to "
            f"({alias} is {'version ' + current.version if current else 'unset'})"
        )
    if current is not None and current.version == target.version:
        raise RegistryError(f"{name}: {alias} and {prev_alias} both point to version {target.version}")
    who, when = _who(by), _now()
    from medclf.release import promotion

    verdict = promotion.check(cl, name, target, None, None, rollback=True)
    via, holder = "cli rollback", current.version if current is not None else None
    if not verdict.passed and not force:
        promotion.record(cl, name, target.version, alias, verdict, via + ", refused", who, when, holder=holder)
        raise RegistryError(
            f"{name}: rolling {alias} back to version {target.version} fails the promotion check "
            f"({'; '.join(verdict.reasons)}): nothing moved (force=True rolls back anyway)"
        )
    promotion.record(
        cl,
        name,
        target.version,
        alias,
        verdict,
        via,
        who,
        when,
        forced=not verdict.passed,
        holder=target.version,
        replaced=holder,
    )
    older = (target.tags or {}).get(f"{alias}.previous_version", "")
    cl.set_model_version_tag(name, target.version, f"{alias}.restored_by", who)
    cl.set_model_version_tag(name, target.version, f"{alias}.restored_at", when)
    if current is not None:
        cl.set_model_version_tag(name, current.version, f"{alias}.rolled_back_by", who)
        cl.set_model_version_tag(name, current.version, f"{alias}.rolled_back_at", when)
    cl.set_registered_model_alias(name, alias, target.version)
    if older and older != target.version:
        cl.set_registered_model_alias(name, prev_alias, older)
    else:
        cl.delete_registered_model_alias(name, prev_alias)
    log.info(
        "%s: %s rolled back %s -> %s by %s", name, alias, current.version if current else None, target.version, who
    )
    return {
        "model_name": name,
        "alias": alias,
        "version": int(target.version),
        "rolled_back_from": int(current.version) if current else None,
        "previous_version": int(older) if older and older != target.version else None,
        "by": who,
        "at": when,
        "model_uri": f"models:/{name}@{alias}",
    }


def _reachable(uri: str, reachable: bool | None) -> bool:
    """`reachable` as given, else one quick probe (2 attempts) of the server."""
    from medclf.infra.tracking import TrackingUnavailable, wait_for_server

    if reachable is not None:
        return reachable
    try:
        wait_for_server(uri, attempts=2)
        return True
    except TrackingUnavailable:
        return False


def _champion_version(settings: Settings, alias: str, reachable: bool | None) -> tuple[dict[str, Any], Any | None]:
    """(the reference's base, the version `alias` points to). The version is None when there is none to compare
    with; the base then says why (`note`): the server is unreachable, or no such alias is registered."""
    from mlflow import MlflowClient

    uri, name = settings.mlflow.resolved_uri(), settings.registry.model_name
    base: dict[str, Any] = {"alias": alias, "checked": False, "version": None, "server_reachable": True}
    if not _reachable(uri, reachable):
        return {
            **base,
            "server_reachable": False,
            "note": f"MLflow server at {uri} unreachable: non-inferiority not checked",
        }, None
    mv = alias_version(MlflowClient(tracking_uri=uri, registry_uri=uri), name, alias)
    if mv is None:
        return {**base, "note": f"no {alias} registered for {name}"}, None
    return {**base, "version": str(mv.version)}, mv


def _load_champion(settings: Settings, mv: Any) -> Any:
    """The served wrapper (`medclf.release.serving.MedclfModel`, with its `cfg`) of version `mv`."""
    import mlflow.pyfunc

    from medclf.infra.tracking import mlflow_uri

    # the models:/ URI resolves against the *global* registry: without this it was MLflow's default local
    # SQLite file whenever the URI came from params.yaml rather than MLFLOW_TRACKING_URI ("not found")
    with mlflow_uri(settings.mlflow.resolved_uri()):
        return mlflow.pyfunc.load_model(f"models:/{settings.registry.model_name}/{mv.version}").unwrap_python_model()


def _champion_proba(wrapper: Any, x_test: Any) -> Any:
    """The champion's (N, K) probabilities on the test images, mapped to its own input size first if needed."""
    import numpy as np

    from medclf.release.serving import prepare

    cfg = wrapper.cfg
    x = np.asarray(x_test)
    if x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
        x = np.stack([prepare(img, cfg) for img in x])
    return wrapper.predict_images(x)


def _tag_classes(mv: Any) -> list[str] | None:
    """The version's `classes` tag: comma-separated, or the JSON list of versions registered before issue 27."""
    return read_classes((mv.tags or {}).get(TAG_CLASSES))


def champion_reference(
    settings: Settings,
    test_digest: str,
    x_test: Any,
    y_test: Any,
    classes: list[str],
    alias: str = "champion",
    reachable: bool | None = None,
    rescore: bool = False,
) -> dict[str, Any]:
    """The current champion's test metrics on THIS test set, for the non-inferiority gate.

    Read from the champion version's `metric.*` tags when it was evaluated on the same test set
    (same `test_set_digest`); otherwise the champion model is re-scored here on the current test
    set at its own registered threshold, because metrics from a different test set are not
    comparable. With `rescore` the model is also run on the test set when its tags suffice, so the
    reference always carries `proba` (the champion's positive-class probabilities) and `threshold`, for
    the challenger-versus-champion report (the gate still reads the tags).
    Skipped (with a note) when there is no champion or the server is unreachable;
    `register` re-checks the champion, so a skip cannot let a worse model past a champion.
    """
    from medclf.evaluation import champion

    base, mv = _champion_version(settings, alias, reachable)
    if mv is None:
        return base
    tags = mv.tags or {}
    champ_classes = _tag_classes(mv)
    if champ_classes is not None and champ_classes != list(classes):
        return {**base, "note": f"{alias} v{mv.version} has classes {champ_classes}, not {classes}: not comparable"}
    stored = version_metrics(mv)
    from_tags = champion.tags_suffice(stored, tags.get(TAG_TEST_DIGEST), test_digest)
    if from_tags and not rescore:
        return {**base, "checked": True, "source": champion.FROM_TAGS, "metrics": stored}
    try:
        wrapper = _load_champion(settings, mv)
    except Exception as err:  # the tags still give the gate its figures
        if not from_tags:
            raise
        log.warning("%s v%s could not be loaded for the comparison report: %s", alias, mv.version, err)
        return {**base, "checked": True, "source": champion.FROM_TAGS, "metrics": stored}
    cfg = wrapper.cfg
    if list(cfg.classes) != list(classes):
        return {**base, "note": f"{alias} v{mv.version} has classes {cfg.classes}, not {classes}: not comparable"}
    # the champion's own positive class and threshold; the metrics are its tags when they are of this test set
    scores = champion.score_champion(
        y_test, _champion_proba(wrapper, x_test), cfg.positive_index, cfg.threshold, rescore=not from_tags
    )
    if from_tags:
        return {**base, "checked": True, "source": champion.FROM_TAGS, "metrics": stored, **scores}
    return {**base, "checked": True, "source": champion.RESCORED, **scores}


def kclass_champion(
    settings: Settings,
    test_digest: str,
    classes: list[str],
    kind: str,
    alias: str = "champion",
    reachable: bool | None = True,
    x_test: Any = None,
    y_test: Any = None,
    rescore: bool = True,
) -> dict[str, Any]:
    """The champion of a multi-class, ordinal or multi-label task, for its non-inferiority gate and the champion
    comparison. A multi-label champion is re-scored by its own per-finding thresholds (its `model_config`'s
    `thresholds`: `champion.score_multilabel_champion`).

    Given the test split (`x_test`, `y_test`) and `rescore`, the champion model is loaded and re-scored on THIS
    test set by its own registered decision (the argmax or its cut-points, its critical-class flag thresholds, its
    referable threshold: the task keys of its `model_config`): the reference then carries ``proba`` (its (N, K)
    test probabilities), ``decision`` (its `Decision.document()`, which `kclass_comparison` pairs with the
    challenger's) and ``metrics`` (its point test metrics by that decision, metrics.json names), ``source``
    `champion.RESCORED_KCLASS`. Without the test split (or `rescore`) it is the version's `metric.*` tags, when
    it was evaluated on the same test set (same `test_set_digest`); so it is too when the model cannot be loaded
    (with a ``note``), and a load failure with no such tags raises, as `champion_reference` does. Not checked
    (``note``) when the champion is not a `kind` model of `classes`, there is no champion, or the server is
    unreachable."""
    from medclf.config.vocabulary import TaskKind
    from medclf.evaluation import champion

    base, mv = _champion_version(settings, alias, reachable)
    if mv is None:
        return base
    tags = mv.tags or {}
    if _tag_classes(mv) != list(classes) or tags.get("task", "binary") != kind:
        return {**base, "note": f"{alias} v{mv.version} is not a {kind} model of {classes}: not comparable"}
    same_set = tags.get(TAG_TEST_DIGEST) == test_digest
    from_tags = {**base, "checked": True, "source": champion.FROM_TAGS, "metrics": version_metrics(mv)}
    if not rescore or x_test is None or y_test is None:
        if same_set:
            return from_tags
        return {**base, "note": f"{alias} v{mv.version} was evaluated on another test set: not checked"}
    try:
        wrapper = _load_champion(settings, mv)
    except Exception as err:
        if not same_set:
            raise RegistryError(
                f"{alias} v{mv.version} could not be loaded to re-score it on this test set (its tags are of "
                f"another one): {type(err).__name__}: {err}"
            ) from err
        log.warning("%s v%s could not be loaded to re-score it: %s", alias, mv.version, err)
        return {**from_tags, "note": f"{alias} v{mv.version} not re-scored ({type(err).__name__}); its tags"}
    cfg = wrapper.cfg
    if list(cfg.classes) != list(classes) or cfg.task != kind:
        return {**base, "note": f"{alias} v{mv.version} serves a {cfg.task} model of {cfg.classes}: not comparable"}
    if kind == "multilabel":  # each finding by the champion's own registered threshold
        scores = champion.score_multilabel_champion(
            classes, y_test, _champion_proba(wrapper, x_test), cfg.thresholds, tags.get("decision_rule", "")
        )
        return {
            **base,
            "checked": True,
            "source": champion.RESCORED_KCLASS,
            "rule": tags.get("decision_rule"),
            **scores,
        }
    decision = champion.kclass_decision(
        tags.get("decision_rule", ""),
        cfg.classes,
        cfg.cutpoints,
        cfg.flags,
        cfg.referable_from,
        cfg.referable_threshold,
    )
    family: TaskKind = "ordinal" if kind == "ordinal" else "multiclass"
    scores = champion.score_kclass_champion(family, classes, y_test, _champion_proba(wrapper, x_test), decision)
    return {**base, "checked": True, "source": champion.RESCORED_KCLASS, "rule": decision.rule, **scores}
