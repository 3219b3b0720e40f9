"""CSV or Parquet manifests: `path,label[,patient_id][,split]`, paths relative to the manifest.

The label and group columns are configurable (`source.label_column`, `source.group_column`): HAM10000's
`metadata.csv` is `label_column: dx`, `group_column: lesion_id` (a lesion's images stay in one split), a
diabetic-retinopathy table `label_column: dr_grade`. A configured column missing from the header is an error
naming the file, its header line and the column; only the default group column (`patient_id`) may be absent.
Integer cells (grades `0`..`4`, also from a Parquet float column such as `2.0`) become the labels `"0"`..`"4"`.

For DICOM manifests (`kind="dicom"`) a row without a `patient_id` (no column, or a blank cell)
takes the file's own PatientID tag, read from the header only (pixel data is not parsed), so that
the patient split groups a patient's images. The raw id stays in `Record.patient_id`; ingest
hashes it before anything is written or logged. A manifest `patient_id` always wins.

A row is named by its line, `labels.csv line 5`: the line number an editor shows, 1-based, the header being
line 1 (so the first data row is line 2; a cell with a quoted newline, or a blank line, shifts the lines
after it). Paths are relative to the manifest; `sub/../img.png` is `img.png`. A row whose path is absolute
or escapes the manifest's folder is quarantined with its line (never read), and the other rows ingest.
Labels are resolved after listing (`base.resolve_labels`).

Multi-label tasks (issue 25, `findings` = `task.labels`): each finding is a 0/1 column of that name (ODIR's
`labels.csv`: `normal, diabetic_retinopathy, ..., other`; `source.label_column` is not read) and a record's label is
its positive findings joined by ";" in `task.labels` order ("" for none: an all-zero row is legal). A listed
column missing from the header is an error naming the file, its header line and the manifest's columns; a cell
other than 0/1 (blank included) quarantines its row, naming the line, the column and the value; a column with one
value in every row (all 0 or all 1) is an error naming the file and the column.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import numbers
import re
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from medclf.evaluation.subgroups import check_subgroups
from medclf.imaging.privacy import redact
from medclf.sources.base import SPLIT_ALIASES, Kind, Record, SourceError, SourceScan, refused, safe_relpath
from medclf.sources.multilabel import constant_columns, constant_reason, join_findings
from medclf.sources.store import Store, open_store, split_uri

REQUIRED = ("path", "label")
"""The columns of a manifest with the default `source.label_column` (`label`)."""
DEFAULT_GROUP = "patient_id"
"""The default `source.group_column`: optional (no column, or a blank cell: no patient for that row)."""
_HEADER_THREADS = 8
_INTEGRAL = re.compile(r"[+-]?\d+\.0*")


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


def _cell(cell: object) -> str | None:
    """A label or group id as text: None when blank or missing; an integral number (`2`, Parquet's `2.0`, a CSV
    cell `2.0` written by a float column) as its integer, `"2"`, so grades read alike from CSV and Parquet."""
    if cell is None or cell is pd.NA or (isinstance(cell, float) and math.isnan(cell)):
        return None
    if isinstance(cell, bool):
        return str(cell)
    if isinstance(cell, numbers.Integral):
        return str(int(cell))
    if isinstance(cell, numbers.Real) and float(cell).is_integer():
        return str(int(float(cell)))
    text = str(cell).strip()
    if _INTEGRAL.fullmatch(text) and "." in text:
        return str(int(float(text)))
    return text or None


def _finding_values(row: Mapping[Hashable, object], findings: list[str]) -> tuple[list[int], list[str]]:
    """Multi-label: a row's 0/1 value per finding, and what is wrong with its cells (column and value each)."""
    values, bad = [], []
    for col in findings:
        cell = row.get(col)
        if isinstance(cell, (bool, np.bool_)):  # a Parquet bool column
            cell = int(cell)
        text = _cell(cell)
        if text in ("0", "1"):
            values.append(int(text))
            continue
        values.append(0)
        bad.append(f"label column {col!r} is {'blank' if text is None else repr(text)}, not 0 or 1")
    return values, bad


