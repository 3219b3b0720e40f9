"""The served output schema (issue 24): a multi-class or ordinal model's `prediction` is its argmax (or its ordinal
cut-points' grade), never one class's threshold; critical flags and the referable view sit beside it; a binary
model's output is schema 1's, unchanged; models registered before the task keys load as binary schema 1; the
signature describes exactly the columns `decisions` returns. No MLflow server: `decisions`, `signature` and
`ServingConfig` are called directly, and the pyfunc is saved to and loaded from a local folder."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.config import Task
from medclf.evaluation import kclass
from medclf.evaluation.metrics import thresholded_labels
from medclf.evaluation.task import OUTPUT_SCHEMA_VERSION, TaskSpec
from medclf.release.serving import ServingConfig, decision_columns, decisions, signature, task_keys

SKIN = ["akiec", "mel", "nv"]
GRADES = ["g0", "g1", "g2", "g3", "g4"]
ROUND = [0.5, 1.5, 2.5, 3.5]  # the cut-points that round the expected grade


def _cfg(classes: list[str], **kw) -> ServingConfig:
    base = {"positive_class": classes[-1], "threshold": 0.5, "image_size": 16, "channels": 1}
    return ServingConfig(classes=classes, **{**base, **kw})


def _multiclass(**kw) -> ServingConfig:
    # positive_class/threshold are set so that the old one-vs-rest rule would call 'mel' at p(mel) >= 0.3
    return _cfg(SKIN, task="multiclass", **{"positive_class": "mel", "threshold": 0.3, **kw})


def _ordinal(**kw) -> ServingConfig:
    return _cfg(GRADES, task="ordinal", **kw)


def _dirichlet(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(k, 0.7), size=n)


# ----------------------------------------------------------------------------- (a) multi-class: the argmax
def test_multiclass_prediction_is_the_argmax_not_one_class_threshold():
    """Rows where p(mel) >= the config's threshold 0.3 but nv (or akiec) is the most probable class: the
    prediction is the argmax. The old rule (`thresholded_labels(proba, mel, 0.3)`) would say mel there."""
    fixed = np.array([[0.20, 0.35, 0.45], [0.40, 0.31, 0.29], [0.10, 0.60, 0.30], [0.05, 0.30, 0.65]])
    proba = np.vstack([fixed, _dirichlet(300, 3)])
    cfg = _multiclass()
    out = decisions(proba, cfg)
    argmax = [SKIN[i] for i in proba.argmax(axis=1)]
    assert out["prediction"].tolist() == argmax
    assert out["prediction"].tolist()[:4] == ["nv", "akiec", "mel", "nv"]
    # the test can tell the two rules apart: one-vs-rest on mel disagrees with the argmax on many rows
    one_vs_rest = [SKIN[i] for i in thresholded_labels(proba, SKIN.index("mel"), 0.3)]
    assert one_vs_rest[:4] == ["mel", "mel", "mel", "mel"]
    assert sum(a != b for a, b in zip(argmax, one_vs_rest, strict=True)) > 30
    assert "label" not in out and "positive" not in out  # no binary columns on a K-class model
    np.testing.assert_array_equal(out[[f"p_{c}" for c in SKIN]].to_numpy(), proba)


# ----------------------------------------------------------------------------- (b) critical flags
def test_critical_flags_fire_at_their_threshold_and_never_change_the_prediction():
    proba = np.array(
        [
            [0.50, 0.25, 0.25],  # p(mel) exactly at its threshold: flagged (p >= threshold)
            [0.50, 0.24999, 0.25001],  # just below: not flagged
            [0.125, 0.125, 0.75],  # p(akiec) exactly at its threshold
            [0.70, 0.20, 0.10],
        ]
    )
    flagged = _multiclass(flags={"mel": 0.25, "akiec": 0.125})
    out = decisions(proba, flagged)
    assert list(out.columns) == ["p_akiec", "p_mel", "p_nv", "prediction", "flag_mel", "flag_akiec"]
    assert out["flag_mel"].tolist() == [True, False, False, False]
    assert out["flag_akiec"].tolist() == [True, True, True, True]
    assert out["flag_mel"].dtype == bool and out["flag_akiec"].dtype == bool
    assert out["prediction"].tolist() == ["akiec", "akiec", "nv", "akiec"]  # row 0: flagged mel, predicted akiec
    # flags at any threshold (0: every row flagged) leave every prediction as it is without them
    many = _dirichlet(400, 3, seed=1)
    plain = decisions(many, _multiclass())["prediction"]
    assert plain.tolist() == [SKIN[i] for i in many.argmax(axis=1)]
    for thr in (0.0, 0.05, 0.3, 0.9, 1.0):
        out = decisions(many, _multiclass(flags={"mel": thr, "nv": thr}))
        pd.testing.assert_series_equal(out["prediction"], plain)
        np.testing.assert_array_equal(out["flag_mel"].to_numpy(), many[:, 1] >= thr)
        np.testing.assert_array_equal(out["flag_nv"].to_numpy(), many[:, 2] >= thr)


# ----------------------------------------------------------------------------- (c) ordinal
def test_ordinal_cutpoints_give_the_grade_and_no_cutpoints_the_argmax():
    proba = np.array(
        [
            [0.45, 0.0, 0.0, 0.0, 0.55],  # argmax g4; E[grade] = 2.2
            [0.0, 0.5, 0.0, 0.5, 0.0],  # tie g1/g3 (argmax g1); E = 2.0
            [0.0, 0.0, 0.1, 0.2, 0.7],  # E = 3.6
            [0.9, 0.1, 0.0, 0.0, 0.0],  # E = 0.1
        ]
    )
    rounded = decisions(proba, _ordinal(cutpoints=ROUND))
    assert list(rounded.columns) == [*(f"p_{g}" for g in GRADES), "prediction"]
    assert rounded["prediction"].tolist() == ["g2", "g2", "g4", "g0"]
    fitted = [0.8, 1.2, 2.1, 3.7]
    assert decisions(proba, _ordinal(cutpoints=fitted))["prediction"].tolist() == ["g3", "g2", "g3", "g0"]
    assert decisions(proba, _ordinal())["prediction"].tolist() == ["g4", "g1", "g4", "g0"]  # argmax
    many = _dirichlet(300, 5, seed=2)
    got = decisions(many, _ordinal(cutpoints=fitted))["prediction"].tolist()
    assert got == [GRADES[i] for i in kclass.apply_cutpoints(many, fitted)]
    assert got != [GRADES[i] for i in many.argmax(axis=1)]


def test_ordinal_referable_view():
    proba = np.array(
        [
            [0.5, 0.0, 0.25, 0.125, 0.125],  # P(grade >= g2) = 0.5: at the threshold, referable
            [0.5, 0.125, 0.25, 0.125, 0.0],  # 0.375
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    cfg = _ordinal(cutpoints=ROUND, referable_from=2, referable_threshold=0.5)
    out = decisions(proba, cfg)
    assert list(out.columns) == [*(f"p_{g}" for g in GRADES), "prediction", "p_referable", "referable"]
    assert out["p_referable"].tolist() == [0.5, 0.375, 1.0]
    assert out["referable"].tolist() == [True, False, True] and out["referable"].dtype == bool
    assert out["prediction"].tolist() == ["g1", "g1", "g4"]  # E = 1.375 and 1.0: the view does not change it
    many = _dirichlet(200, 5, seed=3)
    out = decisions(many, cfg)
    np.testing.assert_allclose(out["p_referable"].to_numpy(), many[:, 2:].sum(axis=1))
    np.testing.assert_array_equal(out["referable"].to_numpy(), many[:, 2:].sum(axis=1) >= 0.5)


def test_no_rows_give_the_columns_and_no_error():
    for cfg in (_ordinal(cutpoints=ROUND, referable_from=1, referable_threshold=0.2), _multiclass(flags={"mel": 0.1})):
        out = decisions(np.zeros((0, len(cfg.classes))), cfg)
        assert len(out) == 0 and list(out.columns) == list(decision_columns(cfg))


# ----------------------------------------------------------------------------- (d) binary: schema 1, unchanged
def _old_decisions(proba: np.ndarray, cfg: ServingConfig) -> pd.DataFrame:
    """`serving.decisions` as it was before the task keys (verbatim, but for the names)."""
    proba = np.asarray(proba, dtype=np.float64).reshape(-1, len(cfg.classes))
    labels = thresholded_labels(proba, cfg.positive_index, cfg.threshold)
    out = pd.DataFrame(proba, columns=[f"p_{c}" for c in cfg.classes])
    out["label"] = [cfg.classes[i] for i in labels]
    out["positive"] = proba[:, cfg.positive_index] >= cfg.threshold
    return out


@pytest.mark.parametrize("positive", ["PNEUMONIA", "NORMAL"])
def test_binary_output_is_exactly_the_old_one(positive):
    proba = np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.75, 0.25], [0.3, 0.7]], dtype=np.float32)
    classes = ["NORMAL", "PNEUMONIA"]
    new = _cfg(classes, positive_class=positive, threshold=0.3)
    old = ServingConfig.from_dict({k: v for k, v in new.to_dict().items() if k in _OLD_KEYS})
    for cfg in (new, old):
        out = decisions(proba, cfg)
        pd.testing.assert_frame_equal(out, _old_decisions(proba, cfg), check_exact=True)
        assert list(out.columns) == ["p_NORMAL", "p_PNEUMONIA", "label", "positive"]
        assert [str(t) for t in out.dtypes] == ["float64", "float64", "str", "bool"]
    if positive == "PNEUMONIA":  # p(PNEUMONIA) >= 0.3, the registered threshold, not the argmax
        assert decisions(proba, new)["label"].tolist() == ["NORMAL", "PNEUMONIA", "PNEUMONIA", "NORMAL", "PNEUMONIA"]
        assert decisions(proba, new)["positive"].tolist() == [False, True, True, False, True]


# ----------------------------------------------------------------------------- (e) configs
_OLD_KEYS = (  # a model_config as `medclf register` wrote it before the task keys
    "classes",
    "positive_class",
    "threshold",
    "image_size",
    "channels",
    "resize",
    "batch_size",
    "min_size",
    "max_aspect_ratio",
    "max_pixels",
    "max_request_images",
    "max_image_bytes",
    "modality",
)


def test_an_old_binary_config_loads_as_binary_schema_1():
    old = {
        "classes": ["NORMAL", "PNEUMONIA"],
        "positive_class": "PNEUMONIA",
        "threshold": 0.42,
        "image_size": 64,
        "channels": 1,
        "resize": "pad",
        "batch_size": 32,
        "min_size": 16,
        "max_aspect_ratio": 4.0,
        "max_pixels": 80_000_000,
        "max_request_images": 64,
        "max_image_bytes": 20 << 20,
        "modality": "chest_xray",
    }
    assert set(old) == set(_OLD_KEYS)
    cfg = ServingConfig.from_dict(old)
    assert (cfg.task, cfg.schema_version, cfg.cutpoints, cfg.flags) == ("binary", 1, [], {})
    assert cfg.referable_from is None and cfg.referable_threshold is None
    assert list(decision_columns(cfg)) == ["p_NORMAL", "p_PNEUMONIA", "label", "positive"]
    assert ServingConfig.from_dict(cfg.to_dict()) == cfg  # a round trip keeps schema 1
    # even older configs had only the first five keys; and a 3-class model registered then still loads (binary)
    assert ServingConfig.from_dict({k: old[k] for k in _OLD_KEYS[:5]}).schema_version == 1
    three = ServingConfig.from_dict({**old, "classes": SKIN, "positive_class": "mel"})
    assert three.task == "binary" and list(decision_columns(three))[-2:] == ["label", "positive"]


def test_new_configs_are_the_current_schema_and_round_trip_every_key():
    assert OUTPUT_SCHEMA_VERSION == 3  # 3 adds the multi-label columns; binary and K-class columns are schema 2's
    assert _cfg(["a", "b"]).schema_version == OUTPUT_SCHEMA_VERSION
    for cfg in (
        _multiclass(flags={"mel": 0.123456789}),
        _ordinal(cutpoints=[0.6, 1.4, 2.55, 3.3], referable_from=2, referable_threshold=0.3),
        _ordinal(),
    ):
        d = cfg.to_dict()
        assert {"task", "cutpoints", "flags", "referable_from", "referable_threshold", "schema_version"} <= set(d)
        assert d["schema_version"] == OUTPUT_SCHEMA_VERSION and ServingConfig.from_dict(d) == cfg


def test_task_keys_read_the_gates_document():
    assert task_keys({"threshold": 0.4}) == {"task": "binary"}  # a binary gates.json: nothing more
    gates = {
        "task": "ordinal",
        "decision": {
            "rule": "...",
            "cutpoints": [0.6, 1.4, 2.5, 3.3],
            "flags": {},
            "referable": {"from_index": 2.0, "threshold": 0.31, "val_sensitivity": 0.9},
            "source": "validation",
        },
    }
    cfg = _cfg(GRADES, **task_keys(gates))
    assert (cfg.cutpoints, cfg.referable_from, cfg.referable_threshold) == ([0.6, 1.4, 2.5, 3.3], 2, 0.31)
    mc = {"task": "multiclass", "decision": {"cutpoints": [], "flags": {"mel": {"threshold": 0.2}}, "referable": None}}
    assert _cfg(SKIN, **task_keys(mc)).flags == {"mel": 0.2}


@pytest.mark.parametrize(
    ("classes", "kw", "message"),
    [
        (SKIN, {"task": "multi-class"}, "task must be one of"),
        (["a", "b"], {"flags": {"b": 0.5}}, "multiclass setting"),
        (SKIN, {"task": "multiclass", "cutpoints": [0.5, 1.5]}, "ordinal task"),
        (GRADES, {"task": "ordinal", "cutpoints": [0.5, 1.5, 2.5]}, "4 strictly increasing"),
        (GRADES, {"task": "ordinal", "cutpoints": [0.5, 2.5, 1.5, 3.5]}, "4 strictly increasing"),
        (GRADES, {"task": "ordinal", "flags": {"g3": 0.5}}, "multiclass setting"),
        (SKIN, {"task": "multiclass", "flags": {"bcc": 0.5}}, "flags must map classes"),
        (SKIN, {"task": "multiclass", "flags": {"mel": 1.5}}, "flags must map classes"),
        (GRADES, {"task": "ordinal", "referable_from": 2}, "referable_threshold"),
        (GRADES, {"task": "ordinal", "referable_from": 0, "referable_threshold": 0.5}, "grade index in [1, 4]"),
        (SKIN, {"task": "multiclass", "referable_from": 1, "referable_threshold": 0.5}, "ordinal task"),
        (GRADES, {"task": "ordinal", "schema_version": 1}, "schema_version"),
        (["a", "b"], {"schema_version": 4}, "schema_version"),
    ],
)
def test_a_config_that_cannot_decide_is_refused(classes, kw, message):
    with pytest.raises(ValueError, match="invalid serving config") as err:
        _cfg(classes, **kw)
    assert message in str(err.value)


# ----------------------------------------------------------------------------- (f) signature == decisions
_MLFLOW_TYPE = {"float64": "double", "str": "string", "object": "string", "bool": "boolean"}


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg(["NORMAL", "PNEUMONIA"], threshold=0.37),
        _multiclass(),
        _multiclass(flags={"nv": 0.2, "mel": 0.3}),
        _ordinal(),
        _ordinal(cutpoints=ROUND, referable_from=3, referable_threshold=0.25),
    ],
    ids=["binary", "multiclass", "multiclass-flags", "ordinal-argmax", "ordinal-referable"],
)
def test_signature_describes_the_columns_decisions_returns(cfg):
    out = decisions(_dirichlet(7, len(cfg.classes), seed=4), cfg)
    sig = signature(cfg)
    assert sig.outputs.input_names() == list(out.columns) == list(decision_columns(cfg))
    assert [t.name for t in sig.outputs.input_types()] == [_MLFLOW_TYPE[str(t)] for t in out.dtypes]
    assert sig.inputs.input_names() == ["image"]
    if cfg.task != "binary":  # the seam's names and order (TaskSpec.output_columns)
        task = Task(type=cfg.task, critical_classes=list(cfg.flags) if cfg.task == "multiclass" else [])
        if cfg.referable_from is not None:
            task = Task(type="ordinal", referable_from=cfg.classes[cfg.referable_from])
        assert TaskSpec.from_settings(task, cfg.classes, None).output_columns() == list(out.columns)


def test_signature_of_bare_classes_is_the_binary_one():
    binary = _cfg(["NORMAL", "PNEUMONIA"])
    assert signature(["NORMAL", "PNEUMONIA"]).to_dict() == signature(binary).to_dict()


# ----------------------------------------------------------------------------- a real model, saved and loaded
def _grey_png(value: int, side: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _three_class_keras(path) -> None:
    """Softmax over the logits [4 - 8m, 1, 8m - 4] of m, the mean intensity in [0, 1]: akiec when dark, mel at mid
    grey, nv when bright; at mid grey p(nv) is about 0.2."""
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


def test_saved_multiclass_pyfunc_and_medclf_predict_write_the_task_columns(tmp_path, make_settings):
    """A real 3-class Keras model in the pyfunc, saved with the task keys and the metadata `medclf register` logs,
    loaded back by MLflow: the served frame and `medclf predict`'s CSV carry the multiclass columns, the
    prediction is the model's argmax (mid grey: mel, though p(nv) >= nv's flag threshold) and the flag is set."""
    import mlflow.pyfunc

    from medclf.release.predict import predict_paths
    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, encode_file, load_keras, prepare

    _three_class_keras(tmp_path / "model.keras")
    cfg = _cfg(SKIN, task="multiclass", positive_class="nv", threshold=0.15, flags={"nv": 0.15})
    mlflow.pyfunc.save_model(
        path=str(tmp_path / "pyfunc"),
        python_model=MedclfModel(),
        artifacts={KERAS_ARTIFACT: str(tmp_path / "model.keras")},
        model_config=cfg.to_dict(),
        signature=signature(cfg),
        metadata={"output_schema_version": cfg.schema_version},
        pip_requirements=["mlflow"],  # no requirement inference (it would load the model in a subprocess)
    )
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    assert model.metadata.metadata["output_schema_version"] == OUTPUT_SCHEMA_VERSION
    assert model.metadata.get_output_schema().input_names() == list(decision_columns(cfg))
    files = [_grey_png(v) for v in (20, 128, 235, 120)]
    out = model.predict(pd.DataFrame({"image": [encode_file(f) for f in files]}))
    reference = np.asarray(
        load_keras(str(tmp_path / "model.keras")).predict(np.stack([prepare(f, cfg) for f in files]))
    )
    assert list(out.columns) == ["p_akiec", "p_mel", "p_nv", "prediction", "flag_nv"]
    assert out["prediction"].tolist() == [SKIN[i] for i in reference.argmax(axis=1)] == ["akiec", "mel", "nv", "mel"]
    assert out["flag_nv"].tolist() == [False, True, True, True]  # mid grey: flagged nv, predicted mel
    np.testing.assert_allclose(out[["p_akiec", "p_mel", "p_nv"]].to_numpy(), reference, atol=1e-6)

    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate(files):
        (folder / f"img{i}.png").write_bytes(f)
    (folder / "img9.png").write_bytes(b"not an image")
    res = predict_paths([folder], str(tmp_path / "pyfunc"), tmp_path / "out.csv", make_settings())
    df = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    cols = ["path", "p_akiec", "p_mel", "p_nv", "prediction", "flag_nv", "error", "model_uri", "model_version"]
    assert list(df.columns) == cols
    assert df["prediction"].tolist()[:4] == ["akiec", "mel", "nv", "mel"] and df["error"].tolist()[4] != ""
    assert df["flag_nv"].tolist() == ["False", "True", "True", "True", ""]
    assert res["task"] == "multiclass" and res["labels"] == {"mel": 2, "akiec": 1, "nv": 1} and res["flag_nv"] == 3
    assert "threshold" not in res and "positive_class" not in res


def test_saved_binary_pyfunc_keeps_the_schema_1_csv(tmp_path, make_settings):
    """A binary model through the same path: `medclf predict` writes exactly the schema-1 columns."""
    import keras
    import mlflow.pyfunc

    from medclf.release.predict import predict_paths
    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel

    inp = keras.Input((16, 16, 1))
    mean = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    dense = keras.layers.Dense(2, activation="softmax", kernel_initializer=keras.initializers.Constant([[-4.0, 4.0]]))
    keras.Model(inp, dense(mean)).save(tmp_path / "model.keras")
    cfg = _cfg(["NORMAL", "PNEUMONIA"], threshold=0.25)
    old = {k: v for k, v in cfg.to_dict().items() if k in _OLD_KEYS}  # registered before the task keys
    mlflow.pyfunc.save_model(
        path=str(tmp_path / "pyfunc"),
        python_model=MedclfModel(),
        artifacts={KERAS_ARTIFACT: str(tmp_path / "model.keras")},
        model_config=old,
        signature=signature(cfg.classes),
        pip_requirements=["mlflow"],
    )
    folder = tmp_path / "images"
    folder.mkdir()
    for i, v in enumerate((10, 100, 250)):
        (folder / f"img{i}.png").write_bytes(_grey_png(v))
    res = predict_paths([folder], str(tmp_path / "pyfunc"), tmp_path / "out.csv", make_settings())
    df = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    cols = ["path", "p_NORMAL", "p_PNEUMONIA", "label", "positive", "error", "threshold", "model_uri", "model_version"]
    assert list(df.columns) == cols
    p = df["p_PNEUMONIA"].astype(float)
    assert df["label"].tolist() == ["PNEUMONIA" if x >= 0.25 else "NORMAL" for x in p]
    assert df["positive"].tolist() == [x >= 0.25 for x in p] and df["threshold"].tolist() == [0.25] * 3
    keys = ["model_uri", "model_version", "threshold", "files", "failed", "refused", "labels", "out", "positive_class"]
    assert list(res) == [*keys, "mean_p"]
