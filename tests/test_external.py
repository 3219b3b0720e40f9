"""External validation (issue 26, point 1) on real chest X-rays: a held-back set of `../shared` patients that the
model never saw is declared in params, scored at the registered threshold with CIs, gated, and compared with the
internal test; a set that shares an image or a patient with the ingested data is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from tests.conftest import CHEST_XRAY, write_params
from tests.test_evaluate import train_tiny, write_train_run

pytestmark = pytest.mark.slow
PATIENT = re.compile(r"^((?:NORMAL2-)?IM-\d+|person\d+)")
REGEX = r"^((?:NORMAL2-)?IM-\d+|person\d+)"


def _patients(label: str) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for f in sorted((CHEST_XRAY / "train" / label).glob("*.jpeg")):
        m = PATIENT.match(f.name)
        assert m, f.name
        out.setdefault(m.group(1), []).append(f)
    return out


def _copy(files: list[Path], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)


@pytest.fixture(scope="module")
def cohorts() -> dict[str, dict[str, list[Path]]]:
    """Per class, the first patients' images for training and the next, disjoint patients' for the external set."""
    if not (CHEST_XRAY / "train").is_dir():
        pytest.skip(f"{CHEST_XRAY}/train absent (../shared/data, see its README)")
    out: dict[str, dict[str, list[Path]]] = {"internal": {}, "external": {}}
    for label in ("NORMAL", "PNEUMONIA"):
        pts = list(_patients(label).values())
        internal = [f for p in pts[:40] for f in p][:50]
        external = [f for p in pts[200:260] for f in p][:30]
        out["internal"][label], out["external"][label] = internal, external
    return out


def _settings(root: Path, external: list[dict], gates: dict | None = None):
    from medclf.config import load_settings

    overrides = {
        "paths": {"raw_data": str(root / "data/raw"), "external_data": str(root / "data/external")},
        "ingest": {"source": {"kind": "folder", "uri": str(root / "data/raw"), "patient_id_regex": REGEX}},
        "evaluate": {
            "bootstrap": 50,
            "gradcam_n": 0,
            "gates": {"min_f1": 0.0, "min_recall": 0.0},
            "external": external,
        },
        "mlflow": {"tracking_uri": "http://127.0.0.1:9"},  # unreachable: no champion
    }
    if gates is not None:
        overrides["evaluate"]["external"] = [{**e, "gates": gates} for e in external]
    return load_settings(write_params(root, overrides))


@pytest.fixture(scope="module")
def project(tmp_path_factory, cohorts):
    """Real ingest of 100 real images (40 + 40 patients), a tiny model trained on them, the train run."""
    from medclf.stages import ingest

    root = tmp_path_factory.mktemp("external")
    for label, files in cohorts["internal"].items():
        _copy(files, root / "data/raw" / label)
    for label, files in cohorts["external"].items():
        _copy(files, root / "data/external/site_b" / label)
    settings = _settings(root, [])
    ingest.run(settings)
    train_tiny(settings, epochs=4)
    write_train_run(settings, None)
    return root


SITE_B = {"name": "site_b", "source": {"kind": "folder", "uri": "", "patient_id_regex": REGEX}}


def _site(root: Path, name: str = "site_b") -> dict:
    return {**SITE_B, "name": name, "source": {**SITE_B["source"], "uri": str(root / "data/external" / name)}}


def _independent_predictions(settings, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The model's positive-class probability and the label of each image of `folder`, decoded by ingest's decoder
    and predicted here (not through the external module)."""
    import keras

    from medclf.sources import scan
    from medclf.sources.decode import decode_all

    ext = settings.ingest.source.model_copy(update={"uri": str(folder)})
    records = scan(ext, ["NORMAL", "PNEUMONIA"], None, None).records
    decoded = decode_all(records, settings.ingest.model_copy(update={"source": ext}))
    x = np.stack([d.image for d in decoded])
    y = np.array([d.record.label == "PNEUMONIA" for d in decoded], dtype=int)
    model = keras.models.load_model(settings.paths.model_dir / "model.keras", compile=False)
    return np.asarray(model.predict(x, verbose=0))[:, 1], y


