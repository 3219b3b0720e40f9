"""Decoding and geometry: every supported input becomes a uint8 H×W×C array.

Each mode conversion is deliberate and documented, because a silent wrong
conversion (16-bit clipped to white, alpha composited on black, CMYK read as
RGB) produces a dataset that trains but means nothing.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from medclf.imaging.pixels import DecodeError, cause, to_uint8

# Truncated files must raise, never decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


_EXIF_ORIENTATION = 0x0112
_TURNED = range(2, 9)  # 1 is upright; 2-8 are the mirrors and quarter turns of EXIF/TIFF Orientation


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale: scale the stored range to 8 bits, not clip.
        return to_uint8(np.asarray(img))[..., None]
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))[..., None]
    if mode == "LA":
        return np.asarray(img.convert("L"))[..., None]
    if mode == "P":
        # Palette: expand through the palette (with its transparency) to RGB(A).
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode == "RGBA":
        # Composite on black: medical images have black backgrounds, white would add a frame.
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(bg, img).convert("RGB"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        return np.asarray(img.convert("RGB"))
    if mode == "RGB":
        return np.asarray(img)
    raise DecodeError(f"unsupported image mode {mode!r}")


def decode_image(data: bytes, max_pixels: int, channels: int | None = None, size: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/BMP/TIFF bytes; raise DecodeError with a human reason.

    With `channels`/`size` hints a JPEG is decoded by libjpeg straight to grayscale
    and, when much larger than needed, at a reduced DCT scale (PIL's draft mode):
    several times faster than decoding full-size RGB and converting afterwards.
    """
    return decode_image_sized(data, max_pixels, channels, size)[0]


def decode_image_sized(
    data: bytes, max_pixels: int, channels: int | None = None, size: int | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`decode_image`, plus the file's own (height, width, channels).

    A JPEG decoded in draft mode comes back smaller (and grey) than the file is; the
    second value is what the file holds, for the manifest's orig_* columns.
    """
    if not data:
        raise DecodeError("zero-byte file")
    before = Image.MAX_IMAGE_PIXELS  # a process-wide PIL setting: restored, so no other decode inherits our bound
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels
            img: Image.Image = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(f"decompression bomb: {w}x{h} pixels exceeds max_image_pixels={max_pixels}")
            file_rgb = img.mode == "RGB"
            if img.format == "JPEG" and img.mode in ("RGB", "L") and (channels or size):
                img.draft("L" if channels == 1 else img.mode, (size, size) if size else img.size)
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # multi-page TIFF: the first page is the image
            # EXIF (JPEG, TIFF, WebP, PNG eXIf) Orientation: the stored pixels are turned/mirrored and the tag
            # says how to show them upright. Ignoring it trains on (and scores) the image sideways.
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            if orientation in _TURNED:
                img = ImageOps.exif_transpose(img)
                if orientation >= 5:  # 5-8 swap the axes: report the file's own size as it is shown
                    w, h = h, w
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow quotes its own limit, which is twice ours past 2× (an error, not a warning): quote ours
        found = re.search(r"\((\d+) pixels\)", str(err))
        what = f"{found.group(1)} pixels" if found else "the image"
        raise DecodeError(f"decompression bomb: {what} exceeds max_image_pixels={max_pixels}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except OSError as err:
        raise DecodeError(f"truncated or corrupt image: {cause(err)}") from None
    except (ValueError, SyntaxError, EOFError) as err:
        raise DecodeError(f"corrupt image: {cause(err)}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = before
    arr = _pil_to_array(img)
    return arr, (h, w, 3 if file_rgb else int(arr.shape[2]))


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale↔RGB. RGB→gray uses ITU-R 601 luma (what PIL's 'L' does)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[-1]
    if c == channels:
        return arr
    if channels == 3 and c == 1:
        return np.repeat(arr, 3, axis=-1)
    if channels == 1 and c >= 3:
        return np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., :3])).convert("L"))[..., None]
    raise DecodeError(f"cannot map {c} channels to {channels}")


def fit_square(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize to size×size keeping the aspect ratio: `pad` letterboxes with 0, `crop` centre-crops."""
    h, w, c = arr.shape
    if (h, w) == (size, size):
        return arr
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        arr = arr[top : top + s, left : left + s]
        h = w = s
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    out = np.zeros((size, size, c), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    res = np.asarray(img)
    out[top : top + nh, left : left + nw] = res[..., None] if res.ndim == 2 else res
    return out


# ----------------------------------------------------------------------------- the one decode dispatcher
DICOM_SUFFIXES = (".dcm", ".dicom")
_DICM_OFFSET = 128


def is_dicom(data: bytes) -> bool:
    """The DICOM Part 10 marker: 'DICM' after the 128-byte preamble."""
    return len(data) > _DICM_OFFSET + 4 and data[_DICM_OFFSET : _DICM_OFFSET + 4] == b"DICM"


def decode_bytes(
    data: bytes,
    max_pixels: int,
    *,
    kind: Literal["image", "dicom"] | None = None,
    name: str | None = None,
    channels: int | None = None,
    size: int | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """File bytes → (uint8 H×W×C, the file's own (height, width, channels)): ingest, `medclf predict` and the
    served model all decode through here, so an input is refused (DecodeError) or read the same way by each.

    DICOM when `kind` says so, else (no `kind`) when `name` ends in .dcm/.dicom or the bytes carry the 'DICM'
    marker; `kind="image"` (a source that knows its files are raster images) never sniffs. Raster formats go
    through Pillow (`channels`/`size` are decode hints, see `decode_image`). Either way `max_pixels` guards
    against decompression bombs.
    """
    dicom = (
        kind == "dicom" if kind is not None else bool(name and name.lower().endswith(DICOM_SUFFIXES)) or is_dicom(data)
    )
    if dicom:
        # lazy: pydicom loads only when a DICOM arrives (and medclf.imaging.dicom imports this module)
        from medclf.imaging.dicom import decode_dicom

        arr = decode_dicom(data, max_pixels=max_pixels)
        return arr, (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
    return decode_image_sized(data, max_pixels, channels, size)
