"""MedMNIST `.npz` files (`train_images`, `train_labels`, `val_*`, `test_*`).

With internet, `medmnist_flag` downloads the official Zenodo file and checks its
MD5 (the values the `medmnist` package records in `INFO`). Offline, point
`source.uri` at a local (or s3://) `.npz` instead.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np

from medclf.config import Source
from medclf.infra.io import file_digest
from medclf.sources.base import Record, SourceError, SourceScan
from medclf.sources.store import open_store, split_uri

log = logging.getLogger(__name__)
ZENODO = "https://zenodo.org/records/10519652/files/{flag}{suffix}.npz?download=1"
# flag -> (labels, {size: md5}); from medmnist.INFO (v3.0).
KNOWN: dict[str, tuple[list[str], dict[int, str]]] = {
    "pneumoniamnist": (
        ["normal", "pneumonia"],
        {
            28: "28209eda62fecd6e6a2d98b1501bb15f",
            64: "8f4eceb4ccffa70c672198ea285246c6",
            128: "05b46931834c231683c68f40c47b2971",
            224: "d6a3c71de1b945ea11211b03746c1fe1",
        },
    ),
    "breastmnist": (
        ["malignant", "normal_or_benign"],
        {
            28: "750601b1f35ba3300ea97c75c52ff8f6",
            64: "742edef2a1fd1524b2efff4bd7ba9364",
            128: "363e4b3f8d712e9b5de15470a2aaadf1",
            224: "b56378a6eefa9fed602bb16d192d4c8b",
        },
    ),
    "dermamnist": (
        ["akiec", "bcc", "bkl", "df", "melanoma", "nevus", "vascular"],
        {
            28: "0744692d530f8e62ec473284d019b0c7",
            64: "b70a2f5635c6199aeaa28c31d7202e1f",
            128: "2defd784463fa5243564e855ed717de1",
            224: "8974907d8e169bef5f5b96bc506ae45d",
        },
    ),
    "retinamnist": (
        ["grade0", "grade1", "grade2", "grade3", "grade4"],
        {
            28: "bd4c0672f1bba3e3a89f0e4e876791e4",
            64: "afda852cc34dcda56f86ad2b2457dbcc",
            128: "e48e916a24454daf90583d4e6efb1a18",
            224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
        },
    ),
    "bloodmnist": (
        [
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature_granulocyte",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ],
        {
            28: "7053d0359d879ad8a5505303e11de1dc",
            64: "2b94928a2ae4916078ca51e05b6b800b",
            128: "adace1e0ed228fccda1f39692059dd4c",
            224: "b718ff6835fcbdb22ba9eacccd7b2601",
        },
    ),
}


def _same(a: np.ndarray) -> np.ndarray:
    """The record's already-decoded pixels (bound with functools.partial, as the folder source binds reads)."""
    return a


def download(flag: str, size: int, cache_dir: Path, url_template: str = ZENODO) -> Path:
    """Fetch the official file once into `cache_dir` and verify its MD5."""
    if flag not in KNOWN:
        raise SourceError(f"unknown MedMNIST flag {flag!r}; known: {sorted(KNOWN)} (or set source.uri to a .npz)")
    expected = KNOWN[flag][1][size]
    suffix = "" if size == 28 else f"_{size}"
    target = cache_dir / f"{flag}{suffix}.npz"
    if target.exists() and file_digest(target, algo="md5") == expected:
        return target
    url = url_template.format(flag=flag, suffix=suffix)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as fh:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise SourceError(
            f"cannot download MedMNIST {flag} ({size}px) from {url}: {err}. Offline? Download the file "
            f"elsewhere and set ingest.source.uri to its local path, e.g. data/raw/{target.name}",
            transient=True,
        ) from None
    got = file_digest(tmp, algo="md5")
    if got != expected:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{url}: MD5 mismatch (got {got}, expected {expected}); file discarded")
    os.replace(tmp, target)
    return target


def _labels_1d(y: np.ndarray, name: str, key: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise SourceError(f"{name}: {key} has shape {y.shape}; only single-label (N,) or (N,1) is supported")
    return y.astype(np.int64)


def scan_medmnist(source: Source, classes: list[str] | None) -> SourceScan:
    if source.uri:
        root, fname = split_uri(source.uri)
        name = source.uri
        try:
            data = open_store(root, source.s3_endpoint_url).read(fname)
        except FileNotFoundError:
            raise SourceError(f"{name}: no such file") from None
    else:
        path = download(source.medmnist_flag or "", source.medmnist_size, Path(".cache/medmnist"))
        name, data = str(path), path.read_bytes()
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises many types for a bad archive
        raise SourceError(f"{name}: not a readable .npz file: {err}") from None
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in npz.files]
    if not splits:
        raise SourceError(f"{name}: no '<split>_images' arrays (found {npz.files})")
    names = source.medmnist_labels or classes or (KNOWN.get(source.medmnist_flag or "", (None,))[0])
    scan = SourceScan(records=[], class_names=list(names) if names else None)
    for split in splits:
        if f"{split}_labels" not in npz.files:
            raise SourceError(f"{name}: {split}_images has no matching {split}_labels")
        x, y = npz[f"{split}_images"], _labels_1d(npz[f"{split}_labels"], name, f"{split}_labels")
        if len(x) != len(y):
            raise SourceError(f"{name}: {split}_images has {len(x)} rows but {split}_labels has {len(y)}")
        for i in range(len(x)):
            label = names[y[i]] if names and 0 <= y[i] < len(names) else str(int(y[i]))
            scan.records.append(
                Record(
                    uri=f"{name}#{split}/{i}",
                    label=label,
                    fetch=functools.partial(_same, x[i]),
                    kind="array",
                    split=split,
                )
            )
    return scan
