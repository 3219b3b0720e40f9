"""dvc.yaml cannot drift from the code: each stage's deps cover its whole import closure.

A module a stage imports (at module level or inside a function, directly or through other
modules) but that its `deps:` do not list would let a change to it leave `dvc repro` saying
"up to date": a silent stale model. The closure is computed from the source (ast), so it is
conservative: an import inside a function counts even if that function never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from medclf import STAGES
from tests.conftest import ROOT

SRC = ROOT / "src"


def _module_file(mod: str) -> Path | None:
    p = SRC / Path(*mod.split("."))
    if (p / "__init__.py").exists():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").exists() else None


def _imports(path: Path, mod: str) -> set[str]:
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "medclf"}


def import_closure(module: str) -> set[str]:
    """Repository-relative files of every `medclf` module `module` can execute (packages' __init__ too)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            path = _module_file(name)
            if path is not None and name not in seen:
                seen[name] = path
                todo += sorted(_imports(path, name))
    return {p.relative_to(ROOT).as_posix() for p in seen.values()}


def _deps(stage: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_its_import_closure(stage):
    closure = import_closure(f"medclf.stages.{stage}") | {"src/medclf/cli.py"}  # `medclf <stage>` runs cli.py
    missing = sorted(p for p in closure if not _covered(p, _deps(stage)))
    assert not missing, f"dvc.yaml stage '{stage}' misses imported modules in its deps: {missing}"


def test_closure_follows_lazy_and_transitive_imports():
    """The walker itself: ingest reaches privacy (direct), sources/folder (a lazy import in the sources
    dispatcher); not modeling, since config imports nothing from medclf (it used to, lazily)."""
    closure = import_closure("medclf.stages.ingest")
    assert {"src/medclf/privacy.py", "src/medclf/config.py", "src/medclf/sources/folder.py",
            "src/medclf/__init__.py"} <= closure
    assert "src/medclf/stages/train.py" not in closure and "src/medclf/modeling.py" not in closure


def test_every_declared_code_dep_exists():
    for stage in STAGES:
        for dep in _deps(stage):
            if dep.startswith("src/"):
                assert (ROOT / dep).exists(), f"{stage}: {dep} does not exist"
