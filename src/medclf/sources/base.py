"""The contract between sources and ingest."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

import numpy as np

from medclf.config import label_key

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
    """Where the record was listed, for error messages: e.g. `labels.csv line 5` (manifest sources: the CSV line
    an editor shows, 1-based, the header being line 1; for Parquet, the row number + 1 likewise)."""
    subgroups: dict[str, str | None] = field(default_factory=dict)
    """Category of each `ingest.subgroups` column (manifest sources): `sex` -> `F`; None for a blank cell."""


@dataclass
class SourceScan:
    records: list[Record]
    quarantine: list[tuple[str, str]] = field(default_factory=list)
    """(uri, reason) for things rejected while listing, e.g. an empty class folder."""
    class_names: list[str] | None = None


SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def safe_relpath(rel: str, where: str) -> str:
    """`rel` as a normalised relative path (`a/./b/../c` -> `a/c`), or a SourceError for a path that escapes its
    root (absolute, a drive letter, `~`, more `..` than folders above it) or is empty or holds a NUL.

    `..` is resolved lexically, so `sub/../img.png` is `img.png` and stays inside the root; a store that reads
    the file still checks where it really is (symlinks: `LocalStore.read`). The error is deterministic
    (`transient=False`: the same path is refused again, exit 3)."""
    if not rel or "\x00" in rel:
        raise SourceError(f"{where}: empty or invalid path {rel!r}", transient=False)
    norm = rel.replace("\\", "/")
    p = PurePosixPath(norm)
    if p.is_absolute() or norm.startswith("~") or (len(norm) > 1 and norm[1] == ":"):
        raise SourceError(f"{where}: path {rel!r} is absolute; paths must be relative to their root", transient=False)
    parts: list[str] = []
    for part in p.parts:  # PurePosixPath already dropped `.` and empty parts
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            raise SourceError(f"{where}: path {rel!r} escapes its root with '..'", transient=False)
    if not parts:
        raise SourceError(f"{where}: path {rel!r} names the root itself, not a file", transient=False)
    return "/".join(parts)


def escaped(name: str) -> str:
    """`name` printable and encodable: a file name that is not valid UTF-8 (Python keeps its bytes as lone
    surrogates, `os.fsdecode`) gets those bytes backslash-escaped, `caf\\xe9.jpeg`; any other name is itself."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def not_utf8(name: str) -> bool:
    """True for a name with bytes that are not valid UTF-8 (it cannot be written to a report or a manifest)."""
    return escaped(name) != name


def refuse(reason: str) -> bytes:
    """The `fetch` of a record listed but never read (an unsafe or undecodable name): ingest quarantines it
    with `reason`, redacted and with where it was listed, like any file it cannot read."""
    raise SourceError(reason, transient=False)


def refused(uri: str, label: str | None, reason: str, **fields: Any) -> Record:
    """A record whose file is not read: quarantined by ingest as "cannot read: <reason>"."""
    return Record(uri=uri, label=label, fetch=functools.partial(refuse, reason), **fields)


def _listed_at(rec: Record) -> str:
    """Where a record was listed: its manifest line, else its folder (a file name may hold a patient id)."""
    return rec.where or rec.uri.rsplit("/", 1)[0] + "/"


def resolve_labels(scan: SourceScan, classes: list[str] | None, aliases: dict[str, str] | None = None) -> SourceScan:
    """Give every record its canonical label (issue 22, row 2). Applies to every source's labels (manifest
    cells, class-folder names, MedMNIST names).

    1. the label is trimmed;
    2. one matching a key of `ingest.label_aliases` (compared by `label_key`) takes the alias's class;
    3. with known classes (`ingest.classes`, else the source's own `class_names`), a label that matches a class
       by `label_key` takes that class's spelling; one that matches none is left as it is (ingest quarantines it
       as an unknown label, naming where it was listed);
    4. with no known classes, labels that still differ only in case or whitespace would become separate
       classes (a `Pneumonia` class beside `PNEUMONIA`): a SourceError naming every spelling, its count and
       where it was first seen, and the alias that resolves it. Nothing is guessed.
    """
    by_alias = {label_key(k): v.strip() for k, v in (aliases or {}).items()}
    known = classes or scan.class_names
    by_class = {label_key(c): c for c in known or []}
    for i, rec in enumerate(scan.records):
        if rec.label is None:
            continue
        label = rec.label.strip()
        label = by_alias.get(label_key(label), label)
        label = by_class.get(label_key(label), label)
        if label != rec.label:
            scan.records[i] = dataclasses.replace(rec, label=label)
    if known:
        return scan
    seen: dict[str, dict[str, list[Record]]] = {}
    for rec in scan.records:
        if rec.label:
            seen.setdefault(label_key(rec.label), {}).setdefault(rec.label, []).append(rec)
    clashes = [spellings for spellings in seen.values() if len(spellings) > 1]
    if clashes:
        lines, fixes = [], []
        for spellings in clashes:
            ranked = sorted(spellings.items(), key=lambda kv: (-len(kv[1]), kv[0]))  # most frequent first
            lines.append(", ".join(f"{s!r} ({len(recs)} images, first at {_listed_at(recs[0])})" for s, recs in ranked))
            fixes.append(f"{label_key(ranked[0][0])!r}: {ranked[0][0]!r}")
        raise SourceError(
            "labels that differ only in case or whitespace would become separate classes: "
            + "; ".join(lines)
            + f". Map them to one class with ingest.label_aliases (e.g. {{{', '.join(fixes)}}}), or list "
            "ingest.classes (labels then match a class case-insensitively)",
            transient=False,
        )
    return scan
