"""Image folders: `root/<class>/*` or `root/<split>/<class>/*` (train/val/test)."""

from __future__ import annotations

import functools
import re

from medclf.sources.base import (
    SPLIT_ALIASES,
    Record,
    SourceError,
    SourceScan,
    escaped,
    not_utf8,
    refused,
    safe_relpath,
)
from medclf.sources.store import Store

# File-name patient ids of the Kermany et al. pediatric chest X-ray release:
# person<ID>_bacteria_<n>.jpeg, person<ID>_virus_<n>.jpeg, IM-<ID>-<n>.jpeg, NORMAL2-IM-<ID>-<n>.jpeg.
KERMANY_PATIENT_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"


def patient_from_name(name: str, regex: re.Pattern[str] | None) -> str | None:
    if regex is None:
        return None
    m = regex.search(name)
    if not m:
        return None
    return m.group(1) if m.groups() else m.group(0)


def _name_problem(rel: str, root: str) -> str | None:
    """Why a listed file cannot be read under the name it was listed with, or None.

    A name that is not valid UTF-8 (Linux names are bytes; it could not be written to the reports or the
    manifest), or a key that is not a plain relative path (an S3 key with `..`, `.`, `//` or a backslash:
    normalising it would read another object)."""
    if not_utf8(rel):
        return f"file name '{escaped(rel)}' is not valid UTF-8; rename it (e.g. convmv) to ingest it"
    try:
        plain = safe_relpath(rel, root)
    except SourceError as err:
        return str(err)
    if plain != rel:
        return f"{root}: name {rel!r} is not a plain relative path (it reads as {plain!r}); not read"
    return None


def _class_records(
    store: Store,
    split: str | None,
    regex: re.Pattern[str] | None,
    scan: SourceScan,
    label_regex: re.Pattern[str] | None = None,
) -> None:
    for cls in store.dirs():
        if cls in (".", "..") or "/" in cls or "\\" in cls:  # only an S3 prefix can list such a "folder"
            reason = (
                f"class folder name {escaped(cls)!r} is not a plain folder name ('.', '..' or a backslash); "
                "its files are not read"
            )
            scan.quarantine.append((escaped(store.uri(cls)) + "/", reason))
            continue
        sub = store.sub(cls)
        files = [f for f in sub.list() if not f.rsplit("/", 1)[-1].startswith(".")]
        if not files:
            scan.quarantine.append((escaped(sub.root_uri) + "/", f"empty class folder '{escaped(cls)}'"))
            continue
        bad_cls = not_utf8(cls)
        for rel in files:
            name = escaped(rel.rsplit("/", 1)[-1])
            pid = patient_from_name(name, regex)
            problem = (
                f"class folder name '{escaped(cls)}' is not valid UTF-8; rename it to ingest its files"
                if bad_cls
                else _name_problem(rel, sub.root_uri)
            )
            if problem:  # listed (so it counts and is reported, redacted), never read
                scan.records.append(
                    refused(
                        escaped(sub.uri(rel)),
                        None if bad_cls else cls,
                        problem,
                        kind="image",
                        patient_id=pid,
                        split=split,
                    )
                )
                continue
            scan.records.append(
                Record(
                    uri=sub.uri(rel),
                    label=patient_from_name(name, label_regex) or cls,
                    fetch=functools.partial(sub.read, rel, sub.version(rel)),
                    kind="image",
                    patient_id=pid,
                    split=split,
                )
            )


def scan_folder(store: Store, patient_id_regex: str | None = None, label_regex: str | None = None) -> SourceScan:
    """`label_regex`: where it matches a file name, its group 1 is the label instead of the folder's name."""
    regex = re.compile(patient_id_regex) if patient_id_regex else None
    labels = re.compile(label_regex) if label_regex else None
    top = store.dirs()
    if not top:
        raise SourceError(f"{store.root_uri}: no class sub-folders found (expected <class>/ or train/<class>/)")
    scan = SourceScan(records=[])
    split_dirs = [d for d in top if d.lower() in SPLIT_ALIASES]
    if split_dirs:
        for d in split_dirs:
            _class_records(store.sub(d), SPLIT_ALIASES[d.lower()], regex, scan, labels)
    else:
        _class_records(store, None, regex, scan, labels)
    if not scan.records:
        raise SourceError(f"{store.root_uri}: every class folder is empty")
    return scan
