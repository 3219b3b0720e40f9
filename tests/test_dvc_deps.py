"""dvc.yaml cannot drift from the code: each stage's entry is exactly what its declaration implies.

`medclf.pipeline` declares each stage's inputs, outputs, metrics, plots and params. dvc.yaml must list
exactly those (paths rendered from params.yaml), and as deps also the stage's whole import closure: a
module a stage imports (at module level or inside a function, directly or through other modules) but
that its `deps:` do not list would let a change to it leave `dvc repro` saying "up to date": a silent
stale model. The closure is computed from the source (ast), so it is conservative: an import inside a
function counts even if that function never runs. Params usage is enforced at run time (a stage sees
only its declared params, see `pipeline.declared`), so the declaration, and through the test below
dvc.yaml, follows the code. Also here: no import cycle, and no stage imports another.
"""

from __future__ import annotations

import ast
import itertools
import re
import string
from pathlib import Path

import pytest
import yaml

from medclf import STAGES
from medclf.config import Paths, load_settings
from medclf.pipeline import DIR_OUTS, PIPELINE, Stage, UndeclaredParam
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


def _render(entry: str, paths: dict[str, str]) -> str:
    """dvc.yaml's `${paths.x}` templates filled from params.yaml, as DVC does."""
    return Path(re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(paths[m.group(1)]), entry)).as_posix()


def _entries(items: list | None) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in items or []]


def _code_files(dep: str) -> set[str]:
    """A `src/` dep as the Python files it stands for (a package directory: every module in it)."""
    p = ROOT / dep
    if p.is_dir():
        return {f.relative_to(ROOT).as_posix() for f in p.rglob("*.py") if "__pycache__" not in f.parts}
    return {dep}


def _artifact_paths(stage: Stage, artifacts: tuple, paths: Paths) -> set[str]:
    """Declared artifacts as dvc.yaml names them: an artifact under a root that a stage writes as one
    directory (DIR_OUTS) is that root; `{field}`s are filled from `stage.fields` (one entry each)."""
    out: set[str] = set()
    for a in artifacts:
        if a.root in DIR_OUTS:
            out.add(Path(getattr(paths, a.root)).as_posix())
            continue
        names = {n for _, n, _, _ in string.Formatter().parse(a.rel) if n}
        combos = [dict(zip(names, v, strict=True)) for v in itertools.product(*(stage.fields[n] for n in names))]
        out |= {a.path(paths, **f).as_posix() for f in combos}
    return out


def expected_dvc_stage(stage: Stage, paths: Paths) -> dict[str, set[str]]:
    """dvc.yaml's entry for `stage` as its declaration implies it (paths rendered).

    deps: the declared inputs, the stage module's whole import closure, and what `medclf <stage>` runs
    before it (cli.py, the pipeline module and its closure); params: exactly the declared keys;
    outs/metrics/plots: the declared outputs/metrics/plots."""
    code = import_closure(f"medclf.stages.{stage.name}") | import_closure("medclf.pipeline") | {"src/medclf/cli.py"}
    return {
        "deps": code | _artifact_paths(stage, stage.inputs, paths),
        "params": set(stage.params),
        "outs": _artifact_paths(stage, stage.outputs, paths),
        "metrics": _artifact_paths(stage, stage.metrics, paths),
        "plots": _artifact_paths(stage, stage.plots, paths),
    }


def actual_dvc_stage(stage: str) -> dict[str, set[str]]:
    """dvc.yaml's entry for `stage`, `${paths.*}` rendered with params.yaml's paths, code dirs expanded."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    deps: set[str] = set()
    for d in _entries(spec.get("deps")):
        deps |= _code_files(d) if d.startswith("src/") else {_render(d, paths)}
    params: set[str] = set()
    for p in spec.get("params") or []:
        params |= {p} if isinstance(p, str) else {k for keys in p.values() for k in keys}
    return {
        "deps": deps,
        "params": params,
        **{k: {_render(o, paths) for o in _entries(spec.get(k))} for k in ("outs", "metrics", "plots")},
    }


def test_the_declarations_are_the_stages_of_dvc_yaml():
    assert tuple(PIPELINE) == STAGES
    assert tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_is_exactly_what_the_declaration_and_the_import_closure_imply(stage):
    """Deps (inputs + import closure), params, outs, metrics and plots: any difference, either way, fails.

    A dep missing from dvc.yaml lets a change leave `dvc repro` saying "up to date" (a stale model); an
    extra one reruns a stage for nothing and hides that the declaration is wrong."""
    expected = expected_dvc_stage(PIPELINE[stage], load_settings(ROOT / "params.yaml").paths)
    actual = actual_dvc_stage(stage)
    problems = [
        f"{key}: dvc.yaml misses {sorted(expected[key] - actual[key])}, "
        f"lists undeclared {sorted(actual[key] - expected[key])}"
        for key in expected
        if expected[key] != actual[key]
    ]
    assert not problems, f"dvc.yaml stage '{stage}' differs from src/medclf/pipeline.py: " + "; ".join(problems)


# Import circles (lazy and TYPE_CHECKING imports included) and upward imports: tests/test_layout.py.


def test_no_stage_imports_another_stage():
    """Stages exchange data through catalog entries, never through each other's code."""
    offenders = {}
    for stage in STAGES:
        mod = f"medclf.stages.{stage}"
        others = {
            m for m in _imports(_module_file(mod), mod) if m.startswith("medclf.stages.") and m.split(".")[2] != stage
        }
        if others:
            offenders[stage] = sorted(others)
    assert not offenders, f"stage modules import other stages: {offenders}"


