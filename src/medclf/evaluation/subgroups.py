"""Subgroups (issue 13, point 5): manifest columns declared in `ingest.subgroups` (e.g. sex, age_band, site).

A leaf module, imported by the manifest source, ingest and evaluate. The manifest source refuses a
declared column that is missing, or that is not a category (`check_subgroups`). Ingest carries each
declared column into its manifest as `subgroup_<name>`. Evaluate reads every such column for the test
rows (`groups_of_test_split`), and `medclf.evaluation.metrics.subgroup_metrics` computes the figures per category
at the registered threshold; a multi-class or ordinal task's figures per category are
`medclf.evaluation.task.subgroup_metrics`' (not here: ingest imports this module). Only categories leave the
manifest: never a path, a label, a patient id or a split, and no column with nearly one value per row (an
identifier, a date, an exact age).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd


SUBGROUP_PREFIX = "subgroup_"
"""Ingest's manifest names the column of subgroup `sex` `subgroup_sex`."""
NOT_SUBGROUPS = ("path", "label", "patient_id", "split")
MAX_VALUES = 50
"""More distinct values than this, or than half of 20+ rows, is an identifier or a measurement, not a category."""
UNKNOWN = "unknown"
"""The category of a blank cell."""


class SubgroupError(ValueError):
    """Ingest's manifest cannot give the test rows' subgroups (the message names the file)."""


def check_subgroups(
    df: pd.DataFrame, subgroups: list[str], uri: str, reserved: dict[str, str] | None = None
) -> str | None:
    """What is wrong with `ingest.subgroups` for the source manifest `df` read from `uri`, or None. `reserved` maps
    further non-subgroup columns to what they are, e.g. `{"dx": "label (source.label_column)"}`: the source's
    configured label and group columns, refused like those of `NOT_SUBGROUPS`."""
    for name in subgroups:
        what = name.replace("_", " ") if name in NOT_SUBGROUPS else (reserved or {}).get(name)
        if what is not None:
            return (
                f"ingest.subgroups: {name!r} cannot be a subgroup ({uri}: it is the image's "
                f"{what}); subgroups are categories such as sex, age band or site"
            )
        if name not in df.columns:
            return (
                f"ingest.subgroups declares column {name!r}, which the manifest {uri} lacks "
                f"(its columns: {', '.join(map(str, df.columns))})"
            )
        values = df[name].dropna().astype(str).str.strip()
        values = values[values != ""]
        distinct = int(values.nunique())
        if distinct > MAX_VALUES or (len(values) >= 20 and distinct > len(values) // 2):
            return (
                f"ingest.subgroups: column {name!r} of {uri} has {distinct} distinct values in {len(values)} "
                "rows: an identifier or a measurement, not a category; declare a banded column (e.g. age_band)"
            )
    return None


def groups_of_test_split(manifest: Path, n_test: int) -> dict[str, np.ndarray]:
    """{subgroup name: category of each test image, in the test arrays' row order}; {} without any."""
    import pandas as pd

    if not manifest.exists():
        return {}
    m = pd.read_parquet(manifest)
    cols = [str(col) for col in m.columns if str(col).startswith(SUBGROUP_PREFIX)]
    if not cols:
        return {}
    test = m[(m.split == "test") & (m.status == "ok")].sort_values("row")
    if list(test["row"]) != list(range(n_test)):
        raise SubgroupError(f"{manifest}: {len(test)} test rows, the test arrays have {n_test} (rerun `medclf ingest`)")
    return {col[len(SUBGROUP_PREFIX) :]: test[col].fillna(UNKNOWN).astype(str).to_numpy() for col in cols}


def patients_of_split(manifest: Path, split: str, n: int) -> np.ndarray | None:
    """The pseudonymised patient of each image of `split` (train, val or test), in that split's array row order, for
    a bootstrap clustered by patient (images of one patient are not independent); None when the manifest has no
    patient for some image."""
    import pandas as pd

    if not manifest.exists():
        return None
    m = pd.read_parquet(manifest)
    if "patient_hash" not in m.columns:
        return None
    rows = m[(m.split == split) & (m.status == "ok")].sort_values("row")
    if list(rows["row"]) != list(range(n)) or rows["patient_hash"].isna().any():
        return None
    return rows["patient_hash"].astype(str).to_numpy()


def patients_of_test_split(manifest: Path, n_test: int) -> np.ndarray | None:
    """`patients_of_split` of the test split."""
    return patients_of_split(manifest, "test", n_test)
