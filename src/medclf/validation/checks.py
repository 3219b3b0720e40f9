"""The check catalogue (`CHECKS`, defined in `medclf.config` next to `validate.severity`) and the outcome type.

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

from medclf.config import CHECKS  # name -> (default severity, meaning): the vocabulary of validate.severity

__all__ = [
    "CHECKS",
    "FAIL",
    "MULTILABEL_CHECKS",
    "OFF",
    "PASS",
    "SKIPPED",
    "WARN",
    "CheckResult",
    "describe",
    "outcome",
    "severities",
]

PASS, FAIL, WARN, OFF, SKIPPED = "pass", "fail", "warn", "off", "skipped"

MULTILABEL_CHECKS: dict[str, tuple[str, str]] = {name: CHECKS[name] for name in ("rare_finding",)}
"""Checks of multi-label tasks only (issue 25): a binary or K-class validation neither runs nor lists them. The
per-finding prevalence, gap and drift of a multi-label task are the class checks (`prevalence_bounds`,
`prevalence_gap`, `drift_prevalence`) over findings; only what has no class counterpart is here."""


def severities(overrides: Mapping[str, str], multilabel: bool = False) -> dict[str, str]:
    """Default severities with `validate.severity` applied (names are checked by the config); a multi-label task
    also gets `MULTILABEL_CHECKS`."""
    out = {
        name: overrides.get(name, default)
        for name, (default, _) in CHECKS.items()
        if multilabel or name not in MULTILABEL_CHECKS
    }
    return out


def describe(name: str) -> str:
    """What a failure of check `name` means."""
    return CHECKS[name][1]


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
        return describe(self.name)

    def message(self) -> str:
        text = f"{self.name}: observed {self.observed} (bound: {self.bound})"
        if self.note:
            text += f"; {self.note}"
        if self.examples:
            text += "\n" + "\n".join(f"    - {e}" for e in self.examples)
        return text

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "status": self.status,
            "observed": self.observed,
            "bound": self.bound,
            "count": self.count,
        }
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
