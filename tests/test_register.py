"""register + promote/rollback against a real MLflow server: a failing gate registers nothing, a
passing one exactly one version with `challenger` and its tags (idempotently), failures leave
nothing half-registered, the champion is re-checked, and aliases move forwards and back."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port
from tests.test_evaluate import (
    _test_proba,
    assert_threshold_from_validation,
    build_project,
    copy_project,
    run_evaluate,
    with_overrides,
    write_train_run,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("register")
    settings = build_project(
        root,
        mlflow_server,
        {"evaluate": {"bootstrap": 50, "gradcam_n": 1, "gates": {"min_f1": 0.0, "min_recall": 0.0}}},
    )
    # the surest test negative labelled positive (a false negative at any threshold below its
    # score... and it is the lowest score): F1 < 1 for sure, so "a better champion" can exist
    _yv, _pv, (yt, pt) = _test_proba(settings)
    labels_file = settings.paths.ingest_dir / "test_labels.npy"
    labels = np.load(labels_file)
    neg = np.flatnonzero(yt == 0)
    labels[neg[np.argmin(pt[neg, 1])]] = 1
    np.save(labels_file, labels)
    return root, settings


def _client(settings):
    from mlflow import MlflowClient

    uri = settings.mlflow.resolved_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(settings) -> list:
    return _client(settings).search_model_versions(f"name = '{settings.registry.model_name}'")


def test_failing_gate_registers_nothing(project):
    from medclf.stages import evaluate, register

    root, settings = project
    _res, doc, _g = run_evaluate(settings)  # measured values, to build a bound they cannot meet
    bound = min(1.0, doc["test"]["f1"] + 1e-6)
    strict = with_overrides(settings, root, {"evaluate": {"gates": {"min_f1": bound}}})
    with pytest.raises(evaluate.GateFailed, match="f1"):
        evaluate.run(strict)
    gates = json.loads((settings.paths.reports_dir / "gates.json").read_text())
    assert gates["passed"] is False
    with pytest.raises(register.RegisterRefused, match="did not pass"):
        register.run(strict)
    assert _versions(settings) == []
    assert not (settings.paths.reports_dir / "register.json").exists()


def test_passing_gate_creates_exactly_one_challenger_version_with_tags(project):
    from medclf.stages import register

    _root, settings = project
    # a trained run: 3 epochs of training curve (epoch 0's loss is what MLflow would link by default)
    run_file = settings.paths.model_dir / "train_run.json"
    train_run = {**json.loads(run_file.read_text()), "epochs_run": 3}
    run_file.write_text(json.dumps(train_run))
    for epoch, loss in enumerate((0.9, 0.5, 0.3)):
        _client(settings).log_metric(train_run["run_id"], "train/loss", loss, step=epoch)
    _res, doc, gates = run_evaluate(settings)
    assert gates["passed"] is True, gates
    # an earlier `mlflow.set_experiment` in this process (training in process does one) must not break the
    # reopening of the training run ("active experiment ID does not match", seen in a full-suite run)
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow.resolved_uri())
    mlflow.set_experiment("another-experiment")
    out = register.run(settings)
    name = settings.registry.model_name
    assert out["created"] is True and out["alias"] == "challenger" and out["model_name"] == name
    vs = _versions(settings)
    assert len(vs) == 1
    mv = _client(settings).get_model_version_by_alias(name, "challenger")
    assert mv.version == vs[0].version == str(out["version"])
    train_run = json.loads((settings.paths.model_dir / "train_run.json").read_text())
    assert mv.run_id == train_run["run_id"] == out["run_id"]
    t = mv.tags
    for key in (
        "git_commit",
        "data_digest",
        "params_hash",
        "threshold",
        "threshold_rule",
        "gates",
        "model_sha256",
        "test_set_digest",
        "train_run_id",
        "metric.f1",
        "metric.recall",
        "keras_model_uri",
    ):
        assert t.get(key), key
    assert t["threshold"] == f"{doc['threshold']:.4f}" and doc["threshold"] == gates["threshold"]
    assert t["metric.f1"] == f"{doc['test']['f1']:.4f}" and t["metric.roc_auc"] == f"{doc['test']['roc_auc']:.4f}"
    assert t["gates"] == "passed" and "gates_passed" not in t and "auc" not in t
    # tags are short searchable scalars: no JSON documents (those are the run's evaluate/ artifacts)
    assert not [k for k, v in t.items() if v.lstrip().startswith("{")], t
    # the logged model shows the final test metrics, not epoch 0 of the training curve
    assert mv.source.startswith("models:/m-"), mv.source  # the pyfunc's LoggedModel
    lm = _client(settings).get_logged_model(mv.model_id or mv.source.removeprefix("models:/"))
    final = {m.key: m.value for m in lm.metrics or []}
    assert final["test/f1"] == pytest.approx(doc["test"]["f1"]) and "train/loss" not in final, final
    # the registered threshold is the rule applied to validation predictions (not the hard-coded
    # "threshold_source" literal): recomputed here from the model file, and unlike the test split's pick
    assert_threshold_from_validation(settings, gates["threshold"])  # the tag: 4 decimals of it
    reg = json.loads((settings.paths.reports_dir / "register.json").read_text())
    assert reg == {**out}
    # the model card, as markdown and as JSON, beside the model in the training run
    from medclf.infra import catalog

    dst = settings.paths.cache_dir / "card"
    dst.mkdir(parents=True)
    card = json.loads(
        Path(_client(settings).download_artifacts(mv.run_id, catalog.RUN_CARD_JSON, str(dst))).read_text()
    )
    assert card["metrics"]["f1"]["value"] == doc["test"]["f1"]
    assert card["operating_point"]["threshold"] == doc["threshold"]
    assert card["training_recipe"]["head_lr"] == settings.train.head_lr and card["data"]["split_by"] == "patient"
    assert "regulatory clearance" in card["intended_use"]["not_for_clinical_use"] and card["limitations"]
    md = Path(_client(settings).download_artifacts(mv.run_id, catalog.RUN_CARD, str(dst))).read_text()
    assert "## Training recipe" in md and f"head_lr `{settings.train.head_lr}`" in md
    assert set(reg) >= {"model_name", "version", "alias", "run_id", "model_uri"}

    # idempotent: the same run registers nothing new
    again = register.run(settings)
    assert again["version"] == out["version"] and again["created"] is False
    assert len(_versions(settings)) == 1

    # the registered pyfunc loads by alias and carries the threshold; the Keras flavour loads too
    import mlflow.artifacts
    import mlflow.keras
    import mlflow.pyfunc

    local = mlflow.artifacts.download_artifacts(f"models:/{name}@challenger")
    import os

    assert {"MLmodel", "input_example.json", "serving_input_example.json"} <= set(os.listdir(local))
    model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    assert model.unwrap_python_model().cfg.threshold == doc["threshold"]
    keras_model = mlflow.keras.load_model(t["keras_model_uri"])
    # the Keras flavour is the trained model itself: same layers, same weights, same predictions
    # (`get_layer(...) is not None` could not fail: get_layer raises instead of returning None)
    from medclf.infra.catalog import load_split
    from medclf.release.serving import load_keras

    trained = load_keras(str(settings.paths.model_dir / "model.keras"))
    assert [layer.name for layer in keras_model.layers] == [layer.name for layer in trained.layers]
    got_w, want_w = keras_model.get_weights(), trained.get_weights()
    assert len(got_w) == len(want_w) > 0
    for got, want in zip(got_w, want_w, strict=True):
        np.testing.assert_array_equal(got, want)
    xv, _ = load_split(settings.paths, "val", mmap=False)
    np.testing.assert_allclose(keras_model.predict(xv[:8], verbose=0), trained.predict(xv[:8], verbose=0), atol=1e-6)


def test_register_refuses_other_model_or_changed_champion(project, tmp_path):
    from medclf.stages import register

    _root, settings = project
    gates_file = settings.paths.reports_dir / "gates.json"
    original = gates_file.read_text()
    try:
        gates = json.loads(original)
        gates_file.write_text(json.dumps({**gates, "model_sha256": "0" * 64}))
        with pytest.raises(register.RegisterRefused, match="different model"):
            register.run(settings)
        gates_file.write_text(json.dumps({**gates, "champion": {"version": "999"}}))
        with pytest.raises(register.RegisterRefused, match="re-run `medclf evaluate`"):
            register.run(settings)
    finally:
        gates_file.write_text(original)


def test_failure_after_version_creation_leaves_nothing(project):
    """Alias `latest` is reserved by MLflow: the server rejects it after the version exists."""
    from medclf.stages import register

    root, settings = project
    before = {v.version for v in _versions(settings)}
    model_file = settings.paths.model_dir / "model.keras"
    original = model_file.read_bytes()
    run2 = write_train_run(settings, settings.mlflow.resolved_uri())  # a new run...
    nudge_model(settings)  # ...with a new model file -> would be a new version (identical bytes would be reused)
    run_evaluate(settings)
    bad = with_overrides(settings, root, {"register": {"alias": "latest"}})
    try:
        with pytest.raises(register.RegisterError, match="rolled back"):
            register.run(bad)
    finally:  # the later tests in this module continue from the first model
        model_file.write_bytes(original)
        run_evaluate(settings)
    assert {v.version for v in _versions(settings)} == before
    cl = _client(settings)
    models = cl.search_logged_models(
        experiment_ids=[run2["experiment_id"]], filter_string=f"source_run_id = '{run2['run_id']}'"
    )
    assert models == []  # the logged pyfunc/keras models of the failed attempt were deleted too


def test_failure_after_creating_the_registered_model_deletes_it(project, tmp_path, monkeypatch):
    """First registration under a name that does not exist yet: this call creates the registered model, then
    the server refuses the alias (`latest` is reserved) -> the version AND the registered model are deleted.
    (In suite order the project's model already exists, so the test above never reaches that branch.)"""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medclf.stages import register

    root, settings = project
    fresh = f"{settings.registry.model_name}-fresh-{uuid.uuid4().hex[:6]}"
    s2 = copy_project(
        settings,
        root,
        tmp_path / "proj",
        {"register": {"model_name": fresh, "alias": "latest"}, "evaluate": {"bootstrap": 0, "gradcam_n": 0}},
    )
    run2 = write_train_run(s2, s2.mlflow.resolved_uri())  # its own training run: the project's stays as it is
    _res, _doc, gates = run_evaluate(s2)
    assert gates["passed"] is True, gates
    cl = _client(s2)
    with pytest.raises(MlflowException) as absent:
        cl.get_registered_model(fresh)
    assert absent.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    created: list[str] = []  # a pass-through spy on the real client: proves the call did create the model
    real_create = MlflowClient.create_registered_model

    def spy(self, name, *args, **kwargs):
        created.append(name)
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_registered_model", spy)
    with pytest.raises(register.RegisterError, match="rolled back"):
        register.run(s2)
    assert created == [fresh]
    assert cl.search_registered_models(filter_string=f"name = '{fresh}'") == []
    with pytest.raises(MlflowException) as gone:
        cl.get_registered_model(fresh)
    assert gone.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert cl.search_model_versions(f"name = '{fresh}'") == []
    assert (
        cl.search_logged_models(
            experiment_ids=[run2["experiment_id"]], filter_string=f"source_run_id = '{run2['run_id']}'"
        )
        == []
    )
    assert not (s2.paths.reports_dir / "register.json").exists()


def test_unreachable_server_fails_fast_with_clear_error(project, monkeypatch):
    from medclf.infra.tracking import TrackingUnavailable
    from medclf.stages import register

    _root, settings = project
    before = len(_versions(settings))
    # the environment variable wins over params.yaml (and mlflow.set_tracking_uri exports it)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingUnavailable, match="unreachable after 2 attempts"):
        register.run(settings, attempts=2)
    monkeypatch.undo()
    assert len(_versions(settings)) == before


def nudge_model(settings) -> None:
    """A retrained model in miniature: the same network with its output bias moved (new bytes, new scores)."""
    import keras

    f = settings.paths.model_dir / "model.keras"
    model = keras.models.load_model(f, compile=False)
    last = [w for w in model.weights if w.path.endswith("bias")][-1]
    last.assign(last.numpy() + np.linspace(-0.3, 0.3, last.shape[0]).astype(last.dtype))
    kernel = [w for w in model.weights if w.path.endswith("kernel")][-1]
    rng = np.random.default_rng(1)
    kernel.assign(
        kernel.numpy() + rng.normal(0, 0.02 * float(np.std(kernel.numpy())), kernel.shape).astype(kernel.dtype)
    )
    model.save(f)


def test_non_inferiority_against_champion_then_promote_and_rollback(project, monkeypatch):
    """v1 -> champion; a new run is gated against it (from its tags, and re-scored when the test set
    differs), registered as v2, promoted, rolled back; a worse-than-champion model is refused."""
    from medclf.cli import main
    from medclf.release import registry, versions
    from medclf.stages import evaluate, register

    root, settings = project
    name, cl = settings.registry.model_name, _client(settings)
    v1 = int(cl.get_model_version_by_alias(name, "challenger").version)
    monkeypatch.setenv("USER", "alice")
    p = registry.promote(settings, v1)
    assert p["changed"] is True and p["previous_version"] is None and p["by"] == "alice"
    # registering the current gates is refused now: they were computed without this champion
    with pytest.raises(register.RegisterRefused, match="champion"):
        register.run(settings)

    write_train_run(settings, settings.mlflow.resolved_uri())  # retrained: a new training run
    _res, _doc, gates = run_evaluate(settings)
    ni = gates["non_inferiority"]
    assert ni["skipped"] is False and {e["metric"] for e in ni["entries"]} == {"f1", "recall"}
    assert gates["champion"]["version"] == str(v1) and "same test set" in gates["champion"]["source"]

    # the champion evaluated on another test set is re-scored here (same model -> same metrics)
    cl.set_model_version_tag(name, str(v1), "test_set_digest", "another-test-set")
    import mlflow

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = (mlflow.get_registry_uri(), os.environ.get("MLFLOW_REGISTRY_URI"))
    _res, doc, gates = run_evaluate(settings)
    assert "re-scored" in gates["champion"]["source"]
    # the re-score loads models:/ under MLflow's global registry URI, and must put it back: left set (and
    # exported to MLFLOW_REGISTRY_URI), it sent a later MlflowClient of this process, and every subprocess
    # it started, to this server's registry (CI: "Registered Model ... not found" on another server)
    assert (mlflow.get_registry_uri(), os.environ.get("MLFLOW_REGISTRY_URI")) == before
    entries = {e["metric"]: e for e in gates["non_inferiority"]["entries"]}
    assert entries["f1"]["champion"] == pytest.approx(doc["test"]["f1"])

    # a champion better by more than the margin blocks the release
    cl.set_model_version_tag(name, str(v1), "test_set_digest", gates["test_set_digest"])
    cl.set_model_version_tag(name, str(v1), "metric.f1", "1.0")
    assert doc["test"]["f1"] < 1.0 - settings.evaluate.gates.non_inferiority_margin
    with pytest.raises(evaluate.GateFailed, match="non-inferiority"):
        evaluate.run(settings)
    with pytest.raises(register.RegisterRefused, match="did not pass"):
        register.run(settings)
    cl.set_model_version_tag(name, str(v1), "metric.f1", repr(doc["test"]["f1"]))
    _res, _doc, gates = run_evaluate(settings)
    assert gates["passed"] is True
    # registry hygiene: the same model file from another run, on the same inputs, is version 1 again
    same = register.run(settings)
    assert same["created"] is False and same["version"] == v1 and "identical" in same["note"]
    assert [int(v.version) for v in _versions(settings)] == [v1]
    nudge_model(settings)  # a genuinely new model: retrained, so different bytes
    _res, doc, gates = run_evaluate(settings)
    assert gates["passed"] is True
    v2 = register.run(settings)["version"]
    mv2 = cl.get_model_version(name, str(v2))
    # the reviewer's page, once a champion exists: both models on the same test images, the difference with CI
    cmp = gates["comparison"]["roc_auc"]
    assert cmp["diff"] == pytest.approx(cmp["challenger"] - cmp["champion"]) and cmp["ci_low"] <= cmp["ci_high"]
    assert f"Challenger vs champion v{v1}, both on these test images" in mv2.description
    diff = "0.000" if abs(cmp["diff"]) < 0.0005 else f"{cmp['diff']:+.3f}"  # as comparison_rows prints it
    assert f"| ROC-AUC | {cmp['challenger']:.3f} | {cmp['champion']:.3f} | **{diff}** |" in mv2.description
    assert "- pass: min_recall" in mv2.description or "- pass: recall" in mv2.description
    assert (settings.paths.reports_dir / "evaluate" / "champion_comparison.png").stat().st_size > 10_000
    # > v1 + 1: the version created and deleted by the failed attempt above keeps its number
    assert v2 > v1 and sorted(int(v.version) for v in _versions(settings)) == [v1, v2]

    # promote via the CLI (who = --by), then roll back twice
    params = root / "params-cli.yaml"
    import yaml

    params.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True)))
    assert main(["--params", str(params), "promote", "--version", str(v2), "--by", "dave"]) == 0
    champ = cl.get_model_version_by_alias(name, "champion")
    assert int(champ.version) == v2
    assert int(cl.get_model_version_by_alias(name, "previous-champion").version) == v1
    assert champ.tags["champion.promoted_by"] == "dave" and champ.tags["champion.promoted_at"]
    assert cl.get_model_version(name, str(v1)).tags["champion.promoted_by"] == "alice"  # from $USER
    assert champ.tags["champion.previous_version"] == str(v1)
    again = registry.promote(settings, v2, by="bob")
    assert again["changed"] is False  # already champion: nothing moves, no history entry

    rb = registry.rollback(settings, by="carol")
    assert rb["version"] == v1 and rb["rolled_back_from"] == v2
    assert int(cl.get_model_version_by_alias(name, "champion").version) == v1
    rolled = cl.get_model_version(name, str(v2))
    assert rolled.tags["champion.rolled_back_by"] == "carol"
    assert versions.alias_version(cl, name, "previous-champion") is None  # history exhausted
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(settings)
    assert main(["--params", str(params), "rollback"]) == 1  # the CLI reports it as an error
    with pytest.raises(registry.RegistryError, match="no version 99"):
        registry.promote(settings, 99)
