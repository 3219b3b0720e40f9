"""Issue 22, row 3: EXIF orientation is applied wherever an image is decoded (ingest, `medclf predict`, serving).

A phone or a PACS export often stores a JPEG's pixels as the sensor read them and says how to turn them upright
in the EXIF Orientation tag. Ignoring the tag trains on (and scores) the image sideways. These tests take a real
demo radiograph, store its pixels turned by 90° with Orientation = 6 ("rotate 90° clockwise to display"), and
check each decode path returns the upright image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medclf.config import settings_from_dict
from medclf.imaging.images import decode_bytes

ROOT = Path(__file__).resolve().parents[1]
DEMO = min((ROOT / "data/demo/batch1/PNEUMONIA").glob("*.jpeg"))
ORIENTATION = 0x0112
MAX_PIXELS = 10_000_000


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def upright_and_rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, Path, Path]:
    """The demo image (upright, as decoded) and two files: the same pixels re-encoded upright, and stored
    turned 90° counter-clockwise with Orientation = 6 (a viewer turns them 90° clockwise to show them)."""
    upright = Image.open(DEMO)
    upright.load()
    d = tmp_path_factory.mktemp("exif")
    plain, rotated = d / "upright.jpeg", d / "rotated.jpeg"
    plain.write_bytes(_jpeg(upright))
    rotated.write_bytes(_jpeg(upright.transpose(Image.Transpose.ROTATE_90), orientation=6))
    assert Image.open(rotated).getexif()[ORIENTATION] == 6
    return np.asarray(upright), plain, rotated


def _close(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _check(decoded: np.ndarray, reference: np.ndarray) -> None:
    """Upright within JPEG re-encoding error; sideways would be tens of grey levels off on a radiograph."""
    err = _close(decoded, reference)
    sideways = _close(np.rot90(decoded, k=1), reference)
    assert err < 3.0, f"decoded image differs from the upright one by {err:.1f} grey levels on average"
    assert sideways > 5 * err + 5, "the reference is too symmetric to tell orientations apart"


def test_the_rotated_file_really_is_stored_sideways(upright_and_rotated) -> None:
    """The fixture is meaningful: without applying the tag, the stored pixels are the upright image turned."""
    upright, _, rotated = upright_and_rotated
    raw = np.asarray(Image.open(rotated))
    assert _close(np.rot90(raw, k=-1), upright) < 3.0
    assert _close(raw, upright) > 10.0


@pytest.mark.parametrize("hints", [{}, {"channels": 1, "size": 64}, {"channels": 3, "size": 32}])
def test_decode_bytes_applies_exif_orientation(upright_and_rotated, hints) -> None:
    """The one decode dispatcher (ingest, predict and the served model all call it), with and without the
    ingest's JPEG draft-mode hints; the file's own (height, width) is reported upright."""
    upright, plain, rotated = upright_and_rotated
    ref, _ = decode_bytes(plain.read_bytes(), MAX_PIXELS, kind="image", **hints)
    got, shape = decode_bytes(rotated.read_bytes(), MAX_PIXELS, kind="image", **hints)
    _check(got[..., 0], ref[..., 0])
    assert shape[:2] == upright.shape[:2]


def test_ingest_decode_applies_exif_orientation(upright_and_rotated) -> None:
    """Ingest's per-record decode (fetch → decode → channels → fit_square) gives the upright image."""
    from medclf.sources.base import Record
    from medclf.sources.decode import _decode_one

    upright, _, rotated = upright_and_rotated
    cfg = settings_from_dict({"ingest": {"image_size": 128, "channels": 1}}).ingest
    out = _decode_one(Record(uri=str(rotated), label="PNEUMONIA", fetch=rotated.read_bytes), cfg)
    assert out.reason is None and out.image is not None
    _check(out.image[..., 0], upright)
    assert out.orig_shape[:2] == upright.shape[:2]


def test_predict_and_serving_decode_apply_exif_orientation(upright_and_rotated) -> None:
    """`medclf predict` reads the file from disk; the served pyfunc gets its bytes (base64 or raw)."""
    import base64

    from medclf.release.predict import _decode
    from medclf.release.serving import decode_one

    upright, _, rotated = upright_and_rotated
    _check(_decode(rotated, MAX_PIXELS)[..., 0], upright)
    _check(decode_one(rotated.read_bytes(), MAX_PIXELS)[..., 0], upright)
    _check(decode_one(base64.b64encode(rotated.read_bytes()).decode(), MAX_PIXELS)[..., 0], upright)


def test_every_orientation_is_undone(upright_and_rotated) -> None:
    """All eight EXIF orientations (mirrors included) come back upright."""
    upright, _, _ = upright_and_rotated
    img = Image.fromarray(upright)
    T = Image.Transpose
    # how each orientation's stored pixels relate to the upright image (the inverse of what a viewer applies)
    stored = {
        1: img,
        2: img.transpose(T.FLIP_LEFT_RIGHT),
        3: img.transpose(T.ROTATE_180),
        4: img.transpose(T.FLIP_TOP_BOTTOM),
        5: img.transpose(T.TRANSPOSE),
        6: img.transpose(T.ROTATE_90),
        7: img.transpose(T.TRANSVERSE),
        8: img.transpose(T.ROTATE_270),
    }
    for orientation, pixels in stored.items():
        got, _ = decode_bytes(_jpeg(pixels, orientation), MAX_PIXELS, kind="image")
        assert _close(got[..., 0], upright) < 3.0, f"orientation {orientation}"
