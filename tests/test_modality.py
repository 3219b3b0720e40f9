"""Issue 22, row 5: colour photographs passed a chest X-ray pipeline (validate had no check; predict labelled an RGB
gradient PNEUMONIA at 0.944).

`medclf.imaging.modality` measures colourfulness (Hasler–Süsstrunk); `ingest.modality` says what the images are. For a
greyscale modality a colour picture fails validate's `colour` check (an error by default) and is refused by the
registered model at predict and at the endpoint, naming the file or row; grey stored as RGB is grey; dermoscopy
and fundus are colour by nature. Real images: the data/demo chest X-rays (CC BY 4.0), scikit-learn's sample
photographs and scikit-image's retina (fundus) photograph; the real pyfunc, real ingest, real validate (GX).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.imaging.modality import GREY_MAX_COLOURFULNESS, colour_problem, colourfulness, file_colourfulness
from medclf.release.serving import ServingConfig
from tests.conftest import ROOT

DEMO = sorted((ROOT / "data" / "demo" / "batch1").rglob("*.jpeg"))


def photo(name: str = "china.jpg", size: int | None = 128) -> np.ndarray:
    """A real colour photograph (scikit-learn's sample images), optionally resized to size×size."""
    from sklearn.datasets import load_sample_image

    arr = load_sample_image(name)
    return np.asarray(Image.fromarray(arr).resize((size, size))) if size else arr


def fundus() -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.retina()).resize((128, 128)))


def gradient(size: int = 128) -> np.ndarray:
    """The issue's RGB gradient "photo"."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 2, y * 2, 255 - x * 2], -1).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buf.getvalue()


def rgb_jpeg_xray(path: Path) -> bytes:
    """A real demo X-ray stored as an RGB JPEG (grey content, the chroma channels as the encoder leaves them)."""
    return encode(np.asarray(Image.open(path).convert("RGB")))


# ----------------------------------------------------------------------------- the measure and its bound
def test_bound_separates_real_xrays_stored_as_rgb_from_colour_photographs():
    """The documented bound, on real images: demo X-rays as grey, as R=G=B and as RGB JPEGs measure 0; every
    colour photo tried measures far above it."""
    xrays = [Image.open(p) for p in DEMO[:60]]
    for img in xrays:
        grey = np.asarray(img)
        assert colourfulness(grey) == 0.0
        assert colourfulness(np.asarray(img.convert("RGB"))) == 0.0
    worst = max(colourfulness(np.asarray(Image.open(io.BytesIO(rgb_jpeg_xray(p))).convert("RGB"))) for p in DEMO[:60])
    assert worst <= 1.0 < GREY_MAX_COLOURFULNESS
    for arr in (photo("china.jpg", None), photo("flower.jpg", None), fundus(), gradient()):
        assert colourfulness(arr) > 3 * GREY_MAX_COLOURFULNESS


def test_modality_table_decides_which_images_are_checked():
    photo_ = photo()
    for grey_modality in ("chest_xray", "mammography", "ultrasound"):
        reason = colour_problem(photo_, grey_modality)
        assert reason and "colour image" in reason and grey_modality in reason and "ingest.modality" in reason
    for colour_modality in ("dermoscopy", "fundus", None):  # None: a model registered before modalities
        assert colour_problem(photo_, colour_modality) is None
    assert colour_problem(np.asarray(Image.open(DEMO[0]).convert("RGB")), "chest_xray") is None
    with pytest.raises(ValueError, match="unknown modality 'xrya'"):
        colour_problem(photo_, "xrya")
    from medclf.config import ConfigError, settings_from_dict

    assert settings_from_dict({}).ingest.modality == "chest_xray"  # the demo's default
    with pytest.raises(ConfigError, match="ingest.modality"):
        settings_from_dict({"ingest": {"modality": "xrya"}})


def test_file_colourfulness_sees_the_colour_a_grey_decode_dropped():
    """Ingest with channels: 1 decodes a colour JPEG straight to grey (libjpeg draft mode): the measure re-reads the
    file's colour; a grey-as-RGB JPEG and a DICOM (measured on its own decode) stay grey."""
    from medclf.imaging.images import decode_bytes

    data = encode(photo())
    grey_decode, shape = decode_bytes(data, 10**8, kind="image", channels=1, size=32)
    assert grey_decode.shape[-1] == 1 and shape[-1] == 3  # the colour is gone from the decode
    assert file_colourfulness(data, grey_decode) > 3 * GREY_MAX_COLOURFULNESS
    xray = rgb_jpeg_xray(DEMO[1])
    assert file_colourfulness(xray, decode_bytes(xray, 10**8, kind="image", channels=1, size=32)[0]) <= 1.0
    from tests.test_dicom import make_dicom

    dcm = make_dicom(photo(size=32), bits_stored=8, photometric="RGB")
    arr = decode_bytes(dcm, 10**8, kind="dicom")[0]
    assert arr.shape[-1] == 3 and file_colourfulness(dcm, arr) > 3 * GREY_MAX_COLOURFULNESS


