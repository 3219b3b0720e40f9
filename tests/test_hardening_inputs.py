"""Issue 12, rows 6, 7 and 16: bad inputs to `medclf predict` and the served pyfunc.

Real components: the real `MedclfModel` pyfunc, saved with MLflow and loaded back through
`mlflow.pyfunc.load_model` (a local model directory, so no tracking server is needed), around a real
tiny Keras model whose output is a fixed probability (p(opacity) = 0.31 for every image).
"""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medclf.release.serving import MAX_PIXELS, ServingConfig, prepare

CFG = ServingConfig(classes=["normal", "opacity"], positive_class="opacity", threshold=0.5, image_size=32, channels=1)


@pytest.fixture(scope="module")
def pyfunc_dir(tmp_path_factory) -> Path:
    """The served pyfunc as `medclf register` builds it, saved to a local MLflow model directory."""
    import keras
    import mlflow.pyfunc

    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, signature

    tmp = tmp_path_factory.mktemp("pyfunc")
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inp))
    out = keras.layers.Dense(
        2,
        activation="softmax",
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(np.log([0.69, 0.31])),
    )(x)
    keras.Model(inp, out).save(tmp / "model.keras")
    path = tmp / "pyfunc"
    mlflow.pyfunc.save_model(
        str(path),
        python_model=MedclfModel(),
        artifacts={KERAS_ARTIFACT: str(tmp / "model.keras")},
        model_config=CFG.to_dict(),
        signature=signature(CFG.classes),
    )
    return path


def png(h: int, w: int) -> bytes:
    arr = np.random.default_rng(h * 7919 + w).integers(30, 220, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dicom(h: int, w: int) -> bytes:
    from tests.test_dicom import make_dicom

    return make_dicom(np.random.default_rng(0).integers(0, 4096, (h, w)).astype(np.uint16))


@pytest.fixture
def run_predict(tmp_path, make_settings, pyfunc_dir):
    from medclf.release.predict import predict_paths

    def run(files: dict[str, bytes], **ingest) -> pd.DataFrame:
        folder = tmp_path / "in"
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        s = make_settings({"ingest": ingest} if ingest else None)
        predict_paths([folder], str(pyfunc_dir), tmp_path / "out.csv", s)
        return pd.read_csv(tmp_path / "out.csv", keep_default_na=False).set_index("path")

    return run


# ----------------------------------------------------------------------------- row 16: one pixel guard
def test_predict_guards_dicom_decoding_with_ingest_max_image_pixels(run_predict, tmp_path):
    """Row 16: `ingest.max_image_pixels` was not passed to the DICOM decoder in `medclf predict`."""
    out = run_predict({"big.dcm": dicom(40, 40), "ok.dcm": dicom(20, 20)}, max_image_pixels=1000)
    big, ok = out.loc[str(tmp_path / "in/big.dcm")], out.loc[str(tmp_path / "in/ok.dcm")]
    assert "decompression bomb" in big["error"] and "max_image_pixels=1000" in big["error"], big["error"]
    assert ok["error"] == "" and ok["label"] == "normal"


def test_predict_guards_png_decoding_with_ingest_max_image_pixels(run_predict, tmp_path):
    out = run_predict({"big.png": png(40, 40)}, max_image_pixels=1000)
    assert "max_image_pixels=1000" in out.loc[str(tmp_path / "in/big.png"), "error"]


def test_served_model_carries_its_pixel_limit():
    cfg = ServingConfig.from_dict({**CFG.to_dict(), "max_pixels": 1000})
    assert cfg.to_dict()["max_pixels"] == 1000
    with pytest.raises(Exception, match="max_image_pixels=1000"):
        prepare(dicom(40, 40), cfg)
    with pytest.raises(Exception, match="max_image_pixels=1000"):
        prepare(png(40, 40), cfg)


# ----------------------------------------------------------------------------- rows 6 and 7: size and shape
def test_predict_refuses_tiny_and_sliver_images_per_file(run_predict, tmp_path):
    """Row 6: a 1×1 image was labelled at p = 0.31; row 7: a 4000×40 sliver was accepted."""
    out = run_predict(
        {"dot.png": png(1, 1), "sliver.png": png(40, 4000), "fine.png": png(64, 48), "dot.dcm": dicom(4, 4)}
    )
    dot, sliver = out.loc[str(tmp_path / "in/dot.png")], out.loc[str(tmp_path / "in/sliver.png")]
    assert "1x1" in dot["error"] and "smaller than" in dot["error"] and "16" in dot["error"], dot["error"]
    assert dot["label"] == "" and dot["p_opacity"] == ""
    assert "aspect ratio 100" in sliver["error"] and "4" in sliver["error"], sliver["error"]
    assert "smaller than" in out.loc[str(tmp_path / "in/dot.dcm"), "error"]
    assert out.loc[str(tmp_path / "in/fine.png"), "error"] == ""


def test_served_pyfunc_refuses_tiny_and_sliver_images_naming_the_row(pyfunc_dir):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(pyfunc_dir))
    ok = base64.b64encode(png(64, 64)).decode()
    for bad, reason in (
        (base64.b64encode(png(1, 1)).decode(), "smaller than"),
        (np.zeros((40, 4000), np.uint8).tolist(), "aspect ratio"),
        (np.zeros((4000, 40), np.uint8), "aspect ratio"),
    ):
        with pytest.raises(MlflowException, match=f"input row 1: .*{reason}") as err:
            model.predict(pd.DataFrame({"image": [ok, bad]}))
        assert err.value.get_http_status_code() == 400
    assert len(model.predict(pd.DataFrame({"image": [ok, np.zeros((16, 64), np.uint8)]}))) == 2  # 4:1 is allowed


