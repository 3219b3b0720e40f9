"""DICOM decoding: one single-frame image becomes a uint8 H×W×1 (grey) or H×W×3 (colour) array.

The display pipeline follows the standard: stored values → Modality LUT (rescale slope/
intercept, or the Modality LUT Sequence) → VOI (the first Window Centre/Width, else the VOI
LUT Sequence, else the image's own min–max) → MONOCHROME1 inverted so that high attenuation
is white, as in MONOCHROME2. Colour data (RGB, YBR_*, PALETTE COLOR) is converted to RGB.
Every failure is a DecodeError whose message is the quarantine reason.
"""

from __future__ import annotations

import io
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.datadict import dictionary_has_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medclf.imaging.pixels import DecodeError, cause, to_uint8

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _read(data: bytes, stop_before_pixels: bool = False) -> Dataset:
    """Parse bytes as DICOM. Files without the 128-byte preamble + 'DICM' are accepted only
    when a forced read starts with a plausible group (0002 meta or 0008 identifying)."""
    if not data:
        raise DecodeError("zero-byte file")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
            tags = list(ds.file_meta.keys()) + list(ds.keys())
        except Exception:  # noqa: BLE001 - any parse failure of arbitrary bytes means "not DICOM"
            raise DecodeError("not a DICOM file") from None
        if not tags or tags[0] >> 16 not in (0x0002, 0x0008) or not _plausible_first(ds, tags[0]):
            raise DecodeError("not a DICOM file") from None
    except Exception as err:  # noqa: BLE001 - has the DICM marker but the header does not parse
        raise DecodeError(f"DICOM header cannot be parsed: {type(err).__name__}: {cause(err)}") from None
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        # Preamble-less or damaged meta: declare the encoding pydicom actually detected.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian
        )
    return ds


def _plausible_first(ds: Dataset, tag: int) -> bool:
    """Without the 'DICM' marker, two bytes 02 00 or 08 00 are weak evidence (a raw pixel dump starts so):
    the first element must also be a standard one whose value is all there, else it is "not a DICOM file"
    rather than a confusing "truncated" DICOM."""
    if not (dictionary_has_tag(tag) or tag & 0xFFFF == 0x0000):  # (gggg,0000): a group length, older files
        return False
    container = ds.file_meta if tag >> 16 == 0x0002 else ds
    elem = cast("DataElement | RawDataElement", container.get_item(tag))
    if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH or elem.value is None:
        return True
    return len(elem.value) >= elem.length


def _check_truncation(ds: Dataset) -> None:
    """pydicom silently keeps a short value when the file ends early, and drops the whole data
    set when the file ends inside an undefined-length element (pixel data); detect both.
    Tags are iterated via keys() on purpose: iterating a Dataset converts its raw elements."""
    if not [t for t in ds.keys() if t >> 16 != 0x0002]:  # noqa: SIM118
        raise DecodeError(
            "DICOM pixel data cannot be decoded: file is truncated (the data set after the file meta "
            "header is missing or cut short)"
        )
    for container in (ds.file_meta, ds):
        for tag in container.keys():  # noqa: SIM118
            # pydicom's `get_item(tag)` overload says DataElement, but it returns the RawDataElement
            # of a value never accessed (see its docstring): keep both in the static type
            elem = cast("DataElement | RawDataElement", container.get_item(tag))
            if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
                continue
            if elem.value is not None and len(elem.value) < elem.length:
                if not _known_element(container, tag):
                    # the bytes there are no DICOM element: pydicom read garbage as a tag and a huge length.
                    # Fewer than two real elements read from the file (not the transfer syntax `_read` adds
                    # to a preamble-less one) before it: the file was never DICOM.
                    read = [
                        (c, t)
                        for c in (ds.file_meta, ds)
                        for t in c.keys()  # noqa: SIM118
                        if isinstance(c.get_item(t), RawDataElement)
                    ]
                    if sum(_known_element(c, t) for c, t in read) < 2:
                        raise DecodeError("not a DICOM file")
                    raise DecodeError(
                        f"DICOM header cannot be parsed: {elem.tag} is not a DICOM element (the file is corrupt)"
                    )
                raise DecodeError(
                    f"DICOM pixel data cannot be decoded: file is truncated in element {elem.tag} "
                    f"({len(elem.value)} of {elem.length} bytes present)"
                )


