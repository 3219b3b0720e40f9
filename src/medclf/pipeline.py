"""The pipeline, declared once (Kedro's `pipeline.py`, on top of DVC): for each stage, the catalog entries it
reads and writes, the params.yaml keys it reads, and the function that runs it.

The CLI is wired from these declarations, and tests/test_dvc_deps.py checks dvc.yaml against them (deps:
inputs + the stage's whole import closure; params: exactly `params`; outs/metrics/plots: the outputs), so
the declarations, dvc.yaml and the code cannot drift apart. Importing this module is cheap: a stage's
module (and its heavy imports) loads only when the stage runs.

Params usage is enforced at run time: `invoke` hands the stage a view of the settings in which only its
declared `params` (plus the locations `paths` and `mlflow`) can be read; any other read raises
`UndeclaredParam`, naming the stage, the key and dvc.yaml. `paths` is exempt because dvc.yaml templates
it into deps/outs (a changed path is a changed dep or out); `mlflow` because it says where runs are
recorded, not what is computed (and `MLFLOW_TRACKING_URI` overrides it, which DVC could not see anyway).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from medclf.infra import catalog

if TYPE_CHECKING:
    from medclf.config import Settings
    from medclf.infra.catalog import Artifact

EXEMPT = ("paths", "mlflow")
"""Settings sections every stage may read without declaring them (see the module docstring)."""
DIR_OUTS = ("raw_data", "external_data", "ingest_dir", "augment_dir", "model_dir")
"""`paths.*` roots DVC tracks as one directory: an artifact under one is a dep/out as the whole root."""


class UndeclaredParam(RuntimeError):
    """A stage read a params.yaml key its declaration (and so its dvc.yaml `params:`) does not list."""


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
    fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """values of the `{field}`s in output names that dvc.yaml lists one by one (evaluate's plot names)."""

    def view(self, settings: Settings) -> Settings:
        """`settings` as this stage may read it: only its declared params (and `paths`, `mlflow`)."""
        if isinstance(settings, _ParamsView):
            return settings
        return cast("Settings", _ParamsView(settings, "", self))

    def run(self, settings: Settings) -> dict[str, Any]:
        """`medclf.stages.<name>.run(settings)`: the one implementation DVC and Prefect both execute."""
        result: dict[str, Any] = importlib.import_module(f"medclf.stages.{self.name}").run(self.view(settings))
        return result


class _ParamsView:
    """A read-only stand-in for a `Settings` object (or one of its sections) that checks each read.

    A declared key gives the real value; a section of which only some keys are declared gives another
    view; anything else raises `UndeclaredParam`. Methods and properties of the config classes run against
    the view, so their reads are checked too (`augment.policy()` reads `augment.preset`, `augment.overrides`);
    pydantic's own methods (`model_dump`, ...) read the whole section and are refused on a partial view."""

    __slots__ = ("_key", "_obj", "_stage")

    def __init__(self, obj: Any, key: str, stage: Stage) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_stage", stage)

    def _refuse(self, key: str) -> UndeclaredParam:
        stage: Stage = object.__getattribute__(self, "_stage")
        return UndeclaredParam(
            f"stage '{stage.name}' reads params.yaml key '{key}', which it does not declare "
            f"(declared: {', '.join(stage.params) or 'none'}). Add it to the stage's `params` in "
            f"src/medclf/pipeline.py and to `stages.{stage.name}.params` in dvc.yaml, so that `dvc repro` "
            "reruns the stage when it changes"
        )

    def __getattr__(self, name: str) -> Any:
        obj, prefix = object.__getattribute__(self, "_obj"), object.__getattribute__(self, "_key")
        stage: Stage = object.__getattribute__(self, "_stage")
        model_fields = type(obj).model_fields
        if name in model_fields:
            key = f"{prefix}.{model_fields[name].alias or name}" if prefix else (model_fields[name].alias or name)
            value = getattr(obj, name)
            if key in EXEMPT or any(key == p or key.startswith(p + ".") for p in stage.params):
                return value
            if any(p.startswith(key + ".") for p in stage.params):
                return _ParamsView(value, key, stage)
            raise self._refuse(key)
        attr = inspect.getattr_static(obj, name)
        owner = next((k for k in type(obj).__mro__ if name in vars(k)), None)
        if owner is not None and owner.__module__ == "medclf.config":  # our own methods/properties: checked reads
            if isinstance(attr, property) and attr.fget is not None:
                return attr.fget(self)
            if isinstance(attr, (staticmethod, classmethod)):
                return getattr(obj, name)
            if inspect.isfunction(attr):
                return types.MethodType(attr, self)
        raise self._refuse(f"{prefix or '<all sections>'}.* (via {name})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("settings are read-only")


PIPELINE: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "ingest",
            inputs=(catalog.RAW_DATA,),
            outputs=(
                catalog.CLASSES,
                catalog.MANIFEST,
                catalog.IMAGES,
                catalog.LABELS,
                catalog.QUARANTINE,
                catalog.INGEST_SUMMARY,
            ),
            params=("ingest", "task.labels"),
            metrics=(catalog.INGEST_METRICS,),
        ),
        Stage(
            "validate",
            inputs=(catalog.CLASSES, catalog.MANIFEST, catalog.IMAGES, catalog.LABELS),
            outputs=(catalog.VALIDATION_SITE, catalog.VALIDATION_BASELINE, catalog.VALIDATION_SUMMARY),
            params=("validate", "ingest.classes", "ingest.modality"),
            metrics=(catalog.VALIDATE_METRICS,),
        ),
        # the validation summary is an input so that augment (and all after it) waits for data that passed
        Stage(
            "augment",
            inputs=(catalog.CLASSES, catalog.IMAGES, catalog.LABELS, catalog.VALIDATION_SUMMARY),
            outputs=(
                catalog.TRAIN_IMAGES,
                catalog.TRAIN_LABELS,
                catalog.TRAIN_IS_SYNTHETIC,
                catalog.TRAIN_SOURCE_ROW,
                catalog.AUGMENT_SUMMARY,
            ),
            params=("augment",),
            plots=(catalog.AUGMENT_PREVIEW,),
        ),
        Stage(
            "train",
            inputs=(catalog.CLASSES, catalog.IMAGES, catalog.LABELS, catalog.TRAIN_IMAGES, catalog.TRAIN_LABELS),
            outputs=(catalog.MODEL, catalog.TRAIN_RUN),
            params=("train", "augment", "register.experiment"),
            plots=(catalog.HISTORY,),
        ),
        Stage(
            "evaluate",
            inputs=(
                catalog.CLASSES,
                catalog.IMAGES,
                catalog.LABELS,
                catalog.MODEL,
                catalog.TRAIN_RUN,
                catalog.EXTERNAL_DATA,
            ),
            outputs=(catalog.EVALUATE_REPORTS, catalog.METRICS, catalog.GATES),
            # ingest: an external set is decoded exactly as ingest decodes the training data
            params=("evaluate", "task", "register.model_name", "ingest"),
            metrics=(catalog.EVALUATE_METRICS,),
            plots=(catalog.PLOTS,),
            fields={"name": ("roc", "pr", "calibration", "confusion")},
        ),
        Stage(
            "register",
            inputs=(
                catalog.MODEL,
                catalog.TRAIN_RUN,
                catalog.METRICS,
                catalog.GATES,
                catalog.EVALUATE_REPORTS,  # which figures exist: the version page links those only
                catalog.VALIDATION_SUMMARY,
            ),
            outputs=(catalog.REGISTER,),
            params=(
                "register",
                "ingest",
                "validate.min_size",
                "validate.max_aspect_ratio",
                "augment",
                "train",
                "evaluate",
            ),
        ),
    )
}


