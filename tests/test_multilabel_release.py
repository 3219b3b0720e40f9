"""The multi-label release (issue 25): the served output (schema 3) calls each finding present at ITS OWN registered
threshold, `labels` joins the present findings in label order; a config whose thresholds are not exactly the findings
does not load; a tiny real sigmoid Keras model is served through the pyfunc and `medclf predict`; the version page
and the model card of a hand-built multilabel metrics/gates document (the evaluate contract) carry the per-finding
table, every finding's threshold and its rule, and fit the registry's 5,000-character description. No MLflow
server: the pyfunc is saved to and loaded from a local folder."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.config.vocabulary import MULTILABEL_HEADLINE, OUTPUT_SCHEMA_VERSION
from medclf.release.serving import ServingConfig, decision_columns, decisions, signature, task_keys

FINDINGS = ["glaucoma", "cataract", "amd"]
# very different thresholds: applying one finding's threshold to another changes many calls
THRESHOLDS = {"glaucoma": 0.05, "cataract": 0.5, "amd": 0.93}


def _cfg(classes: list[str] = FINDINGS, thresholds: dict[str, float] | None = None, **kw) -> ServingConfig:
    base = {"positive_class": classes[-1], "threshold": 0.5, "image_size": 16, "channels": 1, "task": "multilabel"}
    return ServingConfig(
        classes=classes, thresholds=dict(THRESHOLDS if thresholds is None else thresholds), **base | kw
    )


def _uniform(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, k))


# ----------------------------------------------------------------------------- each finding at its own threshold
def test_each_finding_is_called_present_at_its_own_threshold():
    proba = np.vstack(
        [
            [[0.05, 0.5, 0.93]],  # every probability exactly at its own threshold: all present (p >= threshold)
            [[0.0499, 0.4999, 0.9299]],  # just below each: none
            [[0.06, 0.06, 0.06]],  # above glaucoma's 0.05 only
            [[0.94, 0.94, 0.94]],  # above all three
            [[0.6, 0.2, 0.6]],  # glaucoma yes; cataract no; amd 0.6 < 0.93 no
            _uniform(600, 3),
        ]
    )
    # the thresholds given in another order than the findings: they are looked up by name, never by position
    cfg = _cfg(thresholds={"amd": 0.93, "glaucoma": 0.05, "cataract": 0.5})
    out = decisions(proba, cfg)
    assert list(out.columns) == [
        "p_glaucoma",
        "p_cataract",
        "p_amd",
        "labels",
        "present_glaucoma",
        "present_cataract",
        "present_amd",
    ]
    np.testing.assert_array_equal(out[["p_glaucoma", "p_cataract", "p_amd"]].to_numpy(), proba)
    for j, c in enumerate(FINDINGS):
        assert out[f"present_{c}"].dtype == bool
        np.testing.assert_array_equal(out[f"present_{c}"].to_numpy(), proba[:, j] >= THRESHOLDS[c])
    assert out["present_glaucoma"].tolist()[:5] == [True, False, True, True, True]
    assert out["present_cataract"].tolist()[:5] == [True, False, False, True, False]
    assert out["present_amd"].tolist()[:5] == [True, False, False, True, False]
    # the test tells the thresholds apart: any other finding's threshold gives other calls on many rows
    for j, c in enumerate(FINDINGS):
        for other in FINDINGS:
            if other != c:
                wrong = proba[:, j] >= THRESHOLDS[other]
                assert (wrong != out[f"present_{c}"].to_numpy()).sum() > 100, (c, other)
    # and so is the one global threshold the config also carries (0.5, for binary): never used here
    assert (out["present_glaucoma"].to_numpy() != (proba[:, 0] >= cfg.threshold)).sum() > 100


def test_labels_join_the_present_findings_in_label_order():
    proba = np.array(
        [
            [0.9, 0.9, 0.99],  # all
            [0.01, 0.1, 0.2],  # none: ""
            [0.01, 0.7, 0.95],  # cataract and amd
            [0.3, 0.1, 0.95],  # glaucoma and amd (label order, not probability order)
            [0.01, 0.1, 0.94],  # amd alone
        ]
    )
    out = decisions(proba, _cfg(thresholds={"amd": 0.93, "cataract": 0.5, "glaucoma": 0.05}))
    assert out["labels"].tolist() == ["glaucoma;cataract;amd", "", "cataract;amd", "glaucoma;amd", "amd"]
    assert str(out["labels"].dtype) in ("str", "object", "string")
    # `labels` is exactly the present_* columns, joined in the findings' order, on any input
    many = _uniform(3000, 3, seed=1)
    out = decisions(many, _cfg())
    present = out[[f"present_{c}" for c in FINDINGS]].to_numpy()
    assert out["labels"].tolist() == [";".join(c for c, p in zip(FINDINGS, row, strict=True) if p) for row in present]
    assert "" in set(out["labels"]) and len(set(out["labels"])) == 8  # every combination occurs, none included


def test_no_rows_give_the_columns_and_no_binary_or_kclass_columns():
    cfg = _cfg()
    out = decisions(np.zeros((0, 3)), cfg)
    assert len(out) == 0 and list(out.columns) == list(decision_columns(cfg))
    assert str(out["labels"].dtype) in ("str", "object", "string") and out["present_amd"].dtype == bool
    out = decisions(_uniform(4, 3), cfg)
    assert not {"label", "positive", "prediction"} & set(out.columns)


def test_signature_describes_the_columns_decisions_returns():
    cfg = _cfg()
    out = decisions(_uniform(7, 3, seed=4), cfg)
    sig = signature(cfg)
    types = {"float64": "double", "str": "string", "object": "string", "bool": "boolean"}
    assert sig.outputs.input_names() == list(out.columns) == list(decision_columns(cfg))
    assert [t.name for t in sig.outputs.input_types()] == [types[str(t)] for t in out.dtypes]
    assert sig.inputs.input_names() == ["image"]


# ----------------------------------------------------------------------------- the config
GATES_DOC = {
    "task": "multilabel",
    "decision": {
        "rule": "each finding is called present when ...",
        "thresholds": {
            "glaucoma": {"threshold": 0.05, "rule": "target_sensitivity", "target": 0.9, "n_positive": 12},
            "cataract": {"threshold": 0.5, "rule": "f1", "target": None, "n_positive": 30},
            "amd": {"threshold": 0.93, "rule": "target_sensitivity", "target": 0.95, "n_positive": 9},
        },
        "source": "validation",
    },
    "passed": True,
}


def test_task_keys_read_the_per_finding_thresholds_of_the_gates_document():
    keys = task_keys(GATES_DOC)
    assert keys == {"task": "multilabel", "thresholds": THRESHOLDS}
    cfg = ServingConfig(FINDINGS, "amd", 0.5, 16, 1, **keys)
    assert cfg.thresholds == THRESHOLDS and cfg.schema_version == OUTPUT_SCHEMA_VERSION == 3
    d = cfg.to_dict()
    assert d["thresholds"] == THRESHOLDS and d["schema_version"] == 3 and ServingConfig.from_dict(d) == cfg
    # a gates.json whose thresholds miss a finding gives a config that refuses to load
    short = {**GATES_DOC, "decision": {"thresholds": {"glaucoma": {"threshold": 0.05}}}}
    with pytest.raises(ValueError, match=r"thresholds must name exactly the findings .*missing \['cataract', 'amd'\]"):
        ServingConfig(FINDINGS, "amd", 0.5, 16, 1, **task_keys(short))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"thresholds": {"glaucoma": 0.05, "cataract": 0.5}}, "missing ['amd'], unknown []"),
        ({"thresholds": {**THRESHOLDS, "myopia": 0.3}}, "missing [], unknown ['myopia']"),
        ({"thresholds": {}}, "thresholds must name exactly the findings"),
        ({"thresholds": {**THRESHOLDS, "amd": 1.5}}, "within [0, 1]"),
        ({"thresholds": {**THRESHOLDS, "amd": math.nan}}, "within [0, 1]"),
        ({"schema_version": 2}, "schema_version"),
        ({"schema_version": 4}, "schema_version"),
        ({"flags": {"amd": 0.5}}, "multiclass setting"),
        ({"cutpoints": [0.5, 1.5]}, "ordinal task"),
        ({"classes": ["glaucoma", "cataract;amd"], "thresholds": {"glaucoma": 0.1, "cataract;amd": 0.2}}, "';'"),
        ({"classes": ["amd", "amd"], "thresholds": {"amd": 0.2}}, "distinct"),
    ],
)
def test_a_multilabel_config_that_cannot_decide_is_refused(kw, message):
    classes = kw.pop("classes", FINDINGS)
    with pytest.raises(ValueError, match="invalid serving config") as err:
        _cfg(classes, **kw)
    assert message in str(err.value)


def test_thresholds_belong_to_a_multilabel_task_and_older_schemas_still_load():
    with pytest.raises(ValueError, match="thresholds .* are a multilabel setting"):
        ServingConfig(["akiec", "mel", "nv"], "mel", 0.3, 16, 1, task="multiclass", thresholds={"mel": 0.2})
    # a multiclass model registered under schema 2 loads as it was, with the columns it had
    v2 = ServingConfig(["akiec", "mel", "nv"], "mel", 0.3, 16, 1, task="multiclass", flags={"mel": 0.2})
    old = {k: v for k, v in v2.to_dict().items() if k != "thresholds"} | {"schema_version": 2}
    loaded = ServingConfig.from_dict(old)
    assert loaded.schema_version == 2 and loaded.thresholds == {}
    assert list(decision_columns(loaded)) == ["p_akiec", "p_mel", "p_nv", "prediction", "flag_mel"]
    binary = ServingConfig(["NORMAL", "PNEUMONIA"], "PNEUMONIA", 0.3, 16, 1)
    assert binary.schema_version == 3 and list(decision_columns(binary)) == [
        "p_NORMAL",
        "p_PNEUMONIA",
        "label",
        "positive",
    ]


# ----------------------------------------------------------------------------- a real sigmoid model, saved and loaded
def _grey_png(value: int, side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _sigmoid_keras(path) -> None:
    """Three sigmoids of m, the mean intensity in [0, 1]: glaucoma sigmoid(8m - 4) (bright), cataract
    sigmoid(4 - 8m) (dark), amd sigmoid(1) ~ 0.73 whatever the image (below its threshold 0.93: never present)."""
    import keras

    inp = keras.Input((16, 16, 1))
    mean = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(
        3,
        activation="sigmoid",
        kernel_initializer=keras.initializers.Constant([[8.0, -8.0, 0.0]]),
        bias_initializer=keras.initializers.Constant([-4.0, 4.0, 1.0]),
    )(mean)
    keras.Model(inp, out).save(path)


def test_saved_sigmoid_pyfunc_and_medclf_predict_write_the_schema_3_columns(tmp_path, make_settings):
    import mlflow.pyfunc

    from medclf.release.predict import predict_paths
    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, encode_file, load_keras, prepare

    _sigmoid_keras(tmp_path / "model.keras")
    # glaucoma at 0.05, cataract at 0.5: a mid grey (120/255: p_glaucoma 0.44, p_cataract 0.56) calls both
    cfg = ServingConfig(FINDINGS, str(None), 0.5, 16, 1, **task_keys(GATES_DOC))
    mlflow.pyfunc.save_model(
        path=str(tmp_path / "pyfunc"),
        python_model=MedclfModel(),
        artifacts={KERAS_ARTIFACT: str(tmp_path / "model.keras")},
        model_config=cfg.to_dict(),
        signature=signature(cfg),
        metadata={"output_schema_version": cfg.schema_version},  # as `medclf register` logs it
        pip_requirements=["mlflow"],
    )
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    assert model.metadata.metadata["output_schema_version"] == 3
    assert model.metadata.get_output_schema().input_names() == list(decision_columns(cfg))
    assert model.unwrap_python_model().cfg == cfg
    files = [_grey_png(v) for v in (10, 120, 245, 60)]
    out = model.predict(pd.DataFrame({"image": [encode_file(f) for f in files]}))
    reference = np.asarray(
        load_keras(str(tmp_path / "model.keras")).predict(np.stack([prepare(f, cfg) for f in files]), verbose=0)
    )
    np.testing.assert_allclose(out[["p_glaucoma", "p_cataract", "p_amd"]].to_numpy(), reference, atol=1e-6)
    assert list(out.columns) == list(decision_columns(cfg))
    for j, c in enumerate(FINDINGS):
        assert out[f"present_{c}"].tolist() == (reference[:, j] >= THRESHOLDS[c]).tolist()
    # dark: cataract (p_glaucoma 0.02 < 0.05); mid grey: both; bright: glaucoma; 60/255: both (p_glaucoma 0.11)
    assert out["labels"].tolist() == ["cataract", "glaucoma;cataract", "glaucoma", "glaucoma;cataract"]
    assert not out["present_amd"].any() and (out["p_amd"] > 0.7).all()  # above 0.5 and cataract's 0.5, below 0.93

    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate([*files, _grey_png(250)]):
        (folder / f"img{i}.png").write_bytes(f)
    (folder / "img9.png").write_bytes(b"not an image")
    res = predict_paths([folder], str(tmp_path / "pyfunc"), tmp_path / "out.csv", make_settings())
    df = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    thresholds = [f"threshold_{c}" for c in FINDINGS]
    assert list(df.columns) == ["path", *decision_columns(cfg), "error", *thresholds, "model_uri", "model_version"]
    assert df["labels"].tolist()[:5] == ["cataract", "glaucoma;cataract", "glaucoma", "glaucoma;cataract", "glaucoma"]
    assert df["labels"].tolist()[5] == "" and df["error"].tolist()[5] != ""  # the undecodable file: its error
    assert df["present_cataract"].tolist() == ["True", "True", "False", "True", "False", ""]
    assert [float(df[t][0]) for t in thresholds] == [0.05, 0.5, 0.93]
    assert res["task"] == "multilabel" and res["labels"] == {"glaucoma": 4, "cataract": 3, "amd": 0}
    assert res["no_finding"] == 0 and res["failed"] == 1 and "threshold" not in res


# ----------------------------------------------------------------------------- the version page and the model card
ODIR = ["normal", "diabetic_retinopathy", "glaucoma", "cataract", "amd", "hypertensive_retinopathy", "myopia", "other"]
_ODIR_THRESHOLDS = [0.4123, 0.2871, 0.0512, 0.6634, 0.1178, 0.0333, 0.5555, 0.2468]


def _multilabel_docs() -> tuple[dict, dict]:
    """A metrics.json and gates.json as evaluate writes them for a multilabel task (the contract), by hand."""
    fits = {
        c: {
            "threshold": t,
            "rule": "f1" if c == "other" else "target_sensitivity",
            "target": None if c == "other" else 0.8,
            "val_sensitivity": 0.81 + i / 100,
            "val_specificity": 0.7 + i / 50,
            "val_f1": 0.5 + i / 40,
            "n_positive": 20 + 3 * i,
        }
        for i, (c, t) in enumerate(zip(ODIR, _ODIR_THRESHOLDS, strict=True))
    }
    rule = "each finding is called present when its own probability reaches its threshold, fitted on validation: "
    rule += ", ".join(f"{c} >= {f['threshold']:.4f}" for c, f in fits.items())
    decision = {"rule": rule, "thresholds": fits, "source": "validation"}
    summary = {
        "macro_auc": 0.8612,
        "micro_auc": 0.8844,
        "map": 0.5531,
        "macro_f1": 0.4987,
        "micro_f1": 0.5712,
        "hamming_loss": 0.1123,
        "subset_accuracy": 0.3345,
        "ece": 0.0456,
        "label_cardinality": 1.21,
    }
    test: dict = {}
    for k, v in summary.items():
        test |= {k: v, f"{k}_ci_low": v - 0.0311, f"{k}_ci_high": v + 0.0277}
    per_class = {}
    for i, c in enumerate(ODIR):
        row = {"auc": 0.75 + i / 50, "ap": 0.3 + i / 30, "recall": 0.8 - i / 100, "specificity": 0.66 + i / 60}
        row |= {"precision": 0.4 + i / 40, "f1": 0.45 + i / 45}
        for m, v in row.items():
            test |= {f"per_class.{c}.{m}": v, f"per_class.{c}.{m}_ci_low": v - 0.05, f"per_class.{c}.{m}_ci_high": v}
        per_class[c] = {**row, "support": 17 + i, "prevalence": (17 + i) / 400, "ece": 0.03}
    test["n"] = 400
    metrics_doc = {
        "task": "multilabel",
        "classes": ODIR,
        "decision": decision,
        "val": {"n": 380},
        "test": test,
        "per_class": per_class,
    }
    floors = [
        {"name": "macro_auc", "metric": "macro_auc", "value": 0.8612, "bound": 0.75, "op": ">=", "passed": True},
        {
            "name": "per_class.cataract.auc",
            "metric": "per_class.cataract.auc",
            "value": 0.81,
            "bound": 0.85,
            "op": ">=",
            "passed": False,
        },
    ]
    gates = {
        "task": "multilabel",
        "decision": decision,
        "passed": False,
        "failures": ["per_class.cataract.auc 0.810 < per_class.cataract.auc 0.850"],
        "gates": floors,
        "non_inferiority": {"skipped": True, "note": "no champion registered"},
        "threshold_rule": rule,
        "threshold_source": "validation",
        "model_sha256": "ab" * 32,
        "test_set_digest": "cd" * 32,
        "train_run_id": "f" * 32,
        "champion": {"alias": "champion", "checked": False, "note": "no champion registered"},
    }
    return metrics_doc, gates


PROV = {
    "raw_data_md5": "4deab90289cf8d06502afe821e154304.dir",
    "raw_data_nfiles": "6392",
    "raw_data": "../shared/data/fundus_odir",
    "git_commit": "4d5eb174aa",
    "positive_class": "None",
}
FITTED = {
    "method": "temperature_per_finding",
    "temperatures": {c: 1.0 + (i - 3) / 10 for i, c in enumerate(ODIR)},
    "temperature": 1.0,
    "n_val": 380,
    "val_before": {"ece": 0.081},
    "val_after": {"ece": 0.042},
}


def _links() -> dict[str, str]:
    from medclf.release.model_card import run_links

    figures = ["gradcam", "champion_comparison", "gradcam_glaucoma", "gradcam_cataract"]
    return run_links("http://127.0.0.1:5000", "17", "f" * 32, figures, None, "medclf-odir-findings", "3")


def test_the_version_page_has_the_per_finding_table_the_rule_and_fits_the_registry():
    from medclf.release.model_card import DESCRIPTION_LIMIT, version_description

    metrics_doc, gates = _multilabel_docs()
    page = version_description(gates, metrics_doc, PROV, "f" * 32, None, _links(), FITTED)
    assert len(page) <= DESCRIPTION_LIMIT == 5000
    first, _, detail = page.partition("\n---\n")
    # the first screen: the verdict, the headline with CIs, every finding's threshold and how it was fitted
    assert "**Gates: FAILED** (1 of 2 floors; non-inferiority not checked: no champion registered)" in first
    # every summary figure with its CI, the headline first
    assert (
        "- **Test split** (n=400, 95 % CI): macro ROC-AUC **0.861** (0.830–0.889) · mAP **0.553** (0.522–0.581)"
        in first
    )
    assert "· Hamming loss **0.112** (0.081–0.140) · micro ROC-AUC **0.884** (0.853–0.912)" in first
    assert "subset accuracy **0.335** (0.303–0.362) · mean ECE **0.046** (0.015–0.073)" in first
    assert "**Decision rule (multilabel):**" in first and "fitted on the validation split" in first
    # every finding's threshold, grouped by the rule it was fitted for
    on_sensitivity = ", ".join(f"`{c}` ≥ {t:.4f}" for c, t in zip(ODIR[:-1], _ODIR_THRESHOLDS, strict=False))
    assert f"for sensitivity 0.8: {on_sensitivity}; for best F1: `other` ≥ 0.2468" in first
    assert "per-finding temperature scaling, T 0.70–1.40 over 8 findings" in first
    assert "Operating point" not in page and "p(None)" not in page  # no binary threshold on a multilabel page
    # the detail: the per-finding table, every finding with its threshold, positives and CIs
    head = "| finding | threshold | positives (prevalence) | ROC-AUC (95 % CI) | AP (95 % CI) | sensitivity (95 % CI) |"
    assert head in detail and "| specificity (95 % CI) | F1 (95 % CI) |" in detail
    assert (
        "| glaucoma | 0.0512 | 19 (0.048) | 0.790 (0.740–0.790) | 0.367 (0.317–0.367) | 0.780 (0.730–0.780) |" in detail
    )
    for c, t in zip(ODIR, _ODIR_THRESHOLDS, strict=True):
        assert f"| {c} | {t:.4f} | " in detail


def test_the_whole_page_states_how_each_threshold_was_fitted_and_the_gates():
    from medclf.release.model_card import fit_description, model_card, model_card_json, version_description

    metrics_doc, gates = _multilabel_docs()
    whole = version_description(gates, metrics_doc, PROV, "f" * 32, None, _links(), FITTED, limit=None)
    assert len(whole) > 5000  # this one needs cutting for the registry: fit_description keeps the first screen whole
    cut = fit_description(whole)
    assert len(cut) <= 5000 and cut.partition("\n---\n")[0] == whole.partition("\n---\n")[0]
    assert cut == version_description(gates, metrics_doc, PROV, "f" * 32, None, _links(), FITTED)
    assert "| finding | threshold | fitted for | val sensitivity | val specificity | val F1 | val positives |" in whole
    assert "| glaucoma | 0.0512 | sensitivity 0.8 | 0.830 | 0.740 | 0.550 | 26 |" in whole
    assert "| other | 0.2468 | best F1 | 0.880 | 0.840 | 0.675 | 41 |" in whole
    assert "| mean average precision (mAP) | **0.553** | 0.522–0.581 |" in whole
    assert "| subset accuracy (every finding right) | **0.335** | 0.303–0.362 |" in whole
    assert "- pass: macro_auc 0.861 >= 0.750 (macro_auc)" in whole
    assert "- FAIL: per_class.cataract.auc 0.810 >= 0.850 (per_class.cataract.auc)" in whole
    assert "per-finding temperature scaling fitted on the validation split (T: normal 0.70, " in whole
    assert "validation mean ECE 0.081 → 0.042" in whole and "Calibrated by per-finding temperature scaling" in whole

    meta = {"classes": ODIR, "positive_class": None, "image_size": 96, "channels": 3, "task": "multilabel"}
    train_run = {"backbone": "mobilenet_v2", "weights": "imagenet", "calibration": FITTED}
    card = model_card(whole, meta, PROV, train_run, {"train": 4000, "val": 380, "test": 400}, {}, gates)
    assert card.startswith("# Model card: mobilenet_v2 for the findings normal, diabetic_retinopathy, glaucoma")
    assert "present or absent in an image (any number at once), each at its own threshold" in card
    assert " vs " not in card.split("\n")[0]
    doc = model_card_json(meta, PROV, train_run, {"test": 400}, {}, gates, metrics_doc, None)
    assert doc["intended_use"]["task"] == "multilabel"
    assert doc["operating_point"]["thresholds"]["amd"]["threshold"] == 0.1178
    assert doc["metrics"]["map"] == {"value": 0.5531, "ci95": [0.5531 - 0.0311, 0.5531 + 0.0277]}
    assert set(MULTILABEL_HEADLINE) <= set(doc["metrics"])
    assert doc["metrics"]["per_finding"]["glaucoma"]["auc"]["value"] == pytest.approx(0.79)
    assert doc["metrics"]["per_finding"]["glaucoma"]["support"] == 19