# ----------------------------------------------------------------------------- serving and predict
@pytest.fixture(scope="module")
def pyfunc_dirs(tmp_path_factory) -> dict[str, Path]:
    """The served pyfunc as `medclf register` builds it, for a chest X-ray model and a dermoscopy model."""
    import keras
    import mlflow.pyfunc

    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, signature

    tmp = tmp_path_factory.mktemp("modality")
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(
        2,
        activation="softmax",
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(np.log([0.2, 0.8])),
    )(x)
    keras.Model(inp, out).save(tmp / "model.keras")
    dirs = {}
    for modality in ("chest_xray", "dermoscopy"):
        cfg = ServingConfig(
            classes=["NORMAL", "PNEUMONIA"],
            positive_class="PNEUMONIA",
            threshold=0.5,
            image_size=32,
            channels=1,
            modality=modality,
        )
        dirs[modality] = tmp / modality
        mlflow.pyfunc.save_model(
            str(dirs[modality]),
            python_model=MedclfModel(),
            artifacts={KERAS_ARTIFACT: str(tmp / "model.keras")},
            model_config=cfg.to_dict(),
            signature=signature(cfg.classes),
        )
    return dirs


def test_served_chest_xray_model_refuses_a_colour_photo_naming_the_row(pyfunc_dirs):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(pyfunc_dirs["chest_xray"]))
    xray = base64.b64encode(rgb_jpeg_xray(DEMO[0])).decode()
    for bad in (base64.b64encode(encode(photo())).decode(), gradient().tolist()):
        with pytest.raises(
            MlflowException,
            match=r"input row 1: colour image \(colourfulness \d+\.\d, above 10 "
            r"for the greyscale modality 'chest_xray'\)",
        ) as err:
            model.predict(pd.DataFrame({"image": [xray, bad]}))
        assert err.value.get_http_status_code() == 400
    assert model.predict(pd.DataFrame({"image": [xray]}))["label"].tolist() == ["PNEUMONIA"]  # grey-as-RGB is fine
    derm = mlflow.pyfunc.load_model(str(pyfunc_dirs["dermoscopy"]))
    assert len(derm.predict(pd.DataFrame({"image": [base64.b64encode(encode(photo())).decode()]}))) == 1


def test_old_models_without_a_modality_check_no_colour():
    old = {
        k: v
        for k, v in ServingConfig(classes=["a", "b"], positive_class="b", threshold=0.5, image_size=32, channels=1)
        .to_dict()
        .items()
        if k != "modality"
    }
    from medclf.release.serving import prepare

    assert ServingConfig.from_dict(old).modality is None
    assert prepare(encode(photo()), ServingConfig.from_dict(old)).shape == (32, 32, 1)
    assert ServingConfig.from_dict({**old, "modality": "chest_xray"}).to_dict()["modality"] == "chest_xray"


def test_predict_refuses_colour_photos_per_file_and_scores_grey_as_rgb(pyfunc_dirs, make_settings, tmp_path):
    """The issue's case: an RGB gradient and a photograph among X-rays get a 'refused' row naming the measure; the
    X-rays, grey and grey-as-RGB, PNG and JPEG, are scored."""
    from medclf.release.predict import predict_paths

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "gradient.png").write_bytes(encode(gradient(), "PNG"))
    (folder / "photo.jpg").write_bytes(encode(photo()))
    (folder / "xray_rgb.jpg").write_bytes(rgb_jpeg_xray(DEMO[2]))
    (folder / "xray_rgb.png").write_bytes(encode(np.asarray(Image.open(DEMO[3]).convert("RGB")), "PNG"))
    (folder / "xray.jpeg").write_bytes(DEMO[4].read_bytes())
    res = predict_paths([folder], str(pyfunc_dirs["chest_xray"]), tmp_path / "out.csv", make_settings())
    df = pd.read_csv(tmp_path / "out.csv", keep_default_na=False).set_index("path")
    for name in ("gradient.png", "photo.jpg"):
        err = df.loc[str(folder / name), "error"]
        assert err.startswith("refused: colour image (colourfulness") and "'chest_xray'" in err, err
        assert df.loc[str(folder / name), "label"] == ""
    for name in ("xray_rgb.jpg", "xray_rgb.png", "xray.jpeg"):
        assert df.loc[str(folder / name), "error"] == "" and df.loc[str(folder / name), "label"] == "PNEUMONIA"
    assert res["refused"] == 2
    res = predict_paths([folder], str(pyfunc_dirs["dermoscopy"]), tmp_path / "derm.csv", make_settings())
    assert res["failed"] == 0