R = TypeVar("R")


def declared(run: Callable[..., R]) -> Callable[..., R]:
    """Decorate a stage module's `run(settings, ...)`: wherever it is called from (the CLI, a flow, a test),
    the stage sees the settings through its declaration's view, so an undeclared read fails at once."""
    name = run.__module__.rsplit(".", 1)[-1]

    @functools.wraps(run)
    def checked(settings: Settings, *args: Any, **kwargs: Any) -> R:
        return run(PIPELINE[name].view(settings), *args, **kwargs)

    return checked


def invoke(name: str, settings: Settings) -> dict[str, Any]:
    """Run stage `name` with `settings` (the CLI's one entry point for stages), reading only its declared params."""
    return PIPELINE[name].run(settings)


def _names(artifacts: tuple[Artifact, ...]) -> str:
    return ", ".join(f"`{a.name}`" for a in artifacts) or "–"


def markdown() -> str:
    """The pipeline on one page (docs/DESIGN.md embeds this; tests/test_dvc_deps.py keeps it current): each
    stage by its one name across params.yaml, dvc.yaml, the core module, the task and the test, with the
    catalog entries it reads and writes."""
    rows = [
        (
            "| stage = dvc.yaml stage | params.yaml keys | core module | Prefect task | test | reads | writes "
            "| headline metrics · plots |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in PIPELINE.values():
        rows.append(
            f"| `{s.name}` | {', '.join(f'`{p}`' for p in s.params)} | `medclf/stages/{s.name}.py` "
            f"| `tasks/{s.name}.py` | `tests/test_{s.name}.py` | {_names(s.inputs)} | {_names(s.outputs)} "
            f"| {_names(s.metrics + s.plots)} |"
        )
    used = {a.name for s in PIPELINE.values() for a in (*s.inputs, *s.outputs, *s.metrics, *s.plots)}
    rows += ["", "| catalog entry | file (under its `paths.*` root) | what it is |", "|---|---|---|"]
    rows += [f"| `{a.name}` | `{a.root}/{a.rel}` | {a.doc} |" for a in catalog.ENTRIES if a.name in used]
    return "\n".join(rows) + "\n"
