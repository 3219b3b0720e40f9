"""The contract between sources and ingest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

import numpy as np

Payload = bytes | np.ndarray
Kind = Literal["image", "dicom", "array"]


class SourceError(ValueError):
    """A source that cannot be read at all (missing, empty, unsafe, unreachable).

    `transient`: True when a later attempt may succeed (a failed download), False when it cannot, None
    when the cause decides (an S3 error chained with `from`: throttling or 5xx is; medclf.cli.is_transient).
    """

    def __init__(self, *args: object, transient: bool | None = None) -> None:
        super().__init__(*args)
        if transient is not None:
            self.transient = transient


class SourceChanged(RuntimeError):
    """An object changed between listing and reading (its ETag no longer matches the listing).

    Not a SourceError: ingest quarantines an unreadable file, but a change means the listing is no
    longer the dataset, so the whole run fails (and a retry lists again) rather than mixing versions.
    """

    transient = True  # a new attempt lists the source again (medclf.cli.is_transient)


@dataclass(frozen=True)
class Record:
    """One image as the source knows it, before decoding.

    `uri` is where it came from, `fetch` returns its bytes (image/dicom) or a
    decoded array (array). `patient_id` is the raw id and is hashed by ingest
    before anything is written or logged.
    """

    uri: str
    label: str | None
    fetch: Callable[[], Payload]
    kind: Kind = "image"
    patient_id: str | None = None
    split: str | None = None
    where: str | None = None
    """Where the record was listed, for error messages: e.g. `labels.csv line 5` (manifest sources)."""
    subgroups: dict[str, str | None] = field(default_factory=dict)
    """Category of each `ingest.subgroups` column (manifest sources): `sex` -> `F`; None for a blank cell."""


@dataclass
class SourceScan:
    records: list[Record]
    quarantine: list[tuple[str, str]] = field(default_factory=list)
    """(uri, reason) for things rejected while listing, e.g. an empty class folder."""
    class_names: list[str] | None = None


SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


def safe_relpath(rel: str, where: str) -> str:
    """Reject paths that escape their root: absolute paths, `..`, drive letters, NUL."""
    if not rel or "\x00" in rel:
        raise SourceError(f"{where}: empty or invalid path {rel!r}")
    norm = rel.replace("\\", "/")
    p = PurePosixPath(norm)
    if p.is_absolute() or norm.startswith("~") or (len(norm) > 1 and norm[1] == ":"):
        raise SourceError(f"{where}: path {rel!r} is absolute; paths must be relative to their root")
    if any(part == ".." for part in p.parts):
        raise SourceError(f"{where}: path {rel!r} escapes its root with '..'")
    return str(p)
