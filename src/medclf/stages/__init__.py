"""One module per stage. Each declares itself once, as `STAGE = Stage(...)` at its end: the catalog entries
it reads and writes, the params.yaml keys it reads, and its `run(settings) -> dict`.

The CLI is wired from these declarations, and tests/test_dvc_deps.py checks dvc.yaml against them (deps:
inputs + the stage's whole import closure; params: exactly `params`; outs/metrics/plots: `outputs`), so
the declaration, dvc.yaml and the code cannot drift apart.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    run: Callable[[Settings], dict[str, Any]]
    metrics: tuple[Artifact, ...] = field(default=())
    """headline-number files (`dvc metrics show`); also outputs."""
    plots: tuple[Artifact, ...] = field(default=())


def declaration(name: str) -> Stage:
    """The declaration of stage `name` (imports its module: heavy imports stay inside `run`)."""
    stage: Stage = importlib.import_module(f"medclf.stages.{name}").STAGE
    return stage
