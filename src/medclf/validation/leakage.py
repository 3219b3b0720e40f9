"""Leakage evidence: exact duplicates (sha256), near-duplicates (perceptual hash), patient overlap,
and label conflicts (the same file under two labels).

Pairs are found here (numpy/pandas) and written onto the images table as
"partner" columns, so the GX suite can check them and Data Docs lists the rows;
the full pair lists go to the leakage summary and `leakage.csv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medclf.imaging.splits import SPLITS

PAIR_COLUMNS = ["kind", "file_a", "file_b", "split_a", "split_b", "distance", "cross_split"]
CONFLICT_COLUMNS = ["file_a", "file_b", "label_a", "label_b", "sha256"]


@dataclass
class Leakage:
    pairs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PAIR_COLUMNS))
    patients: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["patient_hash", "splits", "files"]))
    conflicts: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CONFLICT_COLUMNS))
    """Pairs of identical files (sha256) with different labels, in any splits."""

    def counts(self) -> dict[str, int]:
        p = self.pairs
        out = {
            f"{kind}_{where}_pairs": int(((p["kind"] == kind) & (p["cross_split"] == cross)).sum())
            for kind in ("exact", "near")
            for where, cross in (("cross_split", True), ("within_split", False))
        }
        out["patients_in_several_splits"] = len(self.patients)
        out["label_conflict_pairs"] = len(self.conflicts)
        return out

    def summary(self, max_examples: int) -> dict[str, Any]:
        out: dict[str, Any] = {"counts": self.counts()}
        for kind in ("exact", "near"):
            cross = self.pairs[(self.pairs["kind"] == kind) & self.pairs["cross_split"]]
            out[f"{kind}_cross_split_examples"] = [
                f"{r.file_a} ↔ {r.file_b}" + (f" (distance {r.distance})" if kind == "near" else "")
                for r in cross.head(max_examples).itertuples()
            ]
        top = self.patients.head(max_examples)
        out["patient_overlap_examples"] = [
            f"{patient} in {splits}: " + ", ".join(files[:4])
            for patient, splits, files in zip(top["patient_hash"], top["splits"], top["files"], strict=True)
        ]
        out["label_conflict_examples"] = [
            f"{r.file_a} ({r.label_a}) ↔ {r.file_b} ({r.label_b})"
            for r in self.conflicts.head(max_examples).itertuples()
        ]
        return out


def hamming_pairs(bits: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i<j whose packed bit strings differ in ≤ max_distance bits (chunked brute force).

    5,216 hashes are 13.6 M pairs: well under a second with `np.bitwise_count`.
    Chunks hold ~8 M words, so memory stays bounded for large datasets.
    """
    n = len(bits)
    if n < 2:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    pad = (-bits.shape[1]) % 8
    words = np.ascontiguousarray(np.pad(bits, ((0, 0), (0, pad)))).view(np.uint64)
    chunk = int(np.clip(8_000_000 // (n * words.shape[1]), 8, 512))
    ii, jj, dd = [], [], []
    for a in range(0, n, chunk):
        block = words[a : a + chunk]
        rest = words[a:]
        dist = np.bitwise_count(block[:, None, :] ^ rest[None, :, :]).sum(-1, dtype=np.int32)
        i, j = np.nonzero(dist <= max_distance)
        keep = j > i  # rest starts at a, so column j is image a+j; keep the upper triangle
        ii.append(i[keep] + a)
        jj.append(j[keep] + a)
        dd.append(dist[i[keep], j[keep]])
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(dd)


def _exact_pairs(images: pd.DataFrame) -> pd.DataFrame:
    sha = images["sha256"].astype(object)
    dup = images[sha.notna() & sha.duplicated(keep=False)]
    rows = []
    for _, grp in dup.groupby(dup["sha256"].astype(str), sort=True):
        recs = list(zip(grp["file"], grp["split"], strict=True))
        for x in range(len(recs)):
            for y in range(x + 1, len(recs)):
                rows.append(("exact", recs[x][0], recs[y][0], recs[x][1], recs[y][1], 0, recs[x][1] != recs[y][1]))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _label_conflicts(images: pd.DataFrame) -> pd.DataFrame:
    """Identical files (sha256) whose labels differ: one row per pair of differently labelled files."""
    sha = images["sha256"].astype(object)
    dup = images[sha.notna() & sha.duplicated(keep=False)]
    rows = []
    for h, grp in dup.groupby(dup["sha256"].astype(str), sort=True):
        recs = list(zip(grp["file"], grp["label"].astype(object), strict=True))
        for x in range(len(recs)):
            for y in range(x + 1, len(recs)):
                if recs[x][1] != recs[y][1]:
                    rows.append((recs[x][0], recs[y][0], recs[x][1], recs[y][1], h))
    return pd.DataFrame(rows, columns=CONFLICT_COLUMNS)


def _near_pairs(images: pd.DataFrame, hashes: np.ndarray, max_distance: int) -> pd.DataFrame:
    valid = images["_h"].notna().to_numpy()
    sub = images[valid]
    if not len(sub):
        return pd.DataFrame(columns=PAIR_COLUMNS)
    i, j, d = hamming_pairs(hashes[sub["_h"].astype(int).to_numpy()], max_distance)
    sha = sub["sha256"].astype(object).to_numpy()
    keep = sha[i] != sha[j]  # identical files are reported once, as exact duplicates
    i, j, d = i[keep], j[keep], d[keep]
    files, splits = sub["file"].to_numpy(object), sub["split"].to_numpy(object)
    return pd.DataFrame(
        {
            "kind": "near",
            "file_a": files[i],
            "file_b": files[j],
            "split_a": splits[i],
            "split_b": splits[j],
            "distance": d.astype(int),
            "cross_split": splits[i] != splits[j],
        },
        columns=PAIR_COLUMNS,
    )


def _patients(images: pd.DataFrame) -> pd.DataFrame:
    known = images[images["patient_hash"].astype(object).notna()]
    if not len(known):
        return pd.DataFrame(columns=["patient_hash", "splits", "files"])
    order = {s: i for i, s in enumerate(SPLITS)}
    splits = known.groupby("patient_hash")["split"].agg(
        lambda s: "+".join(sorted(set(map(str, s)), key=lambda x: order.get(x, 9)))
    )
    several = splits[splits.str.contains(r"\+", regex=True)]
    files = known[known["patient_hash"].isin(several.index)].groupby("patient_hash")["file"].agg(list)
    return pd.DataFrame(
        {"patient_hash": several.index, "splits": several.values, "files": [files[p] for p in several.index]}
    )


def _partner(pairs: pd.DataFrame, cross: bool) -> dict[str, str]:
    """file → its first partner file (both directions)."""
    sel = pairs[pairs["cross_split"] == cross]
    out: dict[str, str] = {}
    for a, b in zip(sel["file_a"], sel["file_b"], strict=True):
        out.setdefault(a, b)
        out.setdefault(b, a)
    return out


def find_leakage(images: pd.DataFrame, hashes: np.ndarray, max_distance: int) -> Leakage:
    pairs = pd.concat([_exact_pairs(images), _near_pairs(images, hashes, max_distance)], ignore_index=True)
    pairs["cross_split"] = pairs["cross_split"].astype(bool)
    return Leakage(pairs=pairs, patients=_patients(images), conflicts=_label_conflicts(images))


def annotate(images: pd.DataFrame, leak: Leakage) -> pd.DataFrame:
    """Partner columns (null = no partner) that the GX suite expects to be null."""
    out = images.copy()
    exact = leak.pairs[leak.pairs["kind"] == "exact"]
    near = leak.pairs[leak.pairs["kind"] == "near"]
    out["duplicate_cross_split_of"] = out["file"].map(_partner(exact, True))
    out["near_duplicate_cross_split_of"] = out["file"].map(_partner(near, True))
    out["near_duplicate_within_split_of"] = out["file"].map(_partner(near, False))
    partner: dict[str, str] = {}
    for a, b, la, lb in zip(
        leak.conflicts["file_a"],
        leak.conflicts["file_b"],
        leak.conflicts["label_a"],
        leak.conflicts["label_b"],
        strict=True,
    ):
        partner.setdefault(a, f"{b} (label {lb})")
        partner.setdefault(b, f"{a} (label {la})")
    out["label_conflict_of"] = out["file"].map(partner)
    out["patient_in_splits"] = (
        out["patient_hash"]
        .astype(object)
        .map({p: f"{p} in {s}" for p, s in zip(leak.patients["patient_hash"], leak.patients["splits"], strict=True)})
    )
    return out
