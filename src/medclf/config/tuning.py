"""`train.tune`: the hyperparameter search the train stage runs before its final fit (a leaf: pydantic only).

The space names `train.*` keys; each gets a float or int range (`low`, `high`, optional `log`) or a list of
`choices`. Off by default (`trials: 0`): a study multiplies the train stage's time by about its number of
trials, so it is something to ask for, on a subsample or a GPU, not a cost every scheduled retrain pays.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NOT_TUNABLE = frozenset(
    {
        "tune",
        "seed",
        "backbone",
        "weights",
        "preprocessing",
        "mixed_precision",
        "jit_compile",
        "compile_cache",
        "augment_workers",
        "calibration",
        "online_augment",
    }
)
"""`train.*` keys a study may not vary: the run's identity (seed, backbone, weights), where it runs, and
post-processing that is fitted on validation anyway (calibration)."""


class Range(BaseModel):
    """One dimension: `{low, high[, log]}` (int when both bounds are ints and the key is an int) or `{choices}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Range:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either a non-empty `choices` list or `low`/`high`, not both")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"needs low < high (got low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        return self


class Tune(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    trials: int = Field(0, ge=0)
    """0 = no search (the default): train fits once with the values above."""
    timeout_minutes: float = Field(0.0, ge=0)
    """Wall-clock budget of the search (0 = none); it stops at whichever of trials and timeout comes first."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stops a trial whose validation AUC at an epoch is below the median of earlier trials at that epoch."""
    seed: int = 0
    """The TPE sampler's seed: the same study, data and seed propose the same trials."""
    space: dict[str, Range] = Field(
        default_factory=lambda: {
            "head_lr": Range(low=1.0e-4, high=1.0e-2, log=True),
            "finetune_lr": Range(low=1.0e-6, high=3.0e-4, log=True),
            "dropout": Range(low=0.0, high=0.5),
            "unfreeze_top": Range(choices=[20, 40, 80]),
        }
    )
    """What a search varies (params.yaml's space); searched only when `trials` or `timeout_minutes` is set."""

    @property
    def enabled(self) -> bool:
        return self.trials > 0 or self.timeout_minutes > 0

    def check_keys(self, fields: dict[str, Any]) -> None:
        """Every key of the space is a tunable `train.*` field (called by `Train`'s validator)."""
        bad = sorted(k for k in self.space if k not in fields or k in NOT_TUNABLE)
        if bad:
            ok = sorted(k for k in fields if k not in NOT_TUNABLE)
            raise ValueError(f"train.tune.space: {', '.join(bad)} cannot be tuned; choose among {', '.join(ok)}")
        if self.enabled and not self.space:
            raise ValueError(
                "train.tune.space is empty: give the keys to search, or set trials and timeout_minutes to 0"
            )
