"""MedMNIST `.npz` files (`train_images`, `train_labels`, `val_*`, `test_*`).

With internet, `medmnist_flag` downloads the official Zenodo file and checks its
MD5 (the values the `medmnist` package records in `INFO`). Offline, point
`source.uri` at a local (or s3://) `.npz` instead. With `medmnist_flag` set, label index `i`
takes the flag's class name from INFO (`KNOWN`: dermamnist's seven lesion types, retinamnist's
grades `"0"`..`"4"`, ...); `source.medmnist_labels`, else `ingest.classes`, overrides them.

Multi-label `chestmnist` (issue 25, `task.type: multilabel`): `<split>_labels` is N×14 0/1, its columns INFO's 14
findings (`KNOWN["chestmnist"]`, or `source.medmnist_labels`); `task.labels` picks and orders the findings an image
is labelled with (its label: the positive ones joined by ";"). A `.npz` without a flag or `medmnist_labels` has
columns named by `task.labels` itself, in order. A value other than 0/1, or a picked finding with one value in
every row of the file, is an error naming the file, the split, the row and the column.
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
from medclf.sources.multilabel import constant_columns, constant_reason, join_findings
from medclf.sources.store import open_store, split_uri

log = logging.getLogger(__name__)
ZENODO = "https://zenodo.org/records/10519652/files/{flag}{suffix}.npz?download=1"
_ORGANS = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
"""Organ{A,C,S}MNIST's 11 organs, in label order."""
# flag -> (labels, {size: md5}): the 2D sets of medmnist.INFO (medmnist 3.0.2, `medmnist/info.py`), the labels
# exactly as INFO's `label` dict gives them, in label-index order, and the `MD5`, `MD5_64`, `MD5_128` and
# `MD5_224` of each file at ZENODO. A size without an MD5 here is never downloaded (`download` refuses it).
# The 3D sets are not listed (this source reads 2D images only).
# Task types (INFO `task`): binary pneumoniamnist, breastmnist; ordinal retinamnist (DR grade 0..4: set
# `task.type: ordinal`, `ingest.classes: ["0", "1", "2", "3", "4"]`); multi-label chestmnist (`MULTILABEL`: set
# `task.type: multilabel`, `task.labels`: some or all of its findings); multi-class the others.
KNOWN: dict[str, tuple[list[str], dict[int, str]]] = {
    "pathmnist": (
        [
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ],
        {
            28: "a8b06965200029087d5bd730944a56c1",
            64: "55aa9c1e0525abe5a6b9d8343a507616",
            128: "ac42d08fb904d92c244187169d1fd1d9",
            224: "2c51a510bcdc9cf8ddb2af93af1eadec",
        },
    ),
    "chestmnist": (
        [
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ],
        {
            28: "02c8a6516a18b556561a56cbdd36c4a8",
            64: "9de6cd0b934ebb5b7426cfba5efbae16",
            128: "db107e5590b27930b62dbaf558aebee3",
            224: "45bd33e6f06c3e8cdb481c74a89152aa",
        },
    ),
    "dermamnist": (
        [
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ],
        {
            28: "0744692d530f8e62ec473284d019b0c7",
            64: "b70a2f5635c6199aeaa28c31d7202e1f",
            128: "2defd784463fa5243564e855ed717de1",
            224: "8974907d8e169bef5f5b96bc506ae45d",
        },
    ),
    "octmnist": (
        ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
        {
            28: "c68d92d5b585d8d81f7112f81e2d0842",
            64: "e229e9440236b774d9f0dfef9d07bdaf",
            128: "0a97e76651ace45c5d943ee3f65b63ae",
            224: "abc493b6d529d5de7569faaef2773ba3",
        },
    ),
    "pneumoniamnist": (
        ["normal", "pneumonia"],
        {
            28: "28209eda62fecd6e6a2d98b1501bb15f",
            64: "8f4eceb4ccffa70c672198ea285246c6",
            128: "05b46931834c231683c68f40c47b2971",
            224: "d6a3c71de1b945ea11211b03746c1fe1",
        },
    ),
    "retinamnist": (
        ["0", "1", "2", "3", "4"],
        {
            28: "bd4c0672f1bba3e3a89f0e4e876791e4",
            64: "afda852cc34dcda56f86ad2b2457dbcc",
            128: "e48e916a24454daf90583d4e6efb1a18",
            224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
        },
    ),
    "breastmnist": (
        ["malignant", "normal, benign"],
        {
            28: "750601b1f35ba3300ea97c75c52ff8f6",
            64: "742edef2a1fd1524b2efff4bd7ba9364",
            128: "363e4b3f8d712e9b5de15470a2aaadf1",
            224: "b56378a6eefa9fed602bb16d192d4c8b",
        },
    ),
    "bloodmnist": (
        [
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
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
    "tissuemnist": (
        [
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ],
        {
            28: "ebe78ee8b05294063de985d821c1c34b",
            64: "123ece2eba09d0aa5d698fda57103344",
            128: "61b955355d7425a89687b06cca3ce0c2",
            224: "b077128c4a949f0a4eb01517f9037b9c",
        },
    ),
    "organamnist": (
        _ORGANS,
        {
            28: "68e3f8846a6bd62f0c9bf841c0d9eacc",
            64: "2dcccc29b88e6da5a01161ef20cda288",
            128: "eeae80d0a227a8d099027e1b3cfd3b60",
            224: "50747347e05c87dd3aaf92c49f9f3170",
        },
    ),
    "organcmnist": (
        _ORGANS,
        {
            28: "b9ceb9546e10131b32923c5bbeaea2b1",
            64: "3ce34a8724ea6f548e6db4744d03b6a9",
            128: "773c1f009daa3fe5d9a2a201b2a7ed94",
            224: "050f5e875dc056f6768abf94ec9995d1",
        },
    ),
    "organsmnist": (
        _ORGANS,
        {
            28: "9ab87b696fb54e2a387ebe992d6ed5f1",
            64: "53a6d115339d874c25e309a994ff46d3",
            128: "ded0c5fa01a95dc4978b956f613e9b8e",
            224: "b354719e553fbbb2513d5533f52a4cb1",
        },
    ),
}
MULTILABEL = frozenset({"chestmnist"})
"""The flags of KNOWN whose labels are N×L 0/1 findings (INFO `task`: "multi-label, binary-class")."""


def _same(a: np.ndarray) -> np.ndarray:
    """The record's already-decoded pixels (bound with functools.partial, as the folder source binds reads)."""
    return a


def download(flag: str, size: int, cache_dir: Path, url_template: str = ZENODO) -> Path:
    """Fetch the official file once into `cache_dir` and verify its MD5."""
    if flag not in KNOWN:
        raise SourceError(f"unknown MedMNIST flag {flag!r}; known: {sorted(KNOWN)} (or set source.uri to a .npz)")
    expected = KNOWN[flag][1].get(size)
    if not expected:  # never fetch a file that cannot be checked
        raise SourceError(
            f"MedMNIST {flag} ({size}px): no MD5 recorded in medclf.sources.medmnist.KNOWN, so it is not downloaded "
            f"unchecked; download the file yourself and set ingest.source.uri to its local path"
        )
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
        raise SourceError(
            f"{name}: {key} has shape {y.shape}; a single-label task reads (N,) or (N,1) labels (N×L 0/1 findings "
            "are a multi-label set: task.type: multilabel with task.labels)"
        )
    return y.astype(np.int64)


def _load(source: Source) -> tuple[str, np.lib.npyio.NpzFile]:
    """The `.npz` of `source` (its uri, else the flag's verified download) and the name its errors use."""
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
    return name, npz


def _splits(npz: np.lib.npyio.NpzFile, name: str) -> list[str]:
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in npz.files]
    if not splits:
        raise SourceError(f"{name}: no '<split>_images' arrays (found {npz.files})")
    for split in splits:
        if f"{split}_labels" not in npz.files:
            raise SourceError(f"{name}: {split}_images has no matching {split}_labels")
    return splits


def scan_medmnist(source: Source, classes: list[str] | None, findings: list[str] | None = None) -> SourceScan:
    """List the `.npz` of `source`: one record per image, labelled by class name (or by its findings, with
    `findings`: a multilabel task's `task.labels`, see the module docstring)."""
    flag = source.medmnist_flag or ""
    if findings is None and flag in MULTILABEL:
        raise SourceError(
            f"MedMNIST {flag} is multi-label ({len(KNOWN[flag][0])} findings per image, 0/1 each): set task.type: "
            f"multilabel and task.labels to the findings to learn, some or all of {KNOWN[flag][0]}",
            transient=False,
        )
    if findings is not None and flag in KNOWN and flag not in MULTILABEL:
        raise SourceError(
            f"MedMNIST {flag} is single-label (one class per image), but the task is multilabel (task.labels "
            f"{findings}); the multi-label flags are {sorted(MULTILABEL)}",
            transient=False,
        )
    name, npz = _load(source)
    splits = _splits(npz, name)
    if findings is not None:
        return _scan_findings(source, name, npz, splits, findings)
    names = source.medmnist_labels or classes or (KNOWN.get(source.medmnist_flag or "", (None,))[0])
    scan = SourceScan(records=[], class_names=list(names) if names else None)
    for split in splits:
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


def _scan_findings(
    source: Source, name: str, npz: np.lib.npyio.NpzFile, splits: list[str], findings: list[str]
) -> SourceScan:
    """Multi-label: records labelled by the positive `findings` of their N×L 0/1 row."""
    columns = source.medmnist_labels or (KNOWN[source.medmnist_flag][0] if source.medmnist_flag in KNOWN else None)
    columns = list(columns) if columns else list(findings)  # unnamed columns: task.labels, in order
    missing = [f for f in findings if f not in columns]
    if missing:
        raise SourceError(
            f"{name}: task.labels {missing} are not among the file's findings {columns}"
            + ("" if source.medmnist_labels else f" (MedMNIST {source.medmnist_flag}'s names)"),
            transient=False,
        )
    pick = [columns.index(f) for f in findings]
    scan = SourceScan(records=[], class_names=list(findings))
    picked: list[np.ndarray] = []
    for split in splits:
        key = f"{split}_labels"
        x, y = npz[f"{split}_images"], np.asarray(npz[key])
        if y.ndim != 2 or y.shape[1] != len(columns):
            raise SourceError(
                f"{name}: {key} has shape {y.shape}; a multi-label set has one 0/1 column per finding "
                f"(N, {len(columns)}): {columns}",
                transient=False,
            )
        if len(x) != len(y):
            raise SourceError(f"{name}: {split}_images has {len(x)} rows but {key} has {len(y)}")
        wrong = np.argwhere((y != 0) & (y != 1))
        if len(wrong):
            row, col = (int(v) for v in wrong[0])
            raise SourceError(
                f"{name}: {key} row {row} column {col} ({columns[col]!r}) is {y[row, col].item()!r}, not 0 or 1 "
                f"({len(wrong)} such cells in {key})",
                transient=False,
            )
        y = y[:, pick].astype(np.uint8)
        picked.append(y)
        for i in range(len(x)):
            scan.records.append(
                Record(
                    uri=f"{name}#{split}/{i}",
                    label=join_findings(y[i], findings),
                    fetch=functools.partial(_same, x[i]),
                    kind="array",
                    split=split,
                )
            )
    every = np.concatenate(picked)
    rows = f"all {len(every)} rows of {', '.join(f'{s}_labels' for s in splits)}"
    problems = [f"finding {findings[j]!r} {constant_reason(v, rows)}" for j, v in constant_columns(every)]
    if problems:
        raise SourceError(f"{name}: " + "; ".join(problems), transient=False)
    return scan
