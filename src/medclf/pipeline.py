"""The pipeline, declared once (Kedro's `pipeline.py`, on top of DVC): for each stage, the catalog entries it
reads and writes, the params.yaml keys it reads, and the function that runs it.

The CLI is wired from these declarations, and tests/test_dvc_deps.py checks dvc.yaml against them (deps:
inputs + the stage's whole import closure; params: exactly `params`; outs/metrics/plots: the outputs), so
the declarations, dvc.yaml and the code cannot drift apart. Importing this module is cheap: a stage's
module (and its heavy imports) loads only when the stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medclf import catalog as c

if TYPE_CHECKING:
    from medclf.catalog import Artifact
    from medclf.config import Settings


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[Artifact, ...]
    outputs: tuple[Artifact, ...]
    params: tuple[str, ...]
    """params.yaml keys the stage reads: a section (`train`) or one key of another section (`ingest.classes`)."""
    metrics: tuple[Artifact, ...] = field(default=())
    """headline-number files (`dvc metrics show`)."""
    plots: tuple[Artifact, ...] = field(default=())

    def run(self, settings: Settings) -> dict[str, Any]:
        """`medclf.stages.<name>.run(settings)`: the one implementation DVC and Prefect both execute."""
        result: dict[str, Any] = importlib.import_module(f"medclf.stages.{self.name}").run(settings)
        return result


PIPELINE: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", inputs=(), outputs=(c.CLASSES, c.MANIFEST, c.IMAGES, c.LABELS, c.QUARANTINE),
          params=("ingest",), metrics=(c.INGEST_SUMMARY,)),
    Stage("validate", inputs=(c.CLASSES, c.MANIFEST, c.IMAGES, c.LABELS), outputs=(c.VALIDATION_SITE,
          c.VALIDATION_BASELINE), params=("validate", "ingest.classes"), metrics=(c.VALIDATION_SUMMARY,)),
    Stage("augment", inputs=(c.CLASSES, c.IMAGES, c.LABELS),
          outputs=(c.TRAIN_IMAGES, c.TRAIN_LABELS, c.TRAIN_IS_SYNTHETIC, c.TRAIN_SOURCE_ROW, c.AUGMENT_SUMMARY),
          params=("augment",), plots=(c.AUGMENT_PREVIEW,)),
    Stage("train", inputs=(c.CLASSES, c.IMAGES, c.LABELS, c.TRAIN_IMAGES, c.TRAIN_LABELS),
          outputs=(c.MODEL, c.TRAIN_RUN), params=("train",), plots=(c.HISTORY,)),
    Stage("evaluate", inputs=(c.CLASSES, c.IMAGES, c.LABELS, c.MODEL, c.TRAIN_RUN),
          outputs=(c.EVALUATE_REPORTS,), params=("evaluate",), metrics=(c.METRICS, c.GATES), plots=(c.PLOTS,)),
    Stage("register", inputs=(c.MODEL, c.TRAIN_RUN, c.METRICS, c.GATES), outputs=(c.REGISTER,),
          params=("register",)),
)}
"""Illustrative until each entry is checked against dvc.yaml by tests/test_dvc_deps.py."""


def invoke(name: str, settings: Settings) -> dict[str, Any]:
    """Run stage `name` with `settings` (the CLI's one entry point for stages)."""
    return PIPELINE[name].run(settings)
