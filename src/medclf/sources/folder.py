"""Image folders: `root/<class>/*` or `root/<split>/<class>/*` (train/val/test)."""

from __future__ import annotations

import functools
import re

from medclf.sources.base import SPLIT_ALIASES, Record, SourceError, SourceScan
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


def _class_records(store: Store, split: str | None, regex: re.Pattern[str] | None,
                   scan: SourceScan) -> None:
    for cls in store.dirs():
        sub = store.sub(cls)
        files = [f for f in sub.list() if not f.rsplit("/", 1)[-1].startswith(".")]
        if not files:
            scan.quarantine.append((sub.root_uri + "/", f"empty class folder '{cls}'"))
            continue
        for rel in files:
            name = rel.rsplit("/", 1)[-1]
            scan.records.append(Record(uri=sub.uri(rel), label=cls, fetch=functools.partial(sub.read, rel, sub.version(rel)),
                                       kind="image", patient_id=patient_from_name(name, regex), split=split))


def scan_folder(store: Store, patient_id_regex: str | None = None) -> SourceScan:
    regex = re.compile(patient_id_regex) if patient_id_regex else None
    top = store.dirs()
    if not top:
        raise SourceError(f"{store.root_uri}: no class sub-folders found (expected <class>/ or train/<class>/)")
    scan = SourceScan(records=[])
    split_dirs = [d for d in top if d.lower() in SPLIT_ALIASES]
    if split_dirs:
        for d in split_dirs:
            _class_records(store.sub(d), SPLIT_ALIASES[d.lower()], regex, scan)
    else:
        _class_records(store, None, regex, scan)
    if not scan.records:
        raise SourceError(f"{store.root_uri}: every class folder is empty")
    return scan
