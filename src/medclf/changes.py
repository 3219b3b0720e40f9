"""What changed in the raw data between two ingests: added, removed, changed and relabelled images.

Pure functions over two ingest manifests (one row per source image: `source_uri`, `sha256`,
`label`). DVC decides *whether* ingest is stale; this says *what* changed, in words a reviewer
reads ("+11 images, 1 relabelled"). Identity is the image's source URI; a file that disappears
under one URI and reappears with the same bytes under another is a move, and a move between
class folders is a relabel, not one removal plus one addition.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

MAX_EXAMPLES = 5


def _index(manifest: pd.DataFrame) -> dict[str, tuple[str | None, str | None]]:
    """source_uri -> (sha256, label); URIs are already redacted by ingest (no patient ids)."""
    def text(v: object) -> str | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)

    return {str(u): (text(s), text(lab))
            for u, s, lab in zip(manifest["source_uri"], manifest["sha256"], manifest["label"], strict=True)}


def diff_manifests(old: pd.DataFrame | None, new: pd.DataFrame) -> dict[str, Any]:
    """Counts (and a few example URIs) of what differs from `old` to `new`.

    Keys: `added`, `removed`, `changed` (same URI, other bytes), `relabelled` (same bytes, other
    label: a move between class folders or an edited manifest row), `moved` (same bytes and label,
    other URI), `unchanged`, and `examples` per kind. `old=None` (first ingest) gives `first: True`.
    """
    if old is None:
        return {"first": True, "added": len(new), "removed": 0, "changed": 0, "relabelled": 0, "moved": 0,
                "unchanged": 0, "examples": {}}
    before, after = _index(old), _index(new)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
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
    return {"first": False, **{k: len(v) for k, v in kinds.items()}, "unchanged": unchanged,
            "examples": {k: v[:MAX_EXAMPLES] for k, v in kinds.items() if v}}


def describe(changes: dict[str, Any] | None) -> str:
    """One phrase: "+11 images, -2, 1 changed, 1 relabelled" ("" when nothing changed or unknown)."""
    if not changes:
        return ""
    if changes.get("first"):
        return f"first ingest: {changes.get('added', 0)} images"
    parts = []
    if changes.get("added"):
        parts.append(f"+{changes['added']} image{'s' if changes['added'] != 1 else ''}")
    if changes.get("removed"):
        parts.append(f"-{changes['removed']} removed")
    for kind in ("changed", "relabelled", "moved"):
        if changes.get(kind):
            parts.append(f"{changes[kind]} {kind}")
    return ", ".join(parts) or "no image changed"