def _known_element(container: Dataset, tag: int) -> bool:
    """A tag a DICOM writer could have put there: a standard one, a group length, a private creator, or a
    private element whose creator is present. Garbage read as an element is almost never one of these."""
    group, elem = tag >> 16, tag & 0xFFFF
    if dictionary_has_tag(tag) or elem == 0x0000:
        return True
    if group % 2 == 0 or group in (0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF):
        return False
    if 0x0010 <= elem <= 0x00FF:
        return True
    return (group << 16 | elem >> 8) in container and elem >> 8 >= 0x10


def _first_float(value: Any) -> float | None:
    """First value of a possibly multi-valued numeric element, or None if absent/invalid."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    try:
        out = float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and np.isfinite(out) else None


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 255] (LINEAR, LINEAR_EXACT or SIGMOID)."""
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    elif width == 1.0:  # LINEAR with width 1 is a threshold at c - 0.5
        y = (x > center - 0.5).astype(np.float64)
    else:
        y = np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    return np.round(y * 255.0).astype(np.uint8)


def _voi(ds: Dataset, x: np.ndarray) -> np.ndarray:
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if center is not None and width is not None and (width >= 1.0 if function == "LINEAR" else width > 0.0):
        return _window(x.astype(np.float64), center, width, function)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = apply_voi(x, ds, index=0).astype(np.float64)
        scale: float = 255.0 / (2**bits - 1)  # `int ** int` is typed Any (a negative exponent gives a float)
        return np.clip(np.round(out * scale), 0, 255).astype(np.uint8)
    return to_uint8(x)


def _scale_colour(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    scale: float = 255.0 / (2**bits - 1)
    return np.clip(np.round(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def decode_dicom(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode one single-frame DICOM to uint8 H×W×1 (grey) or H×W×3 (RGB); raise DecodeError."""
    ds = _read(data)
    _check_truncation(ds)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DecodeError("DICOM has no pixel data")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError) as err:
        raise DecodeError(f"DICOM pixel data cannot be decoded: invalid image header: {err}") from None
    if frames > 1:
        raise DecodeError(f"multi-frame DICOM ({frames} frames) is not supported")
    if max_pixels is not None and rows * cols > max_pixels:
        raise DecodeError(f"decompression bomb: {cols}x{rows} pixels exceeds max_image_pixels={max_pixels}")
    tsyntax = ds.file_meta.TransferSyntaxUID
    if 0x7FE00010 in ds and tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise DecodeError(
                f"DICOM pixel data cannot be decoded: no decoder for transfer syntax {tsyntax.name} ({tsyntax})"
            ) from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies)
            raise DecodeError(
                f"DICOM pixel data cannot be decoded: no decoder installed for transfer syntax "
                f"{tsyntax.name} ({tsyntax}); needs one of: {missing}"
            )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    try:
        # raw=False: YBR_FULL/YBR_FULL_422 (and JPEG's YBR) come back already converted to RGB.
        arr = pixel_array(ds, raw=False)
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            bits = 16 if arr.dtype != np.uint8 else 8
            return _scale_colour(arr, bits)
        if arr.ndim == 3 and arr.shape[-1] == 3:
            return _scale_colour(arr, int(ds.get("BitsStored", 8) or 8))
        if arr.ndim != 2:
            raise DecodeError(f"DICOM pixel data cannot be decoded: unexpected array shape {arr.shape}")
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DecodeError(f"unsupported DICOM photometric interpretation {photometric!r}")
        out = _voi(ds, apply_modality_lut(arr, ds))
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise many types; each is a quarantine reason
        raise DecodeError(f"DICOM pixel data cannot be decoded: {type(err).__name__}: {cause(err)}") from None
    if photometric == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: minimum value is white; flip after the VOI transform
    return out[..., None]


def dicom_patient_id(data: bytes) -> str | None:
    """PatientID from the header (pixel data is not read); None when absent, empty or unreadable."""
    try:
        ds = _read(data, stop_before_pixels=True)
        value = ds.get("PatientID")
    except Exception:  # noqa: BLE001 - unreadable files are quarantined by decode_dicom, not here
        return None
    if value is None:
        return None
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    return text.strip() or None