# ----------------------------------------------------------------------------- validate
def _xray_folder(root: Path, photo_names: dict[str, np.ndarray]) -> Path:
    """40 real demo X-rays per class (whole patients), as stored, plus the given colour pictures as JPEGs."""
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for src in sorted((ROOT / "data" / "demo" / "batch1" / label).glob("*.jpeg"))[:40]:
            (root / label / src.name).write_bytes(src.read_bytes())
    for i, (name, arr) in enumerate(photo_names.items()):
        (root / "PNEUMONIA" / f"pt{i:010x}_{name}.jpeg").write_bytes(encode(arr))
    return root


def _validate(make_settings, root: Path, **ingest_over):
    from medclf.stages import ingest, validate

    s = make_settings(
        {
            "ingest": {
                "source": {"kind": "folder", "uri": str(root), "patient_id_regex": "^(pt[0-9a-f]{10})_"},
                "image_size": 32,
                "splits": {"use_official": False},
                **ingest_over,
            },
            "validate": {
                "severity": {
                    "prevalence_gap": "warn",
                    "prevalence_bounds": "warn",
                    "near_duplicate_cross_split": "warn",
                }
            },
        }
    )
    ingest.run(s)
    try:
        return validate.run(s)
    except validate.ValidationFailed as err:
        return {**err.result, "error_message": str(err)}


def test_validate_fails_a_colour_photo_in_a_chest_xray_set(make_settings, tmp_path):
    """Ingest keeping RGB (channels: 3), the arrays hold the colour: the `colour` check fails, an error by default,
    naming the photo and its colourfulness; the X-rays (grey JPEGs) pass it."""
    root = _xray_folder(tmp_path / "raw", {"photo": photo(), "gradient": gradient()})
    res = _validate(make_settings, root, channels=3)
    colour = res["checks"]["colour"]
    assert colour["status"] == "fail" and colour["count"] == 2, colour
    assert not res["passed"] and "colour" in res["errors"]
    shown = "\n".join(colour["examples"])
    assert "_photo.jpeg" in shown and "_gradient.jpeg" in shown and "colourfulness=" in shown, shown
    assert "colour:" in res["error_message"]


def test_validate_does_not_check_colour_for_a_colour_modality(make_settings, tmp_path):
    root = _xray_folder(tmp_path / "raw", {"lesion": photo()})
    res = _validate(make_settings, root, channels=3, modality="dermoscopy")
    assert res["checks"]["colour"]["status"] == "skipped", res["checks"]["colour"]
    assert "dermoscopy" in res["checks"]["colour"]["note"]


def test_validate_sees_the_colour_of_files_ingest_decoded_to_grey(make_settings, tmp_path):
    """The default ingest (channels: 1) decodes a colour JPEG straight to grey, so the arrays carry no colour:
    ingest records each file's colourfulness in the manifest, and the `colour` check fails on the photo."""
    import pandas as pd

    root = _xray_folder(tmp_path / "raw", {"photo": photo()})
    res = _validate(make_settings, root)
    colour = res["checks"]["colour"]
    assert colour["status"] == "fail" and colour["count"] == 1, colour
    assert "_photo.jpeg" in "\n".join(colour["examples"])
    manifest = pd.read_parquet(tmp_path / "data/ingest/manifest.parquet")
    ok = manifest[manifest["status"] == "ok"]
    assert (ok.loc[~ok["source_uri"].str.endswith("_photo.jpeg"), "colourfulness"] == 0).all()


def test_validate_does_not_check_radiograph_polarity_for_a_colour_modality(make_settings, tmp_path):
    """A fundus or dermoscopy image has a dark vignette round a bright centre or the reverse: the `inverted` check
    (a radiograph's polarity) is skipped for a colour modality, and still runs for chest X-rays. Before, 10 of 864
    RetinaMNIST fundus images were reported as inverted X-rays."""
    dark_centre = np.full((64, 64, 3), 220, np.uint8)
    dark_centre[16:48, 16:48] = 40  # centre - border = -180: an "inverted" radiograph
    root = _xray_folder(tmp_path / "raw", {"dark_centre": dark_centre})
    res = _validate(make_settings, root, channels=3, modality="dermoscopy")
    assert res["checks"]["inverted"]["status"] == "skipped", res["checks"]["inverted"]
    assert "dermoscopy" in res["checks"]["inverted"]["note"]
    grey = _validate(make_settings, _xray_folder(tmp_path / "raw2", {"dark_centre": dark_centre}))
    assert grey["checks"]["inverted"]["status"] in ("warn", "fail") and grey["checks"]["inverted"]["count"] >= 1
