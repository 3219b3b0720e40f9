"""A K-class challenger against its champion (issue 24): the champion re-scored on this test set by its own registered
decision, and the paired, patient-clustered bootstrap comparison that non-inferiority reads on every gated metric."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from medclf.config import Gates
from medclf.config.vocabulary import canonical_gate
from medclf.evaluation import kclass
from medclf.evaluation import task as tasks
from medclf.evaluation.kclass_comparison import kclass_comparison
from medclf.evaluation.metrics import _resample_indices

CLASSES = ("a", "b", "mel")
SPEC = tasks.TaskSpec("multiclass", CLASSES, critical=(2,))
ARGMAX = tasks.Decision("class = the most probable class (argmax)")


def _proba(y: np.ndarray, strength: float, seed: int) -> np.ndarray:
    """Softmax of noise plus `strength` on the true class: larger is a better model."""
    logits = np.random.default_rng(seed).normal(size=(y.size, len(CLASSES)))
    logits[np.arange(y.size), y] += strength
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _data(n_patients: int = 100, per_patient: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), per_patient)
    return rng.integers(0, len(CLASSES), groups.size), rng.permutation(groups)


def _strict(doc: dict) -> dict:
    return json.loads(json.dumps(doc, allow_nan=False))  # gates.json is a DVC metrics file: no NaN


def test_a_clearly_better_model_gains_with_cis_excluding_zero_and_each_side_matches_its_own_report():
    y, groups = _data()
    p_new, p_old = _proba(y, 3.0, 1), _proba(y, 0.7, 2)
    d_new, d_old = tasks.fit_decision(SPEC, y, p_new, 0.9), tasks.fit_decision(SPEC, y, p_old, 0.9)
    gated = ["balanced_accuracy", "macro_auc", "per_class.mel.recall", "critical.mel.specificity"]
    out = _strict(kclass_comparison(SPEC, y, p_new, d_new, p_old, d_old, gated, 0.02, 200, 7, groups))
    for name in ("balanced_accuracy", "macro_auc", "macro_f1", "mcc", *(f"per_class.{c}.recall" for c in CLASSES)):
        e = out["metrics"][name]
        assert e["diff"] == pytest.approx(e["challenger"] - e["champion"])
        assert 0 < e["ci_low"] <= e["diff"] <= e["ci_high"], name
    for c in CLASSES:
        assert set(out["per_class"][c]) == {"recall", "precision", "f1", "auc"}
        assert out["per_class"][c]["recall"] == out["metrics"][f"per_class.{c}.recall"]
    assert out["metrics"]["brier"]["diff"] < 0 and "brier" in out["lower_is_better"]
    ni = out["non_inferiority"]
    assert [e["metric"] for e in ni["entries"]] == gated and ni["failures"] == []
    assert all(e["passed"] and e["tested"] == "diff" and e["bound"] == -0.02 for e in ni["entries"])
    # each model's values are those of its own metrics document (its own decision, the same clustered resamples)
    for side, p, d in (("challenger", p_new, d_new), ("champion", p_old, d_old)):
        own = tasks.evaluate_kclass(SPEC, d, y, p, 200, 7, groups)
        assert out["confusion"][side] == own["report"]["confusion"]["counts"]
        for name in ("balanced_accuracy", "per_class.mel.recall", "critical.mel.sensitivity"):
            assert out["metrics"][name][side] == pytest.approx(own["test"][name]["value"], abs=1e-12)
    assert out["clustered"] and out["n_units"] == 100 and out["n"] == y.size


def test_the_same_model_differs_by_exactly_zero_and_is_non_inferior():
    y, groups = _data()
    p = _proba(y, 1.5, 3)
    d = tasks.fit_decision(SPEC, y, p, 0.9)
    gated = ["balanced_accuracy", "macro_auc", "per_class.mel.recall", "critical.mel.sensitivity"]
    out = _strict(kclass_comparison(SPEC, y, p, d, p.copy(), d.document(), gated, 0.0, 100, 0, groups))
    for name, e in out["metrics"].items():
        if e["challenger"] is not None:
            assert e["diff"] == e["ci_low"] == e["ci_high"] == 0.0, name
    assert out["confusion"]["challenger"] == out["confusion"]["champion"]
    assert all(e["passed"] for e in out["non_inferiority"]["entries"]) and not out["non_inferiority"]["failures"]
    # no resamples: no CI, and the point difference is what is tested
    bare = _strict(kclass_comparison(SPEC, y, p, d, p, d, gated, 0.0, 0, 0, groups))
    assert bare["metrics"]["macro_auc"]["ci_low"] is None
    assert all(e["passed"] and e["tested"] == "diff" for e in bare["non_inferiority"]["entries"])


def test_a_model_worse_on_one_classs_recall_fails_that_gate_only():
    y, groups = _data()
    p_old = _proba(y, 2.5, 4)
    p_new = p_old.copy()
    hit = np.flatnonzero((y == 2) & (p_old.argmax(axis=1) == 2))[::2]  # half the melanomas it found: called b
    p_new[hit] = p_new[hit][:, [0, 2, 1]]
    bounds = {"recall[a]": 0.0, "recall[b]": 0.0, "recall[mel]": 0.0}
    cfg = Gates(bounds=bounds, non_inferiority_margin=0.05)
    gated = list(SPEC.gates(cfg))
    assert gated == [canonical_gate(k) for k in bounds] == [f"per_class.{c}.recall" for c in CLASSES]
    out = kclass_comparison(SPEC, y, p_new, ARGMAX, p_old, ARGMAX, gated, 0.05, 200, 0, groups)
    verdict = {e["metric"]: e["passed"] for e in out["non_inferiority"]["entries"]}
    assert verdict == {"per_class.a.recall": True, "per_class.b.recall": True, "per_class.mel.recall": False}
    assert out["metrics"]["per_class.mel.recall"]["ci_high"] < 0
    # the gate report: every floor passes, non-inferiority fails on recall[mel] alone
    result = tasks.evaluate_kclass(SPEC, ARGMAX, y, p_new, 0, 0, groups)
    doc = tasks.metrics_document(SPEC, ARGMAX, result, 10)
    gates = tasks.check_gates(SPEC, doc, cfg, None, paired=out["non_inferiority"])
    assert not gates["passed"] and all(g["passed"] for g in gates["gates"])
    assert len(gates["failures"]) == 1 and gates["failures"][0].startswith("per_class.mel.recall: ")
    assert gates["non_inferiority"]["paired"] and "failures" not in gates["non_inferiority"]
    # without the paired verdict, check_gates is the point comparison as before
    champion = {k: v["champion"] for k, v in out["metrics"].items()}
    point = tasks.check_gates(SPEC, doc, cfg, champion)
    assert [e["metric"] for e in point["non_inferiority"]["entries"] if not e["passed"]] == ["per_class.mel.recall"]
    with pytest.raises(ValueError, match="lacks the gated metric"):
        tasks.check_gates(SPEC, doc, Gates(bounds={"macro_auc": 0.5}), None, paired=out["non_inferiority"])


def test_a_patients_images_are_resampled_together_for_both_models():
    """Each patient has two images of one class; the challenger gets the first right and the second wrong, the
    champion the reverse. Per patient both make the same calls, so in every patient resample their confusion
    matrices are equal: the difference is exactly 0 with a CI of [0, 0]. Resampling images gives a wide CI."""
    n_patients = 60
    y = np.repeat(np.arange(n_patients) % 3, 2)
    groups = np.repeat(np.arange(n_patients), 2)
    first = np.tile([True, False], n_patients)
    right, wrong = np.eye(3)[y] * 0.7 + 0.1, np.eye(3)[(y + 1) % 3] * 0.7 + 0.1
    p_new = np.where(first[:, None], right, wrong)
    p_old = np.where(first[:, None], wrong, right)
    order = np.random.default_rng(5).permutation(y.size)  # a patient's rows need not be adjacent
    y, groups, p_new, p_old = y[order], groups[order], p_new[order], p_old[order]
    confusion_based = ["accuracy", "balanced_accuracy", "macro_f1", "per_class.mel.recall", "per_class.a.precision"]
    out = kclass_comparison(SPEC, y, p_new, ARGMAX, p_old, ARGMAX, confusion_based, 0.0, 200, 0, groups)
    for name in confusion_based:
        e = out["metrics"][name]
        assert e["diff"] == e["ci_low"] == e["ci_high"] == 0.0, name
    assert all(e["passed"] for e in out["non_inferiority"]["entries"])
    rows = kclass_comparison(SPEC, y, p_new, ARGMAX, p_old, ARGMAX, confusion_based, 0.0, 200, 0, None)
    assert rows["metrics"]["accuracy"]["ci_low"] < -0.05 and rows["metrics"]["accuracy"]["ci_high"] > 0.05
    assert not rows["clustered"] and rows["n_units"] == y.size
    # the verdict is the point difference (0 here, as for a binary gate); the CI is reported beside it
    assert all(e["passed"] and e["tested"] == "diff" for e in rows["non_inferiority"]["entries"])


def test_the_paired_ci_is_the_loop_over_the_same_patient_resamples():
    y, groups = _data(n_patients=40, per_patient=2, seed=1)
    p_new, p_old = _proba(y, 1.0, 6), _proba(y, 0.8, 7)
    out = kclass_comparison(SPEC, y, p_new, ARGMAX, p_old, ARGMAX, ["macro_auc"], 0.02, 50, 3, groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == u) for u in range(uniq.size)]
    diffs = {"balanced_accuracy": [], "macro_auc": [], "per_class.b.f1": []}
    for draw in _resample_indices(uniq.size, 50, 3):
        idx = np.concatenate([members[u] for u in draw])
        a = kclass.flatten_report(kclass.multiclass_report(y[idx], p_new[idx], CLASSES))
        b = kclass.flatten_report(kclass.multiclass_report(y[idx], p_old[idx], CLASSES))
        for k in diffs:
            diffs[k].append(a[k] - b[k])
    for k, v in diffs.items():
        lo, hi = np.quantile(v, [0.025, 0.975])
        assert out["metrics"][k]["ci_low"] == pytest.approx(lo, abs=1e-12), k
        assert out["metrics"][k]["ci_high"] == pytest.approx(hi, abs=1e-12), k


def test_a_metric_the_champions_decision_lacks_is_skipped_and_one_the_challengers_lacks_fails():
    y, groups = _data()
    p = _proba(y, 2.0, 8)
    flagged = tasks.fit_decision(SPEC, y, p, 0.9)  # flags mel
    gated = ["critical.mel.sensitivity", "per_class.mel.auc"]
    out = _strict(kclass_comparison(SPEC, y, p, flagged, p, ARGMAX, gated, 0.02, 20, 0, groups))
    ni = {e["metric"]: e for e in out["non_inferiority"]["entries"]}
    assert ni["critical.mel.sensitivity"] == {
        "metric": "critical.mel.sensitivity",
        "skipped": True,
        "note": "champion lacks this metric",
    }
    assert out["metrics"]["critical.mel.sensitivity"]["champion"] is None and ni["per_class.mel.auc"]["passed"]
    out = _strict(kclass_comparison(SPEC, y, p, ARGMAX, p, flagged, gated, 0.02, 20, 0, groups))
    ni = {e["metric"]: e for e in out["non_inferiority"]["entries"]}
    assert not ni["critical.mel.sensitivity"]["passed"] and ni["critical.mel.sensitivity"]["value"] is None
    champ = ni["critical.mel.sensitivity"]["champion"]
    assert out["non_inferiority"]["failures"] == [
        f"critical.mel.sensitivity: undefined for the challenger (champion {champ:.3f}): non-inferiority not shown"
    ]
    no_mel = np.where(y == 2, 0, y)  # mel absent from the test labels: its AUC is undefined for both
    out = _strict(kclass_comparison(SPEC, no_mel, p, ARGMAX, p, ARGMAX, ["per_class.mel.auc"], 0.02, 20, 0))
    assert out["non_inferiority"]["entries"][0]["skipped"]
    with pytest.raises(ValueError, match="shape"):
        kclass_comparison(SPEC, y, p, ARGMAX, p[:-1], ARGMAX, gated, 0.02, 20, 0)


def test_the_figure_draws_both_matrices_and_the_deltas(tmp_path):
    from medclf.evaluation.comparison import kclass_comparison_png

    y, groups = _data()
    out = kclass_comparison(SPEC, y, _proba(y, 2, 1), ARGMAX, _proba(y, 1, 2), ARGMAX, [], 0.02, 50, 0, groups)
    cm = out["confusion"]
    path = kclass_comparison_png(
        cm["challenger"], cm["champion"], CLASSES, out["per_class"], tmp_path / "c.png", "t", margin=0.02
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="confusion matrix"):
        kclass_comparison_png(cm["challenger"], [[1]], CLASSES, out["per_class"], tmp_path / "d.png", "t")


# ----------------------------------------------------------------------------- the registry, for real
GRADES = ["g0", "g1", "g2"]
CUTS = [0.8, 1.1]


def _grade_keras(path) -> None:
    """Softmax over the logits [4 - 8m, 1, 8m - 4] of m, the mean intensity in [0, 1]: grade 0 dark, 2 bright."""
    import keras

    inp = keras.Input((16, 16, 1))
    mean = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(
        3,
        activation="softmax",
        kernel_initializer=keras.initializers.Constant([[-8.0, 0.0, 8.0]]),
        bias_initializer=keras.initializers.Constant([4.0, 1.0, -4.0]),
    )(mean)
    keras.Model(inp, out).save(path)


def _register_champion(uri: str, name: str, model_file, tags: dict[str, str]) -> str:
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from medclf.infra.tracking import mlflow_uri
    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, ServingConfig
    from medclf.release.versions import wait_ready

    cfg = ServingConfig(
        GRADES, "g2", 0.5, 16, 1, task="ordinal", cutpoints=CUTS, referable_from=1, referable_threshold=0.6
    )
    cl = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = cl.create_experiment(f"kclass-champion-{uuid.uuid4().hex[:8]}")
    with mlflow_uri(uri), mlflow.start_run(experiment_id=experiment) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=MedclfModel(),
            artifacts={KERAS_ARTIFACT: str(model_file)},
            model_config=cfg.to_dict(),
            pip_requirements=["mlflow"],  # no requirement inference (it would load the model in a subprocess)
        )
    cl.create_registered_model(name)
    mv = cl.create_model_version(name, info.model_uri, run.info.run_id, tags=tags, model_id=info.model_id)
    wait_ready(cl, name, mv.version)
    cl.set_registered_model_alias(name, "champion", mv.version)
    return str(mv.version)


def test_the_champion_is_re_scored_on_this_test_set_by_its_own_registered_decision(
    tmp_path, make_settings, mlflow_server, monkeypatch
):
    from medclf.evaluation import champion
    from medclf.release import registry
    from medclf.release.serving import load_keras

    name = f"kc-{uuid.uuid4().hex[:8]}"
    settings = make_settings({"mlflow": {"tracking_uri": mlflow_server}, "register": {"model_name": name}})
    _grade_keras(tmp_path / "model.keras")
    tags = {
        "classes": json.dumps(GRADES),
        "task": "ordinal",
        "test_set_digest": "the-old-test-set",
        "decision_rule": "grade = the number of cut-points at or below the expected grade",
        "metric.qwk": "0.123",  # measured on another test set: never the reference for this one
    }
    version = _register_champion(mlflow_server, name, tmp_path / "model.keras", tags)
    rng = np.random.default_rng(0)
    x = np.repeat(rng.integers(0, 256, 90).astype(np.uint8), 256).reshape(90, 16, 16, 1)
    y = np.clip(np.round(x.reshape(90, -1).mean(axis=1) / 255 * 2 + rng.normal(0, 0.4, 90)), 0, 2).astype(int)

    ref = registry.kclass_champion(settings, "this-test-set", GRADES, "ordinal", x_test=x, y_test=y)
    assert ref["checked"] and ref["source"] == champion.RESCORED_KCLASS and ref["version"] == version
    proba = np.asarray(load_keras(str(tmp_path / "model.keras")).predict(x, verbose=0), dtype=float)
    np.testing.assert_allclose(ref["proba"], proba, atol=1e-6)
    assert ref["decision"]["cutpoints"] == CUTS and ref["decision"]["referable"] == {
        "from_index": 1.0,
        "threshold": 0.6,
    }
    own = kclass.apply_cutpoints(proba, CUTS)
    assert (own != proba.argmax(axis=1)).sum() >= 5  # its cut-points, not the argmax, make its calls
    expect = kclass.ordinal_report(y, proba, GRADES, pred=own, referable_from=1, referable_threshold=0.6)
    assert ref["metrics"]["qwk"] == pytest.approx(expect["qwk"], abs=1e-9) and ref["metrics"]["qwk"] != 0.123
    assert ref["metrics"]["referable.sensitivity"] == pytest.approx(expect["referable"]["sensitivity"], abs=1e-9)

    # paired with a challenger: the same model and rule differ by 0; the argmax rule by its own QWK
    spec = tasks.TaskSpec("ordinal", tuple(GRADES), referable_from=1)
    comp = kclass_comparison(spec, y, proba, ref["decision"], ref["proba"], ref["decision"], ["qwk"], 0.0, 50, 0)
    assert comp["metrics"]["qwk"]["diff"] == 0.0 and comp["non_inferiority"]["entries"][0]["passed"]
    argmax = tasks.Decision("argmax", referable={"from_index": 1.0, "threshold": 0.6})
    comp = kclass_comparison(spec, y, proba, argmax, ref["proba"], ref["decision"], ["qwk"], 0.0, 50, 0)
    qwk_argmax = kclass.ordinal_report(y, proba, GRADES)["qwk"]
    assert comp["metrics"]["qwk"]["diff"] == pytest.approx(qwk_argmax - expect["qwk"], abs=1e-9)
    # a referable view of another grade measures something else: the champion lacks those metrics
    spec2 = tasks.TaskSpec("ordinal", tuple(GRADES), referable_from=2)
    argmax2 = tasks.Decision("argmax", referable={"from_index": 2.0, "threshold": 0.5})
    comp = kclass_comparison(spec2, y, proba, argmax2, ref["proba"], ref["decision"], ["qwk"], 0.0, 0, 0)
    assert comp["metrics"]["referable.sensitivity"]["champion"] is None
    assert comp["metrics"]["referable.sensitivity"]["challenger"] is not None

    # when it cannot be re-scored: not comparable, no test split, unreachable, the model will not load
    other = registry.kclass_champion(settings, "this-test-set", ["x", "y", "z"], "ordinal", x_test=x, y_test=y)
    assert not other["checked"] and "not comparable" in other["note"]
    assert "not comparable" in registry.kclass_champion(settings, "d", GRADES, "multiclass", x_test=x, y_test=y)["note"]
    assert "another test set" in registry.kclass_champion(settings, "this-test-set", GRADES, "ordinal")["note"]
    tagged = registry.kclass_champion(settings, "the-old-test-set", GRADES, "ordinal")
    assert tagged["source"] == champion.FROM_TAGS and tagged["metrics"] == {"qwk": 0.123}
    off = registry.kclass_champion(settings, "this-test-set", GRADES, "ordinal", reachable=False, x_test=x, y_test=y)
    assert not off["checked"] and not off["server_reachable"]

    def broken(*_a, **_k):
        raise OSError("artifact gone")

    monkeypatch.setattr(registry, "_load_champion", broken)
    fallback = registry.kclass_champion(settings, "the-old-test-set", GRADES, "ordinal", x_test=x, y_test=y)
    assert fallback["source"] == champion.FROM_TAGS and "not re-scored" in fallback["note"]
    with pytest.raises(registry.RegistryError, match="could not be loaded"):
        registry.kclass_champion(settings, "this-test-set", GRADES, "ordinal", x_test=x, y_test=y)
