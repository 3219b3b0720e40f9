"""Drift against the last validated dataset version (the baseline), and the baseline itself.

The baseline is a small JSON file: class shares per split and, per intensity
feature, decile bin edges with their fractions (for PSI) and 101 quantiles (for
an approximate two-sample KS statistic). It is written only after a passing
validation, so "drift" always means "since the last dataset we trusted".

Multi-label (issue 25): the shares are each finding's prevalence per split (`tables.prevalence_table`), so the drift
of a finding is its prevalence against the baseline's, as for a class. The baseline records `"task": "multilabel"`;
a baseline of the other kind (class shares against finding prevalences) counts as absent.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medclf.infra.io import read_json

FEATURES = ("mean", "std")
BASELINE_VERSION = 1
_EPS = 1e-4


def fingerprint(images: pd.DataFrame) -> str:
    """Content identity of a dataset version: sorted (split, sha256) pairs."""
    keys = sorted(f"{s}:{h}" for s, h in zip(images["split"].astype(str), images["sha256"].astype(str), strict=True))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _feature_profile(values: np.ndarray) -> dict[str, Any]:
    values = values[np.isfinite(values)]
    if not len(values):
        return {"edges": [], "fractions": [1.0], "quantiles": []}
    edges = np.unique(np.quantile(values, np.linspace(0.1, 0.9, 9)))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {
        "edges": edges.round(6).tolist(),
        "fractions": (counts / counts.sum()).round(6).tolist(),
        "quantiles": np.quantile(values, np.linspace(0, 1, 101)).round(6).tolist(),
    }


def make_baseline(images: pd.DataFrame, prevalence: pd.DataFrame, multilabel: bool = False) -> dict[str, Any]:
    shares: dict[str, dict[str, float]] = {}
    for split, cls, share in zip(prevalence["split"], prevalence["class"], prevalence["share"], strict=True):
        shares.setdefault(str(split), {})[str(cls)] = round(float(share), 6)
    return {
        "version": BASELINE_VERSION,
        **({"task": "multilabel"} if multilabel else {}),
        "fingerprint": fingerprint(images),
        "images": len(images),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "prevalence": shares,
        "features": {f: _feature_profile(images[f].to_numpy(float)) for f in FEATURES},
    }


def load_baseline(path: Path, multilabel: bool = False) -> dict[str, Any] | None:
    """The baseline, or None when absent or unreadable (an old format counts as absent, and so does a baseline of
    the other task kind: multi-label against single-label)."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != BASELINE_VERSION:
        return None
    return data if (data.get("task") == "multilabel") == multilabel else None


def psi(values: np.ndarray, profile: dict[str, Any]) -> float:
    """Population stability index of `values` against the baseline's decile bins."""
    values = values[np.isfinite(values)]
    base = np.asarray(profile["fractions"], float)
    if not len(values) or not len(base):
        return 0.0
    counts = np.bincount(np.searchsorted(np.asarray(profile["edges"]), values, side="right"), minlength=len(base))
    cur = np.clip(counts / counts.sum(), _EPS, None)
    base = np.clip(base, _EPS, None)
    return float(np.sum((cur - base) * np.log(cur / base)))


def ks(values: np.ndarray, profile: dict[str, Any]) -> float:
    """Largest CDF gap between `values` and the baseline (its CDF read from 101 stored quantiles)."""
    values = np.sort(values[np.isfinite(values)])
    q = np.asarray(profile.get("quantiles", []), float)
    if not len(values) or not len(q):
        return 0.0
    cdf_base = np.interp(values, q, np.linspace(0, 1, len(q)), left=0.0, right=1.0)
    n = len(values)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf_base), np.max(cdf_base - np.arange(n) / n)))


def compare(
    images: pd.DataFrame, prevalence: pd.DataFrame, baseline: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(drift table: feature, psi, ks) and the prevalence table with `baseline_share` and `shift`."""
    rows = [
        {
            "feature": f,
            "psi": round(psi(images[f].to_numpy(float), baseline["features"][f]), 6),
            "ks": round(ks(images[f].to_numpy(float), baseline["features"][f]), 6),
        }
        for f in FEATURES
        if f in baseline.get("features", {})
    ]
    prev = prevalence.copy()
    base = baseline.get("prevalence", {})
    prev["baseline_share"] = [
        base.get(str(s), {}).get(str(c), np.nan) for s, c in zip(prev["split"], prev["class"], strict=True)
    ]
    prev["shift"] = (prev["share"] - prev["baseline_share"]).abs()
    return pd.DataFrame(rows, columns=["feature", "psi", "ks"]), prev
