"""SYNTHETIC demo data: chest-radiograph-like phantoms, with and without a focal opacity.

Nothing here is a real patient. The images exist so the whole pipeline runs
offline, deterministically, on a task a CNN can actually learn: 'opacity'
phantoms carry one or two bright blurred blobs inside a lung field.
"""

from __future__ import annotations

import numpy as np

from medclf.config import SyntheticSource
from medclf.sources.base import Record, SourceScan

CLASSES = ["normal", "opacity"]


def _blur(img: np.ndarray, passes: int = 2) -> np.ndarray:
    for _ in range(passes):
        img = (img + np.roll(img, 1, 0) + np.roll(img, -1, 0) + np.roll(img, 1, 1) + np.roll(img, -1, 1)) / 5
    return img


def phantom(rng: np.random.Generator, size: int, opacity: bool, body: float) -> np.ndarray:
    """One 8-bit grayscale phantom: thorax, two dark lung fields, spine, ribs, optional opacity."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size), 0.08)
    thorax = ((xx - 0.5) / (0.42 * body)) ** 2 + ((yy - 0.55) / 0.5) ** 2 < 1
    img[thorax] = 0.62
    lungs = []
    for cx in (0.33, 0.67):
        cx += rng.normal(0, 0.01)
        lung = ((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img[lung] = 0.22
        lungs.append((cx, lung))
    img[(np.abs(xx - 0.5) < 0.035) & thorax] = 0.8  # spine
    for k in range(6):  # ribs
        ry = 0.28 + k * 0.085 + rng.normal(0, 0.004)
        img[(np.abs(yy - ry - 0.05 * np.abs(xx - 0.5)) < 0.008) & thorax] += 0.12
    if opacity:
        for _ in range(rng.integers(1, 3)):
            cx, lung = lungs[rng.integers(0, 2)]
            ox, oy = cx + rng.normal(0, 0.04), 0.5 + rng.normal(0, 0.1)
            r = rng.uniform(0.05, 0.09)
            blob = np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * r**2)))
            img += 0.35 * blob * lung
    img = _blur(img) + rng.normal(0, 0.025, img.shape)
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04)
    return np.clip(img * 255, 0, 255).astype(np.uint8)[..., None]


def scan_synthetic(cfg: SyntheticSource) -> SourceScan:
    rng = np.random.default_rng(cfg.seed)
    records: list[Record] = []
    for p in range(cfg.n_patients):
        sick = bool(rng.random() < cfg.prevalence)
        body = float(rng.uniform(0.9, 1.1))
        for k in range(cfg.images_per_patient):
            seed = int(rng.integers(0, 2**31))

            def make(seed: int = seed, sick: bool = sick, body: float = body) -> np.ndarray:
                return phantom(np.random.default_rng(seed), cfg.native_size, sick, body)

            records.append(
                Record(
                    uri=f"synthetic://phantom/{p:05d}-{k}",
                    label=CLASSES[sick],
                    fetch=make,
                    kind="array",
                    patient_id=f"SYN{p:05d}",
                )
            )
    return SourceScan(records=records, class_names=CLASSES)
