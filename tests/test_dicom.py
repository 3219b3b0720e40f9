"""decode_dicom / dicom_patient_id on real DICOM files built in memory with pydicom."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medclf.imaging.dicom import decode_dicom, dicom_patient_id
from medclf.imaging.pixels import DecodeError


def make_dataset(
    arr: np.ndarray | None,
    *,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    transfer_syntax: UID = ExplicitVRLittleEndian,
    **attrs: Any,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P123"
    ds.Modality = "OT"
    if arr is not None:
        colour = arr.ndim == 3 and arr.shape[-1] == 3
        ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 8 if arr.dtype.itemsize == 1 else 16
        ds.BitsStored = min(bits_stored, ds.BitsAllocated)
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(signed)
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, **({"enforce_file_format": True} | kwargs))
    return buf.getvalue()


def make_dicom(arr: np.ndarray | None, **kwargs: Any) -> bytes:
    return to_bytes(make_dataset(arr, **kwargs))


def test_12bit_monochrome2_minmax() -> None:
    raw = np.array([[0, 1024], [2048, 4095]], np.uint16)
    out = decode_dicom(make_dicom(raw, RescaleSlope=2, RescaleIntercept=-1024))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 1)
    assert out[..., 0].tolist() == [[0, 64], [128, 255]]


def test_rescale_is_applied_before_window() -> None:
    # raw 1024 -> HU 0; soft-tissue window C=40 W=400 puts HU 0 at ~102, not at 255 (raw units)
    raw = np.array([[0, 1024], [1264, 4095]], np.uint16)
    data = make_dicom(raw, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    out = decode_dicom(data)[..., 0]
    assert out[0, 0] == 0 and out[1, 1] == 255
    assert out[0, 1] == round(((0 - 39.5) / 399 + 0.5) * 255)
    assert out[1, 0] == 255  # HU 240 is the top of the window


def test_monochrome1_is_inverted() -> None:
    raw = np.array([[0, 100], [2000, 4095]], np.uint16)
    out = decode_dicom(make_dicom(raw, photometric="MONOCHROME1"))[..., 0]
    assert out[1, 1] == 0  # the max raw value is the darkest
    assert out[0, 0] == 255
    mono2 = decode_dicom(make_dicom(raw, photometric="MONOCHROME2"))[..., 0]
    np.testing.assert_array_equal(out, 255 - mono2)


def test_window_center_width_multivalued_uses_first() -> None:
    raw = np.array([[0, 50], [100, 1000]], np.uint16)
    data = make_dicom(raw, WindowCenter=[100, 500], WindowWidth=[50, 1000])
    out = decode_dicom(data)[..., 0]
    assert out[0, 0] == 0 and out[0, 1] == 0  # below the window
    assert out[1, 1] == 255  # above the window
    assert abs(int(out[1, 0]) - 128) <= 3  # the centre


def test_window_width_one_is_a_threshold() -> None:
    raw = np.array([[99, 100]], np.uint16)
    out = decode_dicom(make_dicom(raw, WindowCenter=100, WindowWidth=1))[..., 0]
    assert out.tolist() == [[0, 255]]


def test_16bit_unsigned() -> None:
    raw = np.array([[0, 32768], [65535, 16384]], np.uint16)
    out = decode_dicom(make_dicom(raw, bits_stored=16))[..., 0]
    assert out.tolist() == [[0, 128], [255, 64]]


def test_signed_12bit_in_16bit_respects_bits_stored() -> None:
    # 12-bit two's complement without sign extension: 0x800 = -2048, 0xFFF = -1
    stored = np.array([[0x800, 0xFFF], [0x000, 0x7FF]], np.uint16)
    out = decode_dicom(make_dicom(stored, signed=True, bits_stored=12))[..., 0]
    assert out[0, 0] == 0 and out[1, 1] == 255
    assert (out[0, 1], out[1, 0]) == (127, 128)  # -1 and 0: adjacent values straddling the middle


def test_signed_16bit_with_window() -> None:
    raw = np.array([[-1000, -200], [0, 3000]], np.int16)
    out = decode_dicom(make_dicom(raw, signed=True, bits_stored=16, WindowCenter=0, WindowWidth=400))
    assert out[..., 0].tolist()[0] == [0, 0] and out[1, 1, 0] == 255
    assert abs(int(out[1, 0, 0]) - 128) <= 1


def test_rgb() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out = decode_dicom(make_dicom(rgb, bits_stored=8, photometric="RGB"))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, rgb)


def test_ybr_full_is_converted_to_rgb() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [128, 128, 128]]], np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = decode_dicom(make_dicom(ybr, bits_stored=8, photometric="YBR_FULL"))
    assert out.shape == (2, 2, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 2


def test_dicom_without_preamble_is_read() -> None:
    ds = make_dataset(np.array([[0, 4095]], np.uint16))
    del ds.file_meta
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    assert not buf.getvalue().startswith(bytes(128))
    assert decode_dicom(buf.getvalue())[..., 0].tolist() == [[0, 255]]


def test_no_pixel_data() -> None:
    with pytest.raises(DecodeError, match="^DICOM has no pixel data$"):
        decode_dicom(make_dicom(None))


def test_multi_frame() -> None:
    frames = np.zeros((3, 4, 4), np.uint16)
    ds = make_dataset(frames[0], NumberOfFrames=3)
    ds.PixelData = frames.tobytes()
    with pytest.raises(DecodeError, match=r"^multi-frame DICOM \(3 frames\) is not supported$"):
        decode_dicom(to_bytes(ds))


def test_truncated_pixel_data() -> None:
    data = make_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    with pytest.raises(DecodeError, match="^DICOM pixel data cannot be decoded: file is truncated"):
        decode_dicom(data[: len(data) - 1000])


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_encapsulated_pixel_data() -> None:
    ds = make_dataset(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    ds.compress(RLELossless)
    data = to_bytes(ds)
    assert decode_dicom(data).shape == (64, 64, 1)
    with pytest.raises(DecodeError, match="^DICOM pixel data cannot be decoded: file is truncated"):
        decode_dicom(data[: len(data) // 2])


def test_truncated_in_header() -> None:
    data = make_dicom(np.zeros((8, 8), np.uint16))
    with pytest.raises(DecodeError, match="^DICOM pixel data cannot be decoded: file is truncated"):
        decode_dicom(data[:200])


@pytest.mark.parametrize(
    "data", [b"hello, this is a text file and not a DICOM" * 5, b"\x89PNG\r\n\x1a\n" + bytes(400), bytes(300)]
)
def test_not_dicom(data: bytes) -> None:
    with pytest.raises(DecodeError, match="^not a DICOM file$"):
        decode_dicom(data)


def test_zero_bytes() -> None:
    with pytest.raises(DecodeError, match="^zero-byte file$"):
        decode_dicom(b"")


def test_compressed_without_decoder_names_transfer_syntax() -> None:
    ds = make_dataset(np.zeros((8, 8), np.uint16), transfer_syntax=JPEGLSLossless)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60)])
    with pytest.raises(DecodeError, match="^DICOM pixel data cannot be decoded") as info:
        decode_dicom(to_bytes(ds))
    if not get_decoder(JPEGLSLossless).is_available:
        assert "JPEG-LS Lossless" in str(info.value) and str(JPEGLSLossless) in str(info.value)


def test_max_pixels() -> None:
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_dicom(make_dicom(np.zeros((10, 10), np.uint16)), max_pixels=99)


def test_patient_id() -> None:
    data = make_dicom(np.zeros((64, 64), np.uint16))
    assert dicom_patient_id(data) == "P123"
    assert dicom_patient_id(data[: len(data) - 4000]) == "P123"  # pixel data is never read
    ds = make_dataset(None)
    del ds.PatientID
    assert dicom_patient_id(to_bytes(ds)) is None
    ds.PatientID = "  "
    assert dicom_patient_id(to_bytes(ds)) is None
    assert dicom_patient_id(b"not dicom at all" * 20) is None
    assert dicom_patient_id(b"") is None


def test_png_renamed_dcm_is_not_a_dicom_file() -> None:
    """Issue 12, row 10: a real PNG (and a JPEG) renamed `.dcm` is "not a DICOM file", nothing about pixel data."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for mode, fmt in (("L", "PNG"), ("RGB", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG")):
        img = Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        with pytest.raises(DecodeError, match="^not a DICOM file"):
            decode_dicom(buf.getvalue())


