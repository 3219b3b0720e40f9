"""The lowest imaging floor: the decode error every reader raises, its one-line reason, and the >8-bit to
uint8 mapping. `images` (PNG/JPEG/TIFF) and `dicom` both build on it, so neither imports the other at load
time (`images.decode_bytes` reaches `dicom` lazily, only when a DICOM arrives)."""

from __future__ import annotations

import re

import numpy as np


class DecodeError(ValueError):
    """An input that cannot become an image; the message is the quarantine reason."""


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def cause(err: BaseException) -> str:
    """An exception's text fit for a quarantine reason: one line, without the `<_io.BytesIO object at 0x7f...>`
    that Pillow puts in "cannot identify image file" (an address that differs on every run and means nothing to
    a reader; the file itself is named beside the reason: the quarantine's uri, predict's path)."""
    return " ".join(_OBJECT_REPR.sub("", str(err)).split())


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map any numeric array to uint8 by its own min–max range (for >8-bit data)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise DecodeError("pixel data contains NaN or infinity")
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