def test_external_set_is_scored_at_the_registered_threshold_with_cis_and_its_gap(project):
    from medclf.stages import evaluate

    settings = _settings(project, [_site(project)])
    evaluate.run(settings)
    doc = json.loads((settings.paths.reports_dir / "metrics.json").read_text())
    gates = json.loads((settings.paths.reports_dir / "gates.json").read_text())
    (ext,) = doc["external"]
    assert ext["name"] == "site_b" and ext["n"] == 60 and ext["quarantined"] == 0
    assert ext["support"] == {"NORMAL": 30, "PNEUMONIA": 30} and ext["patients"] >= 30
    p, y = _independent_predictions(settings, project / "data/external/site_b")
    thr = gates["threshold"]  # chosen on validation; the external set is never used to fit anything
    auc = ext["test"]["roc_auc"]
    assert auc["value"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert ext["test"]["recall"]["value"] == pytest.approx(skm.recall_score(y, p >= thr), abs=1e-9)
    assert ext["test"]["specificity"]["value"] == pytest.approx(skm.recall_score(1 - y, p < thr), abs=1e-9)
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"] and auc["ci_high"] - auc["ci_low"] > 0
    for name, gap in ext["gap"].items():  # internal minus external, for each headline figure
        assert gap == pytest.approx(doc["test"][name] - ext["test"][name]["value"]), name
        assert ext["internal"][name] == doc["test"][name]
    assert {"roc_auc", "recall", "specificity", "f1"} <= ext["gap"].keys()
    assert ext["champion"] is None and gates["external"] == [{"name": "site_b", "n": 60, "passed": True, "gates": []}]
    written = json.loads((settings.paths.reports_dir / "evaluate" / "external.json").read_text())
    assert written == doc["external"]


def test_a_failed_external_gate_fails_the_release_and_names_the_set(project):
    from medclf.stages import evaluate

    settings = _settings(project, [_site(project)], gates={"auc": 0.9999})
    with pytest.raises(evaluate.GateFailed, match=r"external set site_b: roc_auc 0\.\d+ < 0\.9999"):
        evaluate.run(settings)
    gates = json.loads((settings.paths.reports_dir / "gates.json").read_text())
    assert gates["passed"] is False and gates["external"][0]["gates"][0]["metric"] == "roc_auc"
    with pytest.raises(Exception, match=r"gates\.qwk: not a metric of this binary task"):
        evaluate.run(_settings(project, [_site(project)], gates={"qwk": 0.5}))


def test_an_external_set_sharing_an_image_or_a_patient_with_the_training_data_is_refused(project, cohorts):
    from medclf.evaluation.external import ExternalSetError
    from medclf.stages import evaluate

    site = project / "data/external/leaky"
    _copy(cohorts["external"]["NORMAL"][:10], site / "NORMAL")
    _copy(cohorts["external"]["PNEUMONIA"][:10], site / "PNEUMONIA")
    trained = cohorts["internal"]["PNEUMONIA"][0]
    shutil.copy2(trained, site / "PNEUMONIA" / trained.name)  # the very image the model trained on
    with pytest.raises(ExternalSetError, match=r"'leaky' overlaps .* 1 image\(s\) by image hash and 1 by patient"):
        evaluate.run(_settings(project, [_site(project, "leaky")]))
    (site / "PNEUMONIA" / trained.name).unlink()
    # the same patient, the bytes re-encoded: no image in common, still not external
    other = cohorts["internal"]["NORMAL"][0]
    Image.open(other).convert("L").save(site / "NORMAL" / other.name, quality=70)
    with pytest.raises(ExternalSetError, match=r"0 image\(s\) by image hash and 1 by patient"):
        evaluate.run(_settings(project, [_site(project, "leaky")]))


def test_an_external_source_outside_paths_external_data_is_a_config_error(tmp_path):
    from medclf.config import ConfigError, load_settings

    outside = {"name": "b", "source": {"kind": "folder", "uri": "/x"}}
    params = write_params(tmp_path, {"evaluate": {"external": [outside]}})
    with pytest.raises(ConfigError, match=r"set 'b' reads '/x', which is not under paths.external_data"):
        load_settings(params)
    dup = {"evaluate": {"external": [_site(tmp_path, "b"), _site(tmp_path, "b")]}}
    with pytest.raises(ConfigError, match=r"the set name\(s\) \['b'\] appear more than once"):
        load_settings(write_params(tmp_path, dup))


def test_the_champion_is_rescored_on_each_external_set(project, mlflow_server):
    """The same model registered and made champion: on the external images its figures equal the candidate's."""
    import uuid

    from mlflow import MlflowClient

    from medclf.config import load_settings
    from medclf.stages import evaluate, register

    settings = _settings(project, [_site(project)])
    params = settings.model_dump(mode="json", by_alias=True)
    params["mlflow"]["tracking_uri"] = mlflow_server
    params["register"]["model_name"] = name = f"external-{uuid.uuid4().hex[:8]}"
    path = project / "params-champion.yaml"
    path.write_text(json.dumps(params))
    settings = load_settings(path)
    write_train_run(settings, mlflow_server)
    evaluate.run(settings)
    assert register.run(settings)["version"] == 1
    v1 = MlflowClient(mlflow_server).get_model_version(name, "1")
    first_screen = v1.description.split("---")[0]  # the decision facts, before the detail
    assert re.search(
        r"\*\*External set site_b\*\* \(n=60\): ROC-AUC \*\*0\.\d{3}\*\* \(0\.\d{3}–[01]\.\d{3}\), internal "
        r"[01]\.\d{3}: gap [+-]\d\.\d{3}",
        first_screen,
    ), first_screen
    assert "**External validation**" in v1.description and "| site_b | 60 | roc_auc |" in v1.description
    assert "**Robustness**" in v1.description and "no gate (evaluate.robustness.max_drop)" in v1.description
    MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", "1")
    evaluate.run(settings)
    (ext,) = json.loads((settings.paths.reports_dir / "metrics.json").read_text())["external"]
    assert ext["champion"]["version"] == 1
    for metric in ("roc_auc", "recall", "specificity", "f1"):
        assert ext["champion"]["metrics"][metric] == pytest.approx(ext["test"][metric]["value"], abs=1e-6), metric


def test_a_kclass_external_set_is_scored_by_the_registered_decision_with_per_class_gates():
    """Multi-class: the argmax decision and the per-class gate names of the internal test, on the external set."""
    from medclf.config import ExternalSet, Source, Task
    from medclf.evaluation import external
    from medclf.evaluation.task import TaskSpec, fit_decision

    spec = TaskSpec.from_settings(Task(type="multiclass", critical_classes=["mel"]), ["bcc", "mel", "nv"], None)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    proba = rng.dirichlet(np.ones(3), y.size) + np.eye(3)[y] * 0.6
    proba /= proba.sum(axis=1, keepdims=True)
    decision = fit_decision(spec, y, proba, 0.9)
    scored = external.score_kclass(spec, decision, y, proba, 50, 0, None)
    assert scored["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, proba.argmax(axis=1)))
    data = external.ExternalData("derm_b", np.zeros((y.size, 4, 4, 3), np.uint8), y, "d", None, [])
    internal = {"balanced_accuracy": 0.9, "macro_auc": 0.95, "macro_f1": 0.9, "accuracy": 0.9}
    rep = external.set_report(data, spec, scored, internal, None, {"recall[mel]": 0.99, "macro_auc": 0.5})
    assert rep["gap"]["balanced_accuracy"] == pytest.approx(0.9 - scored["balanced_accuracy"]["value"])
    by = {g["metric"]: g for g in rep["gates"]}
    assert by["per_class.mel.recall"]["value"] == pytest.approx(skm.recall_score(y == 1, proba.argmax(1) == 1))
    assert by["macro_auc"]["passed"] and not by["per_class.mel.recall"]["passed"] and not rep["passed"]
    assert external.failures([rep]) == [
        f"external set derm_b: per_class.mel.recall {by['per_class.mel.recall']['value']:.3f} < 0.99"
    ]
    bad = ExternalSet(name="x", source=Source(kind="folder", uri="/x"), gates={"qwk": 0.5})
    with pytest.raises(external.ExternalSetError, match=r"gates\.qwk: not a metric of this multiclass task"):
        external.check_gate_names(spec, [bad])
    rows = external.markdown([rep])
    assert rows[0].startswith("| external set | n | metric |")
    assert any("| derm_b | 120 | balanced_accuracy |" in r for r in rows)


def test_evaluate_writes_a_complete_robustness_report_and_its_gate_can_fail_the_release(project):
    """Issue 26.2 in the stage: every registered shift is a result or a named skip; the worst-drop gate fails it."""
    from medclf.evaluation import robustness
    from medclf.stages import evaluate

    settings = _settings(project, [])
    evaluate.run(settings)
    rep = json.loads((settings.paths.reports_dir / "evaluate" / "robustness.json").read_text())
    robustness.assert_complete(rep, invertible=True)  # chest X-rays: inversion applies
    names = {r["name"] for r in rep["perturbations"]}
    assert names == {p.name for p in robustness.PERTURBATIONS} and rep["skipped"] == []
    assert rep["n"] == len(np.load(settings.paths.ingest_dir / "test_labels.npy"))
    doc = json.loads((settings.paths.reports_dir / "metrics.json").read_text())
    assert doc["robustness"]["worst"]["roc_auc"]["name"] in names
    assert (settings.paths.reports_dir / "evaluate" / "robustness.png").stat().st_size > 10_000
    strict = _settings(project, [])
    params = strict.model_dump(mode="json", by_alias=True)
    params["evaluate"]["robustness"]["max_drop"] = 1e-9
    (project / "params-robust.yaml").write_text(json.dumps(params))
    from medclf.config import load_settings

    with pytest.raises(evaluate.GateFailed, match=r"robustness: roc_auc drops 0\.\d+ > 1e-09"):
        evaluate.run(load_settings(project / "params-robust.yaml"))
