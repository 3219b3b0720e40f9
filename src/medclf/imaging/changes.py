"""What changed in the raw data between two ingests: added, removed, changed and relabelled images.

Pure functions over two ingest manifests (one row per source image: `source_uri`, `sha256`,
`label`). DVC decides *whether* ingest is stale; this says *what* changed, in words a reviewer
reads ("+11 images, 1 relabelled"). Identity is the image's source URI; a file that disappears
under one URI and reappears with the same bytes under another is a move, and a move between
class folders is a relabel, not one removal plus one addition. Inputs that ingest quarantined (manifest
`status` `quarantined`) are not part of the dataset: they are counted as `quarantined`, never as added.

Also here: the fingerprint of a local source (`snapshot`: every file under it with its size, times and
inode), which ingest takes before it reads the source and compares after (`snapshot_differences`), so that
the dataset, its reports and DVC's hash of the source describe the same files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

MAX_EXAMPLES = 5


def _quarantined(manifest: pd.DataFrame) -> pd.Series:
    """Rows ingest quarantined (older manifests without a `status` column: none)."""
    if "status" not in manifest.columns:
        return pd.Series(False, index=manifest.index)
    return manifest["status"].astype(str) == "quarantined"


def _index(manifest: pd.DataFrame) -> dict[str, tuple[str | None, str | None]]:
    """source_uri -> (sha256, label) of the dataset's images (quarantined rows left out); URIs are already
    redacted by ingest (no patient ids)."""

    def text(v: object) -> str | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)

    usable = manifest[~_quarantined(manifest)]
    return {
        str(u): (text(s), text(lab))
        for u, s, lab in zip(usable["source_uri"], usable["sha256"], usable["label"], strict=True)
    }


def diff_manifests(old: pd.DataFrame | None, new: pd.DataFrame) -> dict[str, Any]:
    """Counts (and a few example URIs) of what differs from `old` to `new`.

    Keys: `added`, `removed`, `changed` (same URI, other bytes), `relabelled` (same bytes, other
    label: a move between class folders or an edited manifest row), `moved` (same bytes and label,
    other URI), `unchanged` (all of the dataset's images, quarantined rows left out), `quarantined` (inputs
    `new` quarantined: an image of `old` that is quarantined now is counted here, not as removed), and
    `examples` per kind. `old=None` (first ingest) gives `first: True`.
    """
    held = new[_quarantined(new)]
    quarantined = sorted(str(u) for u in held["source_uri"])
    if old is None:
        return {
            "first": True,
            "added": len(new) - len(held),
            "removed": 0,
            "changed": 0,
            "relabelled": 0,
            "moved": 0,
            "unchanged": 0,
            "quarantined": len(quarantined),
            "examples": {"quarantined": quarantined[:MAX_EXAMPLES]} if quarantined else {},
        }
    before, after = _index(old), _index(new)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after) - set(quarantined))
    common = sorted(set(after) & set(before))
    changed = [u for u in common if before[u][0] != after[u][0]]
    relabelled = [u for u in common if before[u][0] == after[u][0] and before[u][1] != after[u][1]]
    gone_by_sha: dict[str, list[str]] = {}
    for u in removed:
        if before[u][0]:
            gone_by_sha.setdefault(str(before[u][0]), []).append(u)
    moved: list[str] = []
    for u in list(added):
        sha = after[u][0]
        candidates = gone_by_sha.get(str(sha)) if sha else None
        if not candidates:
            continue
        src = candidates.pop(0)
        added.remove(u)
        removed.remove(src)
        (relabelled if before[src][1] != after[u][1] else moved).append(u)
    unchanged = len(common) - len(changed) - sum(1 for u in relabelled if u in before)
    kinds = {"added": added, "removed": removed, "changed": changed, "relabelled": relabelled, "moved": moved}
    examples = {k: v[:MAX_EXAMPLES] for k, v in {**kinds, "quarantined": quarantined}.items() if v}
    return {
        "first": False,
        **{k: len(v) for k, v in kinds.items()},
        "unchanged": unchanged,
        "quarantined": len(quarantined),
        "examples": examples,
    }


def describe(changes: dict[str, Any] | None) -> str:
    """One phrase: "+11 images, -2 removed, 1 changed, 1 relabelled, 3 quarantined" ("" when unknown)."""
    if not changes:
        return ""
    held = f", {changes['quarantined']} quarantined" if changes.get("quarantined") else ""
    if changes.get("first"):
        return f"first ingest: {changes.get('added', 0)} images{held}"
    parts = []
    if changes.get("added"):
        parts.append(f"+{changes['added']} image{'s' if changes['added'] != 1 else ''}")
    if changes.get("removed"):
        parts.append(f"-{changes['removed']} removed")
    for kind in ("changed", "relabelled", "moved"):
        if changes.get(kind):
            parts.append(f"{changes[kind]} {kind}")
    if not parts:
        return held.removeprefix(", ") or "no image changed"
    return ", ".join(parts) + held


# --------------------------------------------------------------------------- the source, as ingest read it

Stat = tuple[int, int, int, int]
"""(size, mtime_ns, ctime_ns, inode) of one file: a rewrite changes size or mtime; a rewrite that restores the
mtime (`touch -r`, `cp -p`) or a replacement by rename still changes ctime or the inode."""


def snapshot(root: str | Path, exclude: Iterable[str | Path] = ()) -> dict[str, Stat]:
    """Every file under `root` (a folder, walked without following links, hidden files included, as DVC
    hashes it; or one file), by '/'-separated relative path, with its `Stat`. A missing root gives {}.

    `exclude`: ingest's own outputs, should they lie under the source's folder; each is left out with its
    staging siblings (`.<name>.*`, `<name>.old`), which ingest creates while it reads.
    """
    root = Path(os.path.abspath(root))
    out: dict[str, Stat] = {}
    finals = [Path(os.path.abspath(p)) for p in exclude]

    def skipped(path: Path) -> bool:
        return any(
            path == f
            or path.is_relative_to(f)
            or (path.parent == f.parent and (path.name.startswith(f".{f.name}.") or path.name == f"{f.name}.old"))
            for f in finals
        )

    def add(rel: str, path: str) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:  # deleted while listing: it is missing from this snapshot
            return
        out[rel] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    if root.is_file():
        add(root.name, str(root))
        return out
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not skipped(Path(dirpath, d))]
        for f in files:
            full = Path(dirpath, f)
            if not skipped(full):
                add(full.relative_to(root).as_posix(), str(full))
    return out


def snapshot_differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[str]]:
    """`added`, `removed` and `changed` paths from `before` to `after` (only the kinds that occurred)."""
    diff = {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
    }
    return {k: v for k, v in diff.items() if v}
