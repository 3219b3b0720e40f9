"""Multi-label sources (issue 25): an image carries any number of the findings `task.labels`.

A multi-label record's `Record.label` is its positive findings joined by `SEP` in `task.labels` order, `""` when it
has none (an all-zero row, e.g. a normal image, is legal). Ingest turns those strings back into the N×L uint8 0/1
matrix it writes as `<split>_labels.npy` (`findings_matrix`).

Sources that can say several findings per image: a manifest (CSV/Parquet, `kind: manifest` or `dicom`) with one 0/1
column per finding, named as in `task.labels` (ODIR's `labels.csv`: `normal, diabetic_retinopathy, ...`), and a
MedMNIST `.npz` whose labels are N×L 0/1 (`medmnist_flag: chestmnist`, 14 findings). A class folder or the
synthetic phantoms give one label per image and are refused (`medclf.sources.scan_multilabel`). Which errors are
per row and which stop the run follows each source's single-label rules (`manifest.py`, `medmnist.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medclf.sources.base import SourceError

SEP = ";"
"""Joins a multi-label record's positive findings (`Record.label`, ingest's manifest `label` column)."""


def check_findings(findings: Sequence[str]) -> None:
    """`task.labels` usable as column names and joinable with `SEP` (the config checks count and duplicates)."""
    for name in findings:
        if not name.strip() or name != name.strip() or SEP in name:
            raise SourceError(
                f"task.labels: {name!r} cannot name a finding (blank, padded with spaces, or containing {SEP!r}, "
                "which joins the findings of an image)",
                transient=False,
            )


def join_findings(vector: Sequence[int] | np.ndarray, findings: Sequence[str]) -> str:
    """The `Record.label` of a 0/1 row: its positive findings joined by `SEP`, in `findings` order."""
    return SEP.join(f for f, v in zip(findings, vector, strict=True) if v)


def split_findings(label: str | None) -> list[str]:
    """The finding names of a `Record.label` (`""` and None: none)."""
    return [t for t in (label or "").split(SEP) if t]


def unknown_findings(label: str | None, findings: Sequence[str]) -> list[str]:
    """The names in `label` that are not findings (sorted), e.g. from a source that listed another set."""
    return sorted(set(split_findings(label)) - set(findings))


def findings_matrix(labels: Sequence[str | None], findings: Sequence[str]) -> np.ndarray:
    """The N×L uint8 0/1 matrix of `labels` (columns in `findings` order); unknown names are a ValueError."""
    index = {f: j for j, f in enumerate(findings)}
    out = np.zeros((len(labels), len(findings)), dtype=np.uint8)
    for i, label in enumerate(labels):
        for name in split_findings(label):
            if name not in index:
                raise ValueError(f"{name!r} is not one of the findings {list(findings)}")
            out[i, index[name]] = 1
    return out


def constant_columns(matrix: np.ndarray) -> list[tuple[int, int]]:
    """(column, its value) of each column of a 0/1 matrix with one value in every row (none when it has no rows)."""
    if not len(matrix):
        return []
    lo, hi = matrix.min(axis=0), matrix.max(axis=0)
    return [(j, int(lo[j])) for j in range(matrix.shape[1]) if lo[j] == hi[j]]


def constant_reason(value: int, rows: str) -> str:
    """Why a finding that never varies is refused, `rows` saying which rows (the caller names file and column)."""
    what = "no image carries it" if value == 0 else "every image carries it"
    return (
        f"is {value} in {rows} ({what}): a finding that never varies can be neither learnt nor evaluated; "
        "drop it from task.labels or fix the labels"
    )
