"""Experiments do not flood the registry (issue 27, point 1): a real `dvc exp run` in a temporary git + DVC checkout
of this pipeline is tracked in MLflow under its experiment name and never registers a version or moves an alias;
`medclf register --from-exp NAME` is the one way to release it, and dvc.lock then records that registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.test_flow import model_versions, run_cmd
from tests.test_lifecycle import new_folder_project

pytestmark = pytest.mark.slow
EXP = "try-two-head-epochs"


def _aliases(uri: str, name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {a: v for a, v in MlflowClient(tracking_uri=uri).get_registered_model(name).aliases.items()}


def test_dvc_exp_run_never_registers_and_register_from_exp_releases_it(
    tmp_path, mlflow_server, prefect_api, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MEDCLF_GPU_DEPLOYMENT", raising=False)
    checkout: Path = new_folder_project(tmp_path)["checkout"]
    name = yaml.safe_load((checkout / "params.yaml").read_text())["register"]["model_name"]
    run_cmd(checkout, "dvc", "repro")  # the main line: v1, challenger
    run_cmd(checkout, "git", "add", "-A")
    run_cmd(checkout, "git", "commit", "-qm", "main-line run")
    before = sorted(int(v.version) for v in model_versions(mlflow_server, name))
    aliases = _aliases(mlflow_server, name)
    assert before == [1] and aliases == {"challenger": "1"}, (before, aliases)

    run_cmd(checkout, "dvc", "exp", "run", "-n", EXP, "-S", "train.head_epochs=2")
    # the registry and its aliases are exactly as before
    assert sorted(int(v.version) for v in model_versions(mlflow_server, name)) == before
    assert _aliases(mlflow_server, name) == aliases
    said = json.loads((checkout / "reports" / "register.json").read_text())
    assert said["version"] is None and said["experiment"] == EXP and "not registered" in said["note"], said
    # ... and the experiment is tracked: its training run carries the experiment's name and its params
    run = MlflowClient(tracking_uri=mlflow_server).get_run(said["run_id"])
    assert run.data.tags["dvc.experiment"] == EXP and run.data.tags["medclf.registered"].startswith("no")
    assert run.data.params["train.head_epochs"] == "2"
    shown = run_cmd(checkout, "dvc", "exp", "show", "--only-changed", "--no-pager")
    assert EXP in shown, shown

    # released on purpose: the experiment's version, tagged with its name; dvc.lock agrees with register.json
    run_cmd(checkout, "medclf", "register", "--from-exp", EXP)
    after = {int(v.version): v for v in model_versions(mlflow_server, name)}
    assert sorted(after) == [1, 2], sorted(after)
    assert after[2].tags["dvc.experiment"] == EXP and after[2].run_id == said["run_id"]
    assert _aliases(mlflow_server, name) == {"challenger": "2"}
    released = json.loads((checkout / "reports" / "register.json").read_text())
    assert released["version"] == 2 and released["experiment"] == EXP, released
    assert "register" not in run_cmd(checkout, "dvc", "status", "register"), "dvc.lock disagrees with register.json"
