"""The package layout holds (issue 23): every module sits on a floor, imports run only down (or within its own
package), there is no import circle, a module over 400 lines is one named job, and no module gets a one-letter
alias. Read from the source (AST) so lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

FLOORS: dict[str, int] = {
    # docs/CONTRIBUTING.md, "Floors": a module may import its own package and anything on a lower floor.
    "medclf": 0,  # the package root: version, STAGES (names only)
    "medclf.config": 0,  # the params schema and the vocabularies (imports nothing else from medclf)
    "medclf.infra": 1,  # files, catalog, lock, MLflow connection
    "medclf.imaging": 2,  # decoding, splits, privacy, changes, modality, augmentation
    "medclf.modeling": 3,  # the network, weights, Grad-CAM
    "medclf.evaluation": 3,  # metrics, calibration, gates, comparison, champion scoring, the report
    "medclf.sources": 4,
    "medclf.validation": 4,
    "medclf.training": 4,
    "medclf.release": 4,  # registry, versions, serving, predict, model card
    "medclf.pipeline": 5,  # the stage declarations (stage modules are loaded by name, not imported)
    "medclf.stages": 6,
    "medclf.cli": 7,
}

LONG_ONE_JOB: dict[str, str] = {
    # modules over 400 lines, each one job (the reason it is long)
    "medclf.config": "the params.yaml schema: one pydantic model per section, each key documented",
    "medclf.evaluation.metrics": "binary and multi-class metrics with their one bootstrap",
    "medclf.evaluation.kclass": "K-class and ordinal metrics, their decision rules and clustered bootstrap",
    "medclf.modeling.gradcam": "Grad-CAM: split model, softmax log-odds or sigmoid logit, class and finding galleries",
    "medclf.evaluation.plots": "the evaluate figures of every task family: curves, confusion, reliability, galleries",
    "medclf.validation.gx_suite": "the Great Expectations suite: one expectation per check",
    "medclf.stages.ingest": "the ingest stage: scan, decode in parallel, split, commit atomically",
    "medclf.stages.evaluate": "the evaluate stage's edge: inputs, the binary and K-class branches, figures, MLflow",
    "medclf.stages.register": "the register stage: its refusals, the version's tags and models, experiments",
    "medclf.release.serving": "the served pyfunc: its config, input bounds and decoding, and the task's output schema",
    "medclf.release.model_card": "the version page and the model card: decision facts, checklist, every section",
    "medclf.release.registry": "the registry edge: the client, checked promotion and rollback, the champion's scoring",
    "medclf.release.promotion": "the promotion check and its audit: checklist, audit log, the webhook receiver",
    "flows.summary": "the flow run's summary: its headline, tables and markdown artifact",
    "tasks.common": "one stage through DVC as a Prefect task: environment, retries, result files",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _floor(module: str) -> tuple[str, int]:
    owner = max((k for k in FLOORS if module == k or module.startswith(k + ".")), key=len)
    return owner, FLOORS[owner]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every medclf import in the file, resolved to a module where the imported name
    is itself a module (`from medclf.imaging import images` -> medclf.imaging.images)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medclf":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "medclf"]
    return found


def test_every_module_sits_on_a_floor():
    assert set(MODULES) >= {"medclf.cli", "medclf.pipeline", "medclf.infra.io"}
    for module in MODULES:
        _floor(module)  # raises ValueError (max of nothing) for a module no floor holds


def test_imports_run_only_down_or_within_their_package():
    upward = []
    for module, path in MODULES.items():
        owner, floor = _floor(module)
        for target, line in _imports(path):
            t_owner, t_floor = _floor(target)
            if t_owner != owner and t_floor > floor:
                upward.append(f"{path.relative_to(SRC)}:{line}: {module} (floor {floor}) imports {target} ({t_floor})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {m: {t for t, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # package __init__ re-exports nothing here, so an edge to a package is an edge to its __init__ only
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    circles: list[list[str]] = []

    def walk(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for t in sorted(graph[m]):
            if seen.get(t) == 1:
                circles.append([*stack[stack.index(t) :], t])
            elif t not in seen:
                walk(t, [*stack, t])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            walk(m, [m])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_long_modules_hold_one_named_job():
    everything = {**MODULES}
    for root in ("flows", "tasks"):  # the orchestration packages beside src/
        everything |= {f"{root}.{p.stem}": p for p in sorted((SRC.parent / root).glob("*.py")) if p.stem != "__init__"}
    long = {m: len(p.read_text().splitlines()) for m, p in everything.items() if len(p.read_text().splitlines()) > 400}
    assert set(long) <= set(LONG_ONE_JOB), {m: n for m, n in long.items() if m not in LONG_ONE_JOB}
    assert not set(LONG_ONE_JOB) - set(everything), "a listed module no longer exists"


@pytest.mark.parametrize("root", ["src", "flows", "tasks", "tests", "bench"])
def test_no_one_letter_module_aliases(root: str):
    bad = []
    for p in sorted((SRC.parent / root).rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bad += [f"{p.name}:{node.lineno} as {a.asname}" for a in node.names if a.asname and len(a.asname) == 1]
    assert not bad, bad


def test_the_checks_catch_what_they_claim(tmp_path):
    """The circle and floor checks fail on a planted circle and a planted upward import."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from medclf.stages import train\n")
    b.write_text("def f():\n    from medclf.infra import io\n")
    assert _imports(a) == [("medclf.stages.train", 1)] and _imports(b) == [("medclf.infra.io", 2)]
    assert _floor("medclf.stages.train")[1] > _floor("medclf.infra.io")[1]
