"""Is this image the modality the model was trained on? Channels and colourfulness (pure: arrays in, numbers out).

A chest X-ray, mammogram, ultrasound, CT or MR image is greyscale by nature; a model trained on them still returns
a confident probability for a colour photograph (issue 22, row 5: an RGB gradient was labelled PNEUMONIA at
0.944). So for a greyscale modality (`ingest.modality`, table `medclf.config.vocabulary.MODALITIES`) a colour
picture is refused: validate's `colour` check fails on it (an error by default, `validate.severity.colour`), and
the registered model, which carries its modality in the MLflow `model_config`, refuses it at `medclf predict` and
at the endpoint with the file (row) and the measured value. Dermoscopy, fundus and histology are colour by nature:
no colour check. Grey stored as RGB (R = G = B, as many PACS and JPEG exports write it) is grey: its colourfulness
is 0.

The measure is Hasler and Süsstrunk's colourfulness (2003): with rg = R − G and yb = (R + G)/2 − B,
M = √(σ_rg² + σ_yb²) + 0.3 √(μ_rg² + μ_yb²), on 0..255 pixels. Their scale: 0 not colourful, 15 slightly,
33 moderately, 45 averagely, 59 quite, 82 highly, 109 extremely colourful. Measured on real images:

| images | colourfulness |
|---|---:|
| 400 real Kermany chest X-ray JPEGs stored as RGB (../shared/data/chest_xray, full size and 1/8 draft) | 0.000 (max) |
| the 200 first data/demo X-rays re-encoded as RGB JPEG, quality 75 | 0.000 (max) |
| a data/demo X-ray tinted sepia (R, 0.9 G, 0.7 B) | 27.2 |
| scikit-learn's `china.jpg` photograph (the least colourful photo tried) | 36.7 |
| scikit-learn's `flower.jpg`, scikit-image's astronaut / coffee / chelsea | 86.5 / 72.6 / 76.9 / 38.0 |
| scikit-image's retina (a fundus photograph) | 99.5 |
| an RGB gradient "photo" (issue 22) | 157.1 |

`GREY_MAX_COLOURFULNESS` = 10 sits between "not colourful" and "slightly colourful": far above JPEG chroma noise
on grey content (0 measured), below a tinted film photograph and any real colour photo. A small coloured
annotation mark on an X-ray moves the whole-image measure by little, so it stays under the bound.
"""

from __future__ import annotations

import io

import numpy as np

from medclf.config import MODALITIES

GREY_MAX_COLOURFULNESS = 10.0
"""Largest colourfulness accepted for a greyscale modality (the module docstring gives the measurements)."""
_SAMPLE_SIDE = 256
"""The measure runs on a strided view of at most about this many pixels a side: a 3000×3000 RGB radiograph
costs ~1 ms, not a float copy of 27 M values; the statistic is an average, so the subsample estimates it well."""


def expects_grey(modality: str | None) -> bool:
    """True for a greyscale modality; None (a model registered before modalities were recorded) is not checked."""
    if modality is None:
        return False
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {sorted(MODALITIES)}")
    return MODALITIES[modality]


def colourfulness(arr: np.ndarray) -> float:
    """Hasler–Süsstrunk colourfulness of an image (H×W, H×W×1, H×W×3 or H×W×4; alpha ignored); 0 for grey."""
    a = np.asarray(arr)
    if a.ndim < 3 or a.shape[-1] < 3 or a.size == 0:
        return 0.0
    return float(_hasler(a[None], axes=(1, 2))[0])


def _hasler(images: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """The one formula: opponent channels rg and yb of a subsample (at most ~_SAMPLE_SIDE a side) of each image."""
    step = max(1, -(-max(images.shape[1], images.shape[2]) // _SAMPLE_SIDE))
    s = np.asarray(images[:, ::step, ::step, :3], np.float32)
    r, g, b = s[..., 0], s[..., 1], s[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    result: np.ndarray = np.hypot(rg.std(axes), yb.std(axes)) + 0.3 * np.hypot(rg.mean(axes), yb.mean(axes))
    return result


def colourfulness_batch(images: np.ndarray, chunk: int = 128) -> np.ndarray:
    """`colourfulness` of each image of an (N, H, W, C) array (a memory map is read `chunk` images at a time)."""
    out = np.zeros(len(images), np.float64)
    if images.ndim != 4 or images.shape[-1] < 3:
        return out
    for a in range(0, len(images), chunk):
        out[a : a + chunk] = _hasler(images[a : a + chunk], axes=(1, 2))
    return out


def file_colourfulness(data: bytes | None, arr: np.ndarray) -> float:
    """Colourfulness of an input file as it is stored, for ingest, where `arr` may already be grey.

    `arr` is the decode ingest keeps; with `ingest.channels: 1` a colour JPEG comes back from libjpeg already
    converted to grey (draft mode), so its colour is gone. Then the file is opened again and decoded at its
    smallest DCT scale (1/8 a side, ~1 ms) in RGB, just for this measure. Anything else is measured on `arr`.
    """
    if np.asarray(arr).ndim == 3 and arr.shape[-1] >= 3 or data is None:
        return colourfulness(arr)
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.mode not in ("RGB", "YCbCr", "CMYK", "P", "RGBA"):
            return 0.0
        if img.format == "JPEG":
            img.draft("RGB", (_SAMPLE_SIDE, _SAMPLE_SIDE))
        return colourfulness(np.asarray(img.convert("RGB")))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return colourfulness(arr)  # not a raster file Pillow reads (DICOM): `arr` is its full decode


def colour_problem(arr: np.ndarray, modality: str | None, bound: float = GREY_MAX_COLOURFULNESS) -> str | None:
    """Why `arr` is not an image of `modality` (a colour picture in a greyscale modality), or None if it is."""
    if not expects_grey(modality):
        return None
    value = colourfulness(arr)
    if value <= bound:
        return None
    return (
        f"colour image (colourfulness {value:.1f}, above {bound:g} for the greyscale modality "
        f"{modality!r}): not a {modality} image (ingest.modality)"
    )


__all__ = [
    "GREY_MAX_COLOURFULNESS",
    "colour_problem",
    "colourfulness",
    "colourfulness_batch",
    "expects_grey",
    "file_colourfulness",
]
