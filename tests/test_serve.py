"""Serving: `medclf predict` (files, folders, DICOM) and a real `mlflow models serve` subprocess over
HTTP give the same probabilities as the in-process Keras model, and the label at the registered
(validation-chosen) threshold."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bench.serve_bench import image_payload, invoke, png_b64, served
from medclf.release.serving import MAX_IMAGE_BYTES
from tests.test_dicom import make_dicom
from tests.test_evaluate import build_project, run_evaluate

pytestmark = pytest.mark.slow
ATOL = 1e-5  # same float32 model; batch composition may change the last bits


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server):
    from medclf.infra.catalog import load_split
    from medclf.release.serving import load_keras
    from medclf.stages import register

    root = tmp_path_factory.mktemp("serve")
    settings = build_project(
        root,
        mlflow_server,
        {"evaluate": {"bootstrap": 0, "gradcam_n": 0, "gates": {"min_f1": 0.0, "min_recall": 0.0}}},
        calibrate=True,
    )  # the model.keras served is the calibrated one, as train writes it
    _res, doc, gates = run_evaluate(settings)
    assert gates["passed"], gates
    reg = register.run(settings)
    model = load_keras(str(settings.paths.model_dir / "model.keras"))
    x, y = load_split(settings.paths, "test", mmap=False)
    meta = json.loads((settings.paths.ingest_dir / "classes.json").read_text())
    return {
        "root": root,
        "settings": settings,
        "reg": reg,
        "model": model,
        "x": x,
        "y": y,
        "meta": meta,
        "threshold": doc["threshold"],
    }


def _reference(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0), dtype=np.float64)


def _expected_labels(proba: np.ndarray, meta: dict, threshold: float) -> list[str]:
    pos = meta["classes"].index(meta["positive_class"])
    return [meta["classes"][pos] if p[pos] >= threshold else meta["classes"][1 - pos] for p in proba]


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _grey_square_reference(data: bytes, size: int = 32) -> np.ndarray:
    """A square image file as the model's (size, size, 1) grey input, written out here with PIL alone (no
    medclf code): decoded, ITU-R 601 luma, scaled bilinearly; pad and crop agree on a square image."""
    img = Image.open(io.BytesIO(data)).convert("L")
    assert img.size[0] == img.size[1] and size == 32
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))[..., None]


def _wide_80x60_reference(data: bytes, mode: str) -> np.ndarray:
    """An 80x60 (WxH) image file as the model's 32x32x1 grey input, by the ingest geometry written out here
    with PIL alone for this one shape: pad = scaled to 32x24 and letterboxed with black on rows 4..27;
    crop = the centre 60x60 (columns 10..69) scaled to 32x32."""
    img = Image.open(io.BytesIO(data)).convert("L")
    assert img.size == (80, 60)
    out = np.zeros((32, 32, 1), np.uint8)
    if mode == "pad":
        out[4:28, :, 0] = np.asarray(img.resize((32, 24), Image.Resampling.BILINEAR))
    elif mode == "crop":
        out[..., 0] = np.asarray(img.crop((10, 0, 70, 60)).resize((32, 32), Image.Resampling.BILINEAR))
    else:
        raise AssertionError(mode)
    return out


def _full_range(img: np.ndarray) -> np.ndarray:
    """The image with one black and one white pixel: the DICOM min-max VOI then maps 16*v back to v exactly."""
    out = img.copy()
    out[0, 0], out[-1, -1] = 0, 255
    return out


def test_predict_files_folders_dicom_match_in_process_model(registered, tmp_path):
    from medclf.release.predict import predict_paths

    r = registered
    x, model, meta = r["x"][:6], r["model"], r["meta"]
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    for i, img in enumerate(x):  # exact-size PNGs: the reference needs no serving code at all
        Image.fromarray(img[..., 0]).save(folder / f"img{i}.png")
    big = np.asarray(Image.fromarray(x[0][..., 0]).resize((80, 60)).convert("RGB"))  # other size + RGB
    (tmp_path / "in" / "big_rgb.jpg").write_bytes(_jpeg(big))
    dimg = _full_range(x[1])
    raw16 = dimg[..., 0].astype(np.uint16) * 16  # a 12-bit DICOM of a test image
    (tmp_path / "in" / "scan.dcm").write_bytes(make_dicom(raw16))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    single = tmp_path / "single.png"
    Image.fromarray(x[2][..., 0]).save(single)

    out = tmp_path / "pred.csv"
    uri = f"models:/{r['reg']['model_name']}@challenger"
    res = predict_paths([tmp_path / "in", single], uri, out, r["settings"])
    df = pd.read_csv(out)
    assert res["files"] == len(df) == 6 + 3 + 1 and res["failed"] == 1
    assert res["model_version"] == str(r["reg"]["version"]) and res["threshold"] == r["threshold"]
    cols = [f"p_{c}" for c in meta["classes"]]
    by_name = df.set_index(df["path"].map(lambda p: p.rsplit("/", 1)[-1]))
    # exact-size PNGs == the ingest arrays through model.predict
    ref = _reference(model, x)
    got = by_name.loc[[f"img{i}.png" for i in range(6)], cols].to_numpy()
    np.testing.assert_allclose(got, ref, atol=ATOL)
    assert by_name.loc[[f"img{i}.png" for i in range(6)], "label"].tolist() == _expected_labels(
        ref, meta, r["threshold"]
    )
    np.testing.assert_allclose(by_name.loc[["single.png"], cols].to_numpy(), ref[2:3], atol=ATOL)
    # resized RGB JPEG and DICOM, against inputs computed here without serving code: the JPEG letterboxed by
    # hand (ingest.resize), the DICOM's display image is the 8-bit test image it was made from
    mode = r["settings"].ingest.resize
    jpg_bytes = (tmp_path / "in" / "big_rgb.jpg").read_bytes()
    ref2 = _reference(model, np.stack([_wide_80x60_reference(jpg_bytes, mode), dimg]))
    np.testing.assert_allclose(by_name.loc[["big_rgb.jpg", "scan.dcm"], cols].to_numpy(), ref2, atol=ATOL)
    # the check can tell the resize modes apart on this image (pad and crop give other probabilities)
    other = _reference(model, _wide_80x60_reference(jpg_bytes, "crop" if mode == "pad" else "pad")[None])
    assert np.abs(other - ref2[:1]).max() > 100 * ATOL
    broken = by_name.loc["broken.png"]
    assert "DecodeError" in broken["error"] and np.isnan(broken[cols[0]])
    assert (df["threshold"] == r["threshold"]).all()


def test_registered_model_carries_its_modality_and_refuses_a_colour_photo(registered, tmp_path):
    """Issue 22, row 5: `medclf register` writes `ingest.modality` into the model_config, so the served model refuses
    a colour picture for a greyscale modality (here the default chest_xray) and still scores a grey image."""
    import mlflow.pyfunc

    from medclf.infra.tracking import mlflow_uri
    from medclf.release.predict import predict_paths
    from tests.test_modality import gradient

    r = registered
    uri = f"models:/{r['reg']['model_name']}@challenger"
    with mlflow_uri(r["settings"].mlflow.resolved_uri()):
        cfg = mlflow.pyfunc.load_model(uri).unwrap_python_model().cfg
    assert cfg.modality == r["settings"].ingest.modality == "chest_xray"
    Image.fromarray(gradient(64)).save(tmp_path / "photo.png")
    Image.fromarray(r["x"][0][..., 0]).convert("RGB").save(tmp_path / "xray_rgb.png")
    res = predict_paths([tmp_path / "photo.png", tmp_path / "xray_rgb.png"], uri, tmp_path / "out.csv", r["settings"])
    df = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert res["refused"] == 1 and df["error"].iloc[0].startswith("refused: colour image"), df["error"].tolist()
    assert df["error"].iloc[1] == ""


def test_cli_predict_defaults_to_champion(registered, tmp_path):
    from medclf.cli import main
    from medclf.release import registry

    r = registered
    settings = r["settings"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True)))
    Image.fromarray(r["x"][0][..., 0]).save(tmp_path / "a.png")
    out = tmp_path / "out.csv"
    assert main(["--params", str(params), "predict", str(tmp_path / "a.png"), "--out", str(out)]) == 1  # no champion
    registry.promote(settings, r["reg"]["version"], by="test")
    assert main(["--params", str(params), "predict", str(tmp_path / "a.png"), "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert df["model_uri"].iloc[0] == f"models:/{settings.registry.model_name}@champion"
    np.testing.assert_allclose(
        df[[f"p_{c}" for c in r["meta"]["classes"]]].to_numpy(), _reference(r["model"], r["x"][:1]), atol=ATOL
    )
    # the same (calibrated) probabilities evaluate reported for this test image, and the version says how calibrated
    ev = pd.read_csv(settings.paths.reports_dir / "evaluate" / "test_predictions.csv")
    np.testing.assert_allclose(
        df[[f"p_{c}" for c in r["meta"]["classes"]]].to_numpy(),
        ev[[f"p_{c}" for c in r["meta"]["classes"]]].to_numpy()[:1],
        atol=ATOL,
    )
    from mlflow import MlflowClient

    desc = (
        MlflowClient(settings.mlflow.resolved_uri())
        .get_model_version(settings.registry.model_name, r["reg"]["version"])
        .description
    )
    t = json.loads((settings.paths.model_dir / "train_run.json").read_text())["calibration"]["temperature"]
    assert f"temperature scaling, T = {t:.3f} fitted on the validation split" in desc, desc
    assert "ECE " in desc and " → " in desc and "(before → after)" in desc, desc


def test_served_endpoint_matches_in_process_model(registered, tmp_path):
    """Real HTTP to `mlflow models serve --env-manager local` resolving models:/name@challenger."""
    r = registered
    x, model, meta = r["x"][:5], r["model"], r["meta"]
    ref = _reference(model, x)
    cols = [f"p_{c}" for c in meta["classes"]]
    uri = f"models:/{r['reg']['model_name']}@challenger"
    # the request limits are model_config keys, so the operator's MLflow override reaches them at serve time
    limits = {"MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"max_request_images": 8})}
    with served(uri, r["settings"].mlflow.resolved_uri(), log_path=tmp_path / "serve.log", env=limits) as url:
        # base64 PNGs, dataframe_split (what bench/serve_bench.py sends)
        preds = invoke(url, image_payload([png_b64(img) for img in x]))["predictions"]
        got = np.array([[p[c] for c in cols] for p in preds])
        np.testing.assert_allclose(got, ref, atol=ATOL)
        assert [p["label"] for p in preds] == _expected_labels(ref, meta, r["threshold"])
        # pixel arrays (nested lists), dataframe_records
        recs = invoke(url, {"dataframe_records": [{"image": img[..., 0].tolist()} for img in x[:2]]})
        np.testing.assert_allclose([[p[c] for c in cols] for p in recs["predictions"]], ref[:2], atol=ATOL)
        # bad input: a clear 4xx naming the row and the reason, not a 500 stack trace
        with pytest.raises(RuntimeError, match=r"HTTP 4\d\d.*row 1.*base64"):
            invoke(url, image_payload([png_b64(x[0]), "not base64 at all!"]))
        # oversized requests: HTTP 400 with the size and the limit, refused before anything is decoded
        with pytest.raises(RuntimeError, match=r"HTTP 400.*request has 9 images, above the limit of 8 "):
            invoke(url, image_payload([png_b64(x[0])] * 9))
        over = "A" * (4 * (MAX_IMAGE_BYTES // 3 + 1))  # base64 of the default 20 MiB limit + 1 byte
        with pytest.raises(
            RuntimeError,
            match=r"HTTP 400.*input row 1: image is 20\.0 MiB \(20,971,521 bytes\) "
            r"encoded, above the limit of 20\.0 MiB .*max_image_bytes",
        ):
            invoke(url, image_payload([png_b64(x[0]), over]))
        # base64 JPEG and DICOM files (what the README says the endpoint accepts), against inputs computed here
        # without serving code: a 64x64 grey JPEG and an 80x60 RGB JPEG, resized by the pyfunc like ingest
        # does; 12-bit DICOMs, MONOCHROME2 and MONOCHROME1 (inverted), whose display image is the test image
        grey64 = _jpeg(np.asarray(Image.fromarray(x[0][..., 0]).resize((64, 64))))
        wide = _jpeg(np.asarray(Image.fromarray(x[2][..., 0]).resize((80, 60)).convert("RGB")))
        dimg = _full_range(x[3])
        mono2 = make_dicom(dimg[..., 0].astype(np.uint16) * 16)
        mono1 = make_dicom((255 - dimg[..., 0]).astype(np.uint16) * 16, photometric="MONOCHROME1")
        files = [grey64, wide, mono2, mono1]
        preds = invoke(url, image_payload([base64.b64encode(f).decode() for f in files]))["predictions"]
        mode = r["settings"].ingest.resize
        expected = np.stack([_grey_square_reference(grey64), _wide_80x60_reference(wide, mode), dimg, dimg])
        ref_files = _reference(model, expected)
        np.testing.assert_allclose([[p[c] for c in cols] for p in preds], ref_files, atol=ATOL)
        assert [p["label"] for p in preds] == _expected_labels(ref_files, meta, r["threshold"])
        # ... and the check can tell: the other resize mode, or a DICOM left un-inverted, would differ
        wrong = _reference(
            model, np.stack([_wide_80x60_reference(wide, "crop" if mode == "pad" else "pad"), 255 - dimg])
        )
        assert (np.abs(wrong - ref_files[[1, 3]]).max(axis=1) > 100 * ATOL).all()


# ----------------------------------------------------------------------------- resize mode (fast, no training)
def _wide_png(seed: int) -> bytes:
    """An 80×60 (W×H) grayscale PNG, never black, with bright side bands that a centre crop cuts off."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(60, 200, (60, 80), dtype=np.uint8)
    arr[:, :10] = arr[:, -10:] = 250
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class _Recorder:
    """Stands in for the Keras model inside the real pyfunc: records the batch the model would see."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        self.seen.append(np.asarray(x).copy())
        return np.tile([0.25, 0.75], (len(x), 1))


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_predict_uses_the_ingest_resize_mode_on_non_square_images(tmp_path, make_settings, mode):
    """Serving applies exactly the ingest geometry (`ingest.resize`), also to images not at the model's size.

    The expected arrays come from ingest itself (what the model was trained on) and from the geometry written
    out by hand with PIL (`_wide_80x60_reference`), never from `serving.prepare`.
    """
    from medclf.infra.catalog import load_split
    from medclf.release.serving import MedclfModel, ServingConfig
    from medclf.stages import ingest

    root = tmp_path / "raw"
    files: dict[str, bytes] = {}
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            name = f"{cls}/wide_{c}_{i}.png"
            files[name] = _wide_png(100 * c + i)
            (root / name).write_bytes(files[name])
    s = make_settings({"ingest": {"source": {"kind": "folder", "uri": str(root)}, "resize": mode}})
    ingest.run(s)
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert (m.orig_height == 60).all() and (m.orig_width == 80).all()
    meta = json.loads((s.paths.ingest_dir / "classes.json").read_text())
    size = meta["image_size"]
    cfg = ServingConfig(
        classes=meta["classes"],
        positive_class=meta["positive_class"],
        threshold=0.5,
        image_size=size,
        channels=meta["channels"],
        resize=s.ingest.resize,
    )
    wrapper = MedclfModel()
    wrapper.cfg, wrapper.model = cfg, _Recorder()
    names = [m.source_uri.iloc[j].split("/raw/", 1)[1] for j in range(len(m))]
    wrapper.predict(None, pd.DataFrame({"image": [base64.b64encode(files[n]).decode() for n in names]}))
    seen = np.concatenate(wrapper.model.seen)
    for j, row in m.iterrows():
        trained_on = load_split(s.paths, row.split, mmap=False)[0][row.row]
        np.testing.assert_array_equal(seen[j], trained_on, err_msg=f"{names[j]}: predict != ingest ({mode})")
        # ... and equals the geometry written out by hand (PIL alone) for this 80x60 shape
        np.testing.assert_array_equal(seen[j], _wide_80x60_reference(files[names[j]], mode), err_msg=names[j])
    # the two modes really differ on this image, so the checks above can tell them apart
    other = "crop" if mode == "pad" else "pad"
    assert not np.array_equal(_wide_80x60_reference(files[names[0]], other), seen[0])
    if mode == "pad":  # 80×60 → 32×24 letterboxed: rows 0..3 and 28..31 are black, the image is not
        pad = (size - round(60 * size / 80)) // 2
        assert pad == 4 and not seen[:, :pad].any() and not seen[:, size - pad :].any()
        assert seen[:, pad : size - pad].min() > 0
    else:  # the centre 60×60 is scaled to fill the square: no black border, the bright side bands gone
        assert seen.min() > 0 and seen[:, :, 0].max() < 250


# ----------------------------------------------------------------------------- request limits (fast, in-process)
def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(30, 220, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_request_limits_refuse_before_decoding_and_old_models_get_defaults():
    """max_request_images / max_image_bytes (model_config): HTTP 400 naming the size and the limit, checked on
    every cell before any is decoded; exactly at a limit is accepted. The HTTP path is in the served test."""
    from mlflow.exceptions import MlflowException

    from medclf.release.serving import MAX_REQUEST_IMAGES, MedclfModel, ServingConfig

    base = ServingConfig(classes=["a", "b"], positive_class="b", threshold=0.5, image_size=32, channels=1)
    old = {k: v for k, v in base.to_dict().items() if k not in ("max_request_images", "max_image_bytes")}
    assert ServingConfig.from_dict(old) == base  # models registered before the limits get the defaults
    assert (base.max_request_images, base.max_image_bytes) == (MAX_REQUEST_IMAGES, MAX_IMAGE_BYTES) == (64, 20 << 20)
    small, big = _png(24), _png(40)
    cfg = ServingConfig.from_dict({**base.to_dict(), "max_request_images": 3, "max_image_bytes": len(small)})
    assert ServingConfig.from_dict(cfg.to_dict()) == cfg and len(big) > len(small)

    def run(cells, c=cfg):
        wrapper = MedclfModel()
        wrapper.cfg, wrapper.model = c, _Recorder()
        try:
            return wrapper.predict(None, pd.DataFrame({"image": cells})), wrapper.model.seen
        except MlflowException as err:
            assert err.get_http_status_code() == 400
            return str(err.message), wrapper.model.seen

    b64 = base64.b64encode
    out, _ = run([b64(small).decode(), small, b64(small).decode()])  # at both limits: accepted
    assert len(out) == 3
    msg, seen = run([b64(small).decode()] * 4)
    assert msg.startswith("request has 4 images, above the limit of 3 per request (max_request_images)") and not seen
    over = f"image is 0.0 MiB ({len(big):,} bytes) encoded, above the limit of 0.0 MiB ({len(small):,} bytes)"
    for cell in (b64(big).decode(), big):  # base64 text (its length, not decoded) and raw bytes
        msg, seen = run(["not base64 at all!", cell])  # row 0 would fail decoding: the size check came first
        assert msg == f"input row 1: {over} per image (max_image_bytes)", msg
        assert not seen
    pixels = ServingConfig.from_dict({**base.to_dict(), "max_pixels": 1600})
    assert len(run([np.zeros((40, 40), np.uint8).tolist()], pixels)[0]) == 1
    msg, _ = run([np.zeros((40, 40), np.uint8).tolist(), np.zeros((41, 40), np.uint8).tolist()], pixels)
    assert msg == "input row 1: pixel array of 41x40 (HxW) is above the limit of 1,600 pixels (max_pixels)", msg
    assert len(run([b64(small).decode()] * 64, base)[0]) == 64  # the default: 64 accepted, 65 refused
    assert run([b64(small).decode()] * 65, base)[0].startswith("request has 65 images, above the limit of 64 ")