def test_size_and_aspect_bounds_are_configurable_and_old_models_get_the_defaults():
    old = {k: v for k, v in CFG.to_dict().items() if k not in ("min_size", "max_aspect_ratio", "max_pixels")}
    cfg = ServingConfig.from_dict(old)
    assert (cfg.min_size, cfg.max_aspect_ratio, cfg.max_pixels) == (16, 4.0, MAX_PIXELS)
    loose = ServingConfig.from_dict({**old, "min_size": 1, "max_aspect_ratio": 200})
    assert prepare(np.zeros((40, 4000), np.uint8), loose).shape == (32, 32, 1)
    assert prepare(np.zeros((1, 1), np.uint8), loose).shape == (32, 32, 1)
    from medclf.config import settings_from_dict

    v = settings_from_dict({}).validation
    assert (v.min_size, v.max_aspect_ratio) == (16, 4.0)


def test_one_decode_dispatcher_for_ingest_predict_and_serving(tmp_path):
    """images.decode_bytes decides DICOM vs raster once for all three callers: by the source's kind (ingest),
    else by the file name (predict) or the 'DICM' marker (serving); the same bytes give the same pixels."""
    from medclf.imaging.images import decode_bytes
    from medclf.imaging.pixels import DecodeError
    from medclf.release.predict import _decode
    from medclf.release.serving import decode_one
    from tests.test_dicom import make_dicom

    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    dcm = make_dicom(pixels)
    by_marker, shape = decode_bytes(dcm, MAX_PIXELS)
    assert by_marker.shape == (64, 48, 1) and shape == (64, 48, 1)
    assert (decode_bytes(dcm, MAX_PIXELS, kind="dicom")[0] == by_marker).all()
    assert (decode_one(dcm) == by_marker).all() and (decode_one(base64.b64encode(dcm).decode()) == by_marker).all()
    with pytest.raises(DecodeError, match="not an image"):  # a source that says 'image' is never sniffed
        decode_bytes(dcm, MAX_PIXELS, kind="image")
    no_preamble = dcm[132:]  # no 128-byte preamble + 'DICM': only the name (predict) says it is DICOM
    with pytest.raises(DecodeError, match="not an image"):
        decode_bytes(no_preamble, MAX_PIXELS)
    assert (decode_bytes(no_preamble, MAX_PIXELS, name="SCAN.DCM")[0] == by_marker).all()
    (tmp_path / "scan.dcm").write_bytes(no_preamble)
    assert (_decode(tmp_path / "scan.dcm", MAX_PIXELS) == by_marker).all()  # `medclf predict` on the file
    with pytest.raises(DecodeError, match="decompression bomb: 48x64 pixels exceeds max_image_pixels=100"):
        decode_bytes(dcm, 100, name="x.dcm")  # the same pixel guard for DICOM and raster
    png = io.BytesIO()
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(png, format="PNG")
    assert decode_bytes(png.getvalue(), MAX_PIXELS, name="x.png")[0].shape == (20, 30, 1)
    with pytest.raises(DecodeError, match="decompression bomb: 600 pixels exceeds max_image_pixels=100"):
        decode_bytes(png.getvalue(), 100)


def test_a_decode_bound_does_not_leak_into_the_process():
    """Each decode sets PIL's process-wide MAX_IMAGE_PIXELS to its own bound; it used to stay set, so a later
    `Image.open` anywhere in the process (a test fixture, another model's decode) was refused at 200 pixels."""
    import io

    import numpy as np
    from PIL import Image

    from medclf.imaging.images import DecodeError, decode_image_sized

    before = Image.MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(buf, format="PNG")
    with contextlib.suppress(DecodeError):
        decode_image_sized(buf.getvalue(), max_pixels=200)
    assert before == Image.MAX_IMAGE_PIXELS
    decode_image_sized(buf.getvalue(), max_pixels=10**6)
    assert before == Image.MAX_IMAGE_PIXELS
