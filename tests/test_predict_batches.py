"""Issue 22, row 1 (and the size point of row 11): `medclf predict` on more images than one request may carry.

`predict` sent 256 images per call while the registered pyfunc refuses more than its `max_request_images`
(64 by default): a folder of 65 images failed outright. It now sends requests of the model's own limit, read from
the loaded model's config. Real components: the real `MedclfModel` pyfunc around a tiny Keras model, logged and
registered on a real `mlflow server` (the session fixture), loaded back by `models:/` URI; real chest X-rays from
data/demo (CC BY 4.0), as JPEG files and as DICOM files made from their pixels.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.test_dicom import make_dicom

DEMO = sorted((ROOT / "data" / "demo" / "batch1").rglob("*.jpeg"))
N = 70  # above the default max_request_images (64): two requests each


@pytest.fixture(scope="module")
def registered_pyfunc(tmp_path_factory, mlflow_server) -> dict:
    """The served pyfunc as `medclf register` logs it (model_config from ServingConfig, default request limits),
    registered on the real MLflow server; its Keras model's output depends on the image (a learned-free dense
    layer over the mean intensity), so a row put in the wrong place would show."""
    import keras
    import mlflow.pyfunc

    from medclf.infra.tracking import mlflow_uri
    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, ServingConfig, signature

    tmp = tmp_path_factory.mktemp("batches")
    inp = keras.Input((32, 32, 1))
    mean = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(
        2,
        activation="softmax",
        kernel_initializer=keras.initializers.Constant([[-4.0, 4.0]]),
        bias_initializer=keras.initializers.Constant([2.0, -2.0]),
    )(mean)
    keras.Model(inp, out).save(tmp / "model.keras")
    cfg = ServingConfig(
        classes=["NORMAL", "PNEUMONIA"],
        positive_class="PNEUMONIA",
        threshold=0.5,
        image_size=32,
        channels=1,
        modality="chest_xray",
    )
    assert cfg.max_request_images == 64
    name = f"medclf-batches-{uuid.uuid4().hex[:8]}"
    with mlflow_uri(mlflow_server):
        mlflow.set_experiment(name)
        with mlflow.start_run():
            mlflow.pyfunc.log_model(
                name="pyfunc",
                python_model=MedclfModel(),
                artifacts={KERAS_ARTIFACT: str(tmp / "model.keras")},
                model_config=cfg.to_dict(),
                signature=signature(cfg.classes),
                registered_model_name=name,
            )
    return {"uri": f"models:/{name}/1", "server": mlflow_server, "model_file": tmp / "model.keras", "cfg": cfg}


def _reference(registered_pyfunc: dict, files: list[Path]) -> np.ndarray:
    """p(PNEUMONIA) of each file, one file at a time through the same preprocessing and Keras model."""
    from medclf.release.serving import load_keras, prepare

    model, cfg = load_keras(str(registered_pyfunc["model_file"])), registered_pyfunc["cfg"]
    x = np.stack([prepare(f.read_bytes(), cfg) for f in files])
    return np.asarray(model.predict(x, verbose=0), np.float64)[:, 1]


@pytest.fixture(scope="module")
def xray_folders(tmp_path_factory) -> dict[str, list[Path]]:
    """N real demo chest X-ray JPEGs (as stored) and N DICOMs (12-bit, MONOCHROME2) made from other demo X-rays."""
    assert len(DEMO) >= 2 * N
    root = tmp_path_factory.mktemp("xrays")
    (root / "jpeg").mkdir()
    (root / "dicom").mkdir()
    jpegs, dicoms = [], []
    for i, src in enumerate(DEMO[:N]):
        dst = root / "jpeg" / f"x{i:03d}_{src.name}"
        dst.write_bytes(src.read_bytes())
        jpegs.append(dst)
    for i, src in enumerate(DEMO[N : 2 * N]):
        grey = np.asarray(Image.open(src).convert("L"), np.uint16) * 16
        grey[0, 0], grey[-1, -1] = 0, 255 * 16  # full range: the DICOM min-max VOI gives back the 8-bit pixels
        dst = root / "dicom" / f"s{i:03d}.dcm"
        dst.write_bytes(make_dicom(grey))
        dicoms.append(dst)
    return {"root": [root], "jpeg": jpegs, "dicom": dicoms}


def _settings(make_settings, server: str):
    return make_settings({"mlflow": {"tracking_uri": server}})


@pytest.mark.parametrize("kind", ["jpeg", "dicom"])
def test_predict_scores_more_images_than_one_request_takes(
    registered_pyfunc, xray_folders, make_settings, tmp_path, kind
):
    """Row 1: 70 files in a folder, through the registered pyfunc: every file scored, none refused, in order,
    each with the probability it gets alone (before: MlflowException 'request has 70 images, above the limit
    of 64 per request')."""
    from medclf.release.predict import predict_paths

    files = xray_folders[kind]
    folder = files[0].parent
    res = predict_paths(
        [folder], registered_pyfunc["uri"], tmp_path / "out.csv", _settings(make_settings, registered_pyfunc["server"])
    )
    df = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert res["files"] == len(df) == N and res["failed"] == 0, df.loc[df["error"] != "", "error"].tolist()[:3]
    assert df["path"].tolist() == [str(f) for f in files]
    np.testing.assert_allclose(df["p_PNEUMONIA"].astype(float), _reference(registered_pyfunc, files), atol=1e-6)
    assert df["p_PNEUMONIA"].astype(float).std() > 1e-3  # the probabilities differ per image: order is tested


def test_cli_predict_chunks_by_the_limit_the_model_carries(
    registered_pyfunc, xray_folders, make_settings, tmp_path, caplog
):
    """`medclf predict` on both folders (140 files) with a model whose limit is lowered to 8 at load time (the
    operator's MLFLOW_PYFUNC_INFERENCE_CONFIG path): requests follow the model's limit, not a constant."""
    import yaml

    from medclf.cli import main

    s = _settings(make_settings, registered_pyfunc["server"])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(s.model_dump(mode="json", by_alias=True)))
    out = tmp_path / "cli.csv"
    folders = [str(xray_folders["jpeg"][0].parent), str(xray_folders["dicom"][0].parent)]
    assert (
        main(["--params", str(params), "predict", *folders, "--model", registered_pyfunc["uri"], "--out", str(out)])
        == 0
    )
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 2 * N and (df["error"] == "").all()

    import mlflow.pyfunc

    from medclf.infra.tracking import mlflow_uri
    from medclf.release.predict import chunk_size

    with mlflow_uri(registered_pyfunc["server"]):
        model = mlflow.pyfunc.load_model(registered_pyfunc["uri"], model_config={"max_request_images": 8})
    assert chunk_size(model) == 8
    assert chunk_size(mlflow.pyfunc.load_model(str(_local_copy(registered_pyfunc, tmp_path)))) == 64