def test_closure_follows_lazy_and_transitive_imports():
    """The walker itself: ingest reaches privacy (direct), sources/folder (a lazy import in the sources
    dispatcher), dicom (imported inside images.decode_bytes: lazy and transitive); not modeling, since
    config imports nothing from medclf (it used to, lazily)."""
    closure = import_closure("medclf.stages.ingest")
    assert {
        "src/medclf/imaging/privacy.py",
        "src/medclf/config/__init__.py",
        "src/medclf/sources/folder.py",
        "src/medclf/imaging/dicom.py",
        "src/medclf/__init__.py",
    } <= closure
    assert "src/medclf/stages/train.py" not in closure and "src/medclf/modeling/network.py" not in closure


def test_every_declared_code_dep_exists():
    for stage in STAGES:
        for dep in _deps(stage):
            if dep.startswith("src/"):
                assert (ROOT / dep).exists(), f"{stage}: {dep} does not exist"


def test_a_stage_reads_only_its_declared_params_and_an_undeclared_read_names_stage_key_and_dvc_yaml():
    """`invoke` (and `@declared` on each stage's `run`) hands the stage a checked view of the settings:
    a read that its declaration, and so dvc.yaml, does not list fails in every test that runs the stage."""
    s = load_settings(ROOT / "params.yaml")
    v = PIPELINE["validate"].view(s)
    assert v.validation.min_size == s.validation.min_size  # the stage's own section (through its property)
    assert v.ingest.classes == s.ingest.classes  # one declared key of another section
    assert v.paths.ingest_dir == s.paths.ingest_dir and v.mlflow.tracking_uri == s.mlflow.tracking_uri  # exempt
    with pytest.raises(
        UndeclaredParam,
        match=r"stage 'validate' reads params.yaml key 'ingest\.image_size'.*"
        r"src/medclf/pipeline\.py.*`stages\.validate\.params` in dvc\.yaml",
    ):
        _ = v.ingest.image_size
    with pytest.raises(UndeclaredParam, match=r"stage 'validate' reads params.yaml key 'train'"):
        _ = v.train
    # methods and properties of the config classes run against the view: their own reads are checked too
    partial = Stage("t", (), (), params=("augment.preset",)).view(s)
    with pytest.raises(UndeclaredParam, match=r"'augment\.overrides'"):
        partial.augment.policy()
    with pytest.raises(UndeclaredParam, match=r"'augment\.\* \(via model_dump\)'"):
        partial.augment.model_dump()  # a whole-section read (params_hash, flat_params) needs the whole section
    both = Stage("t", (), (), params=("augment.preset", "augment.overrides")).view(s)
    assert both.augment.policy() == s.augment.policy()
    with pytest.raises(TypeError, match="read-only"):
        v.paths = s.paths


def test_design_page_shows_the_declarations_as_they_are():
    """docs/DESIGN.md's one-page map is `pipeline.markdown()`: a changed declaration or catalog entry
    without the page following fails here (regenerate the block between the markers)."""
    from medclf import pipeline

    page = (ROOT / "docs" / "DESIGN.md").read_text()
    start = page.index("<!-- pipeline.markdown() begins")
    block = page[page.index("\n", start) + 1 : page.index("<!-- pipeline.markdown() ends -->")]
    assert block == pipeline.markdown()
    for s in pipeline.PIPELINE.values():  # the one name, across the places the page promises
        for place in (f"src/medclf/stages/{s.name}.py", f"tasks/{s.name}.py", f"tests/test_{s.name}.py"):
            assert (ROOT / place).exists(), place
        assert s.name in yaml.safe_load((ROOT / "params.yaml").read_text()), s.name
