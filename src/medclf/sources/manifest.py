"""CSV or Parquet manifests: `path,label[,patient_id][,split]`, paths relative to the manifest.

For DICOM manifests (`kind="dicom"`) a row without a `patient_id` (no column, or a blank cell)
takes the file's own PatientID tag, read from the header only (pixel data is not parsed), so that
the patient split groups a patient's images. The raw id stays in `Record.patient_id`; ingest
hashes it before anything is written or logged. A manifest `patient_id` always wins.

A row is named by its line, `labels.csv line 5`: the line number an editor shows, 1-based, the header being
line 1 (so the first data row is line 2; a cell with a quoted newline, or a blank line, shifts the lines
after it). Paths are relative to the manifest; `sub/../img.png` is `img.png`. A row whose path is absolute
or escapes the manifest's folder is quarantined with its line (never read), and the other rows ingest.
Labels are resolved after listing (`base.resolve_labels`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from medclf.evaluation.subgroups import check_subgroups
from medclf.sources.base import SPLIT_ALIASES, Kind, Record, SourceError, SourceScan, refused, safe_relpath
from medclf.sources.store import Store, open_store, split_uri

REQUIRED = ("path", "label")
_HEADER_THREADS = 8


def _dicom_patient(store: Store, rel: str) -> str | None:
    """PatientID of one DICOM file, or None (missing, unreadable, no tag: decode reports the file)."""
    from medclf.imaging.dicom import dicom_patient_id

    try:
        return dicom_patient_id(store.read(rel))
    except (SourceError, OSError):
        return None


def read_table(data: bytes, name: str) -> pd.DataFrame:
    try:
        if name.lower().endswith((".parquet", ".pq")):
            return pd.read_parquet(io.BytesIO(data))
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001 - pandas raises many types for a bad table
        raise SourceError(f"{name}: cannot read manifest: {err}") from None


def _category(cell: object) -> str | None:
    return None if cell is None or (isinstance(cell, float) and math.isnan(cell)) else (str(cell).strip() or None)


def scan_manifest(
    uri: str | None, endpoint_url: str | None, kind: Kind, subgroups: list[str] | None = None
) -> SourceScan:
    if not uri:
        raise SourceError("manifest source needs a manifest path")
    root, name = split_uri(uri)
    store = open_store(root, endpoint_url)
    try:
        data = store.read(name)
    except (FileNotFoundError, IsADirectoryError):
        raise SourceError(f"{uri}: manifest not found") from None
    df = read_table(data, uri)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SourceError(f"{uri}: manifest lacks column(s) {missing}; expected path,label[,patient_id][,split]")
    if df.empty:
        raise SourceError(f"{uri}: manifest has no rows")
    problem = check_subgroups(df, subgroups or [], uri)
    if problem:
        raise SourceError(problem)
    scan = SourceScan(records=[])
    rels: list[str] = []  # the path of each record, in order
    for i, row in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        where = f"{uri} line {i}"  # the line an editor shows: 1-based, the header is line 1
        raw = str(row["path"]).strip()
        label = str(row.get("label", "")).strip() or None
        pid = str(row.get("patient_id", "") or "").strip() or None
        try:
            rel = safe_relpath(raw, uri)  # `sub/../x.png` is `x.png`; a path out of the root is refused
        except SourceError as err:  # that row only: quarantined by ingest (never read), naming the line
            scan.records.append(
                refused(
                    store.uri(raw), label, str(err).removeprefix(f"{uri}: "), kind=kind, patient_id=pid, where=where
                )
            )
            rels.append(raw)
            continue
        split_raw = str(row.get("split", "") or "").strip().lower()
        split = SPLIT_ALIASES.get(split_raw) if split_raw else None
        if split_raw and split is None:
            scan.quarantine.append((store.uri(rel), f"unknown split {split_raw!r} at {where}"))
            continue
        if label is None:
            scan.quarantine.append((store.uri(rel), f"missing label at {where}"))
            continue
        scan.records.append(
            Record(
                uri=store.uri(rel),
                label=label,
                fetch=functools.partial(store.read, rel),
                kind=kind,
                patient_id=pid,
                split=split,
                where=where,
                subgroups={g: _category(row[g]) for g in subgroups or []},
            )
        )
        rels.append(rel)
    if kind == "dicom":
        _fill_dicom_patients(scan, store, rels)
    return scan


def _fill_dicom_patients(scan: SourceScan, store: Store, rels: list[str]) -> None:
    """Records without a manifest patient id take their DICOM PatientID (headers read on a few threads)."""
    todo = [i for i, r in enumerate(scan.records) if r.patient_id is None]
    if not todo:
        return
    with ThreadPoolExecutor(min(_HEADER_THREADS, len(todo))) as pool:
        found = list(pool.map(lambda i: _dicom_patient(store, rels[i]), todo))
    for i, pid in zip(todo, found, strict=True):
        if pid is not None:
            scan.records[i] = dataclasses.replace(scan.records[i], patient_id=pid)
