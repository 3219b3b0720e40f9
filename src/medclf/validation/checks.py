"""The check catalogue: every check's name, default severity and meaning, and its outcome type.

Names are the keys of `validate.severity` in params.yaml. Defaults follow one
rule: `error` where the dataset would make training or the test metrics wrong
(leakage, unknown or conflicting labels, broken arrays, blank scans, a skewed split), `warn`
where a person should look but the data may well be right (within-split
duplicates, odd-looking exposures, drift from the last validated version).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CHECKS: dict[str, tuple[str, str]] = {
    # name: (default severity, what a failure means)
    "schema": ("error", "manifest columns, status and split values follow the ingest contract"),
    "not_null": ("error", "every usable row has id, uri, sha256, label, split, row and original size"),
    "unknown_label": ("error", "every label is one of the configured classes"),
    "unique_id": ("error", "image ids are unique"),
    "array_consistency": ("error", "arrays agree with the manifest: rows per split, labels, image shape"),
    "image_size": ("error", "original height and width within [min_size, max_size]"),
    "aspect_ratio": ("warn", "original long side / short side at most validate.max_aspect_ratio"),
    "channels": ("error", "original channel count within 1..4"),
    "duplicate_within_split": ("warn", "identical files (sha256) inside one split"),
    "duplicate_cross_split": ("error", "identical files (sha256) in two splits: test leakage"),
    "label_conflict": ("error", "identical files (sha256) under two different labels, in any splits"),
    "near_duplicate_within_split": ("warn", "perceptually identical images inside one split"),
    "near_duplicate_cross_split": ("error", "perceptually identical images in two splits: test leakage"),
    "patient_overlap": ("error", "one patient in two splits: test leakage"),
    "patient_id_missing": ("warn", "rows without a patient id cannot be checked for patient leakage"),
    "blank": ("error", "blank image (pixel std below validate.blank_std_max)"),
    "low_contrast": ("warn", "low-contrast image (pixel std below validate.low_contrast_std_max)"),
    "saturated": ("warn", "too many pixels at the white or black extreme"),
    "inverted": ("warn", "bright border, or a centre darker than its border: looks inverted (MONOCHROME1?)"),
    "prevalence_bounds": ("error", "each class's share per split within validate.prevalence_bounds"),
    "prevalence_gap": ("error", "a class's share differs between splits by more than validate.max_prevalence_gap"),
    "split_fractions": ("warn", "split sizes within validate.split_fraction_bounds"),
    "drift_prevalence": ("warn", "class share moved more than validate.drift_prevalence_max since the baseline"),
    "drift_intensity": ("warn", "intensity distribution PSI above validate.drift_psi_max since the baseline"),
}

PASS, FAIL, WARN, OFF, SKIPPED = "pass", "fail", "warn", "off", "skipped"


def severities(overrides: Mapping[str, str]) -> dict[str, str]:
    """Default severities with `validate.severity` applied (names are checked by the config)."""
    return {name: overrides.get(name, default) for name, (default, _) in CHECKS.items()}


@dataclass
class CheckResult:
    """One check's outcome: what was observed, against which bound, and example files."""

    name: str
    severity: str
    status: str = PASS
    observed: Any = None
    bound: str = ""
    examples: list[str] = field(default_factory=list)
    count: int = 0
    note: str = ""

    @property
    def description(self) -> str:
        return CHECKS[self.name][1]

    def message(self) -> str:
        text = f"{self.name}: observed {self.observed} (bound: {self.bound})"
        if self.note:
            text += f"; {self.note}"
        if self.examples:
            text += "\n" + "\n".join(f"    - {e}" for e in self.examples)
        return text

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "status": self.status, "observed": self.observed,
                               "bound": self.bound, "count": self.count}
        if self.examples:
            out["examples"] = self.examples
        if self.note:
            out["note"] = self.note
        return out


def outcome(severity: str, failed: bool) -> str:
    if severity == "off":
        return OFF
    if not failed:
        return PASS
    return FAIL if severity == "error" else WARN