@pytest.mark.filterwarnings("ignore:VR lookup failed", "ignore:Expected explicit VR")
@pytest.mark.parametrize("group", [b"\x08\x00", b"\x02\x00"])
def test_bytes_that_only_start_like_preambleless_dicom_are_not_a_dicom_file(group: bytes) -> None:
    """Row 10: no 'DICM' marker, and the first two bytes happen to be group 0008/0002 (a raw pixel dump, say):
    the reason said "DICOM pixel data cannot be decoded: file is truncated ..." instead of "not a DICOM file"."""
    rng = np.random.default_rng(12)
    for n in (60, 400, 5000):
        with pytest.raises(DecodeError, match="^not a DICOM file$"):
            decode_dicom(group + rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    dump = (np.arange(64 * 64, dtype="<u2") % 4096 + 8).tobytes()  # 12-bit pixels, first value 8: b"\x08\x00..."
    with pytest.raises(DecodeError, match="^not a DICOM file$"):
        decode_dicom(dump)
    # a real preamble-less file that starts with the retired (0008,0000) group length is still read
    ds = make_dataset(np.array([[0, 4095]], np.uint16))
    del ds.file_meta
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    legacy = b"\x08\x00\x00\x00\x04\x00\x00\x00\x64\x00\x00\x00" + buf.getvalue()
    assert decode_dicom(legacy)[..., 0].tolist() == [[0, 255]]


def test_dicom_patient_id_drives_the_patient_split(tmp_path, make_settings) -> None:
    """Issue 12, row 2: with no patient column in the manifest, the (hashed) DICOM PatientID groups the split."""
    import pandas as pd

    from medclf.imaging.privacy import hash_patient
    from medclf.stages import ingest

    raw = tmp_path / "dcm"
    raw.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for p in range(20):
        for j in range(2):
            name = f"p{p}_{j}.dcm"
            (raw / name).write_bytes(
                make_dicom(rng.integers(0, 4096, (24, 24)).astype(np.uint16), PatientID=f"MRN-{p:04d}")
            )
            rows.append({"path": name, "label": "a" if p % 2 else "b"})
    pd.DataFrame(rows).to_csv(raw / "labels.csv", index=False)  # no patient_id column
    s = make_settings({"ingest": {"source": {"kind": "dicom", "manifest": str(raw / "labels.csv")}}})
    out = ingest.run(s)
    assert out["images"] == 40 and out["patients"] == 20
    m = pd.read_parquet(s.paths.ingest_dir / "manifest.parquet")
    assert m["patient_hash"].notna().all()
    splits = m.groupby("patient_hash")["split"].nunique()
    assert (splits == 1).all(), m[["source_uri", "patient_hash", "split"]]
    assert set(m["patient_hash"]) == {hash_patient(f"MRN-{p:04d}") for p in range(20)}
    blob = (s.paths.ingest_dir / "manifest.parquet").read_bytes()
    blob += b"".join(f.read_bytes() for f in (s.paths.reports_dir / "ingest").iterdir())
    assert b"MRN-" not in blob  # never written in clear


def test_manifest_patient_column_wins_over_the_dicom_patient_id(tmp_path) -> None:
    import pandas as pd

    from medclf.sources.manifest import scan_manifest

    for i in range(3):
        (tmp_path / f"{i}.dcm").write_bytes(make_dicom(np.zeros((8, 8), np.uint16), PatientID=f"TAG{i}"))
    pd.DataFrame({"path": ["0.dcm", "1.dcm", "2.dcm"], "label": ["a"] * 3, "patient_id": ["COL0", "", "COL2"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    scan = scan_manifest(str(tmp_path / "m.csv"), None, kind="dicom")
    assert [r.patient_id for r in scan.records] == ["COL0", "TAG1", "COL2"]  # a blank cell falls back to the tag
    scan = scan_manifest(str(tmp_path / "m.csv"), None, kind="image")
    assert [r.patient_id for r in scan.records] == ["COL0", None, "COL2"]  # images have no tags to read


# ----------------------------------------------------------------------------- issue 22, rows 11d and 11f
def _after_dicm_marker(payload: bytes) -> bytes:
    return bytes(128) + b"DICM" + payload


@pytest.mark.filterwarnings("ignore:VR lookup failed", "ignore:Expected explicit VR", "ignore:Unknown encoding")
def test_a_non_dicom_dcm_is_not_a_dicom_file_rather_than_truncated() -> None:
    """Row 11d: bytes that are not DICOM elements were reported as "file is truncated in element (5C36,0F95)",
    because pydicom takes the garbage for an element of gigabytes and keeps the short rest as its value:
    - the 'DICM' marker, then no DICOM at all (a text file, a PNG, random bytes after a 132-byte header);
    - no marker, one plausible first element, then garbage."""
    from PIL import Image

    rng = np.random.default_rng(22)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="PNG")
    for data in (
        _after_dicm_marker(b"this is a text file, not a DICOM data set " * 5),
        _after_dicm_marker(buf.getvalue()),
        _after_dicm_marker(rng.integers(0, 256, 400, dtype=np.uint8).tobytes()),
        b"\x08\x00\x16\x00UI\x04\x001.2\x00" + rng.integers(0, 256, 100, dtype=np.uint8).tobytes(),
    ):
        with pytest.raises(DecodeError, match="^not a DICOM file$"):
            decode_dicom(data)
    # ... while a real file cut short is still "truncated", wherever it is cut
    whole = make_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096)
    for end in (150, 200, 300, len(whole) - 100):
        with pytest.raises(DecodeError, match="file is truncated"):
            decode_dicom(whole[:end])


def test_garbage_inside_a_real_dicom_header_is_corrupt_not_truncated() -> None:
    """A real header (file meta + patient) whose next element is garbage: the file is DICOM, but damaged."""
    ds = make_dataset(None)
    good = to_bytes(ds)
    bad = good + b"\x34\x12\x78\x56OB\x00\x00" + (1 << 30).to_bytes(4, "little") + bytes(50)
    with pytest.raises(DecodeError, match=r"^DICOM header cannot be parsed: .*\(1234,5678\) is not a DICOM element"):
        decode_dicom(bad)


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEG2000Lossless])
def test_decode_reasons_carry_no_memory_address(syntax: UID) -> None:
    """Row 11f: a compressed frame that is not an image gave "... pillow: cannot identify image file
    <_io.BytesIO object at 0x7f96c3a91b20>" (a different text each run, on two lines): one line, no address."""
    from medclf.imaging.images import decode_bytes

    ds = make_dataset(np.zeros((8, 8), np.uint8), bits_stored=8, transfer_syntax=syntax)
    ds.PixelData = encapsulate([b"not a compressed frame " * 8])
    ds["PixelData"].VR = "OB"
    for decode in (lambda b: decode_dicom(b), lambda b: decode_bytes(b, 10_000, name="x.dcm")):
        with pytest.raises(DecodeError, match="^DICOM pixel data cannot be decoded: ") as info:
            decode(to_bytes(ds))
        reason = str(info.value)
        assert "0x" not in reason and "object at" not in reason and "\n" not in reason, reason
        assert "cannot identify image file" in reason, reason