def _local_copy(registered_pyfunc: dict, tmp_path: Path) -> Path:
    import mlflow.artifacts

    from medclf.infra.tracking import mlflow_uri

    with mlflow_uri(registered_pyfunc["server"]):
        return Path(mlflow.artifacts.download_artifacts(registered_pyfunc["uri"], dst_path=str(tmp_path / "m")))


def test_predict_names_a_size_refusal_as_one(registered_pyfunc, xray_folders, make_settings, tmp_path, caplog):
    """Row 11: an image refused by the model's size bounds was logged as 'could not be decoded'; its row and the
    log now say it was refused, by which bound, and a truly undecodable file is still called that."""
    from medclf.release.predict import predict_paths

    folder = tmp_path / "in"
    folder.mkdir()
    xray = Image.open(xray_folders["jpeg"][0])
    xray.resize((8, 8)).save(folder / "tiny.png")
    xray.save(folder / "fine.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with caplog.at_level("WARNING", logger="medclf.release.predict"):
        res = predict_paths(
            [folder],
            registered_pyfunc["uri"],
            tmp_path / "out.csv",
            _settings(make_settings, registered_pyfunc["server"]),
        )
    df = pd.read_csv(tmp_path / "out.csv", keep_default_na=False).set_index("path")
    tiny = df.loc[str(folder / "tiny.png"), "error"]
    assert tiny.startswith("refused: ") and "8x8" in tiny and "minimum 16 px" in tiny, tiny
    assert "decode" not in tiny.lower()
    assert df.loc[str(folder / "broken.png"), "error"].startswith("DecodeError: ")
    assert df.loc[str(folder / "fine.png"), "error"] == ""
    assert res["failed"] == 2 and res["refused"] == 1
    text = caplog.text
    assert "1 could not be decoded" in text and "1 refused" in text, text