def _missing_columns(df: pd.DataFrame, uri: str, wanted: dict[str, str]) -> str | None:
    """The error for the first `{column: its setting}` missing from the header, or None."""
    for col, setting in wanted.items():
        if col not in df.columns:
            return (
                f"{uri}: no column {col!r}{f' ({setting})' if setting else ''} in the header (line 1); "
                f"columns: {', '.join(map(str, df.columns))}"
            )
    return None


def scan_manifest(
    uri: str | None,
    endpoint_url: str | None,
    kind: Kind,
    subgroups: list[str] | None = None,
    label_column: str = "label",
    group_column: str = DEFAULT_GROUP,
    findings: list[str] | None = None,
) -> SourceScan:
    """List the manifest at `uri`: each row's `label_column` is its label, its `group_column` its patient (or
    lesion) for the grouped split. With `findings` (a multilabel task's `task.labels`) the label is read from those
    0/1 columns instead (the module docstring)."""
    if not uri:
        raise SourceError("manifest source needs a manifest path")
    root, name = split_uri(uri)
    store = open_store(root, endpoint_url)
    try:
        data = store.read(name)
    except (FileNotFoundError, IsADirectoryError):
        raise SourceError(f"{uri}: manifest not found") from None
    df = read_table(data, uri)
    if findings is not None and label_column != "label":
        raise SourceError(
            f"{uri}: source.label_column {label_column!r} names a single label column, but this multilabel task "
            f"reads its findings from the 0/1 columns task.labels {findings}: remove source.label_column",
            transient=False,
        )
    wanted = {"path": ""} | (
        {c: "task.labels" for c in findings} if findings is not None else {label_column: "source.label_column"}
    )
    if group_column != DEFAULT_GROUP:  # a configured group column must be there: without it the split would leak
        wanted[group_column] = "source.group_column"
    problem = _missing_columns(df, uri, wanted)
    if problem:
        raise SourceError(problem)
    if df.empty:
        raise SourceError(f"{uri}: manifest has no rows")
    reserved = {group_column: "group (source.group_column)"} | (
        {c: "finding (task.labels)" for c in findings}
        if findings is not None
        else {label_column: "label (source.label_column)"}
    )
    problem = check_subgroups(df, subgroups or [], uri, reserved)
    if problem:
        raise SourceError(problem)
    scan = SourceScan(records=[])
    rels: list[str] = []  # the path of each record, in order
    vectors: list[list[int]] = []  # multi-label: the 0/1 row of every row whose cells are all 0 or 1
    for i, row in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        where = f"{uri} line {i}"  # the line an editor shows: 1-based, the header is line 1
        raw = str(row["path"]).strip()
        bad: list[str] = []
        if findings is not None:
            vector, bad = _finding_values(row, findings)
            label = None if bad else join_findings(vector, findings)
            if not bad:
                vectors.append(vector)
        else:
            label = _cell(row.get(label_column))
        pid = _cell(row.get(group_column))
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
            scan.quarantine.append((redact(store.uri(rel), pid), f"unknown split {split_raw!r} at {where}"))
            continue
        # a row refused here is listed in quarantine.csv by its path with the patient id pseudonymised (as decode does)
        if bad:  # multi-label: a cell other than 0/1, named with its column and value
            scan.quarantine.append((redact(store.uri(rel), pid), f"{'; '.join(bad)} at {where}"))
            continue
        if label is None:
            scan.quarantine.append((redact(store.uri(rel), pid), f"missing label at {where}"))
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
    if findings is not None:
        _refuse_constant(uri, findings, vectors, len(df))
    if kind == "dicom":
        _fill_dicom_patients(scan, store, rels)
    return scan


def _refuse_constant(uri: str, findings: list[str], vectors: list[list[int]], rows: int) -> None:
    """Multi-label: a SourceError naming every finding column with one value in every row (of those whose finding
    cells are all 0/1: the others are quarantined)."""
    matrix = np.array(vectors, dtype=np.uint8).reshape(len(vectors), len(findings))
    lines = f"lines 2-{rows + 1}"
    which = (
        f"all {rows} rows ({lines})"
        if len(vectors) == rows
        else f"all {len(vectors)} rows with 0/1 cells (of {rows}, {lines}; the others are quarantined)"
    )
    problems = [
        f"label column {findings[j]!r} (task.labels) {constant_reason(v, which)}" for j, v in constant_columns(matrix)
    ]
    if problems:
        raise SourceError(f"{uri}: " + "; ".join(problems), transient=False)


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
