"""tasks/ as a DVC adapter (issue 11): a stage's outcome comes from its result file, never its output, and the
GPU dispatch moves `cache: false` outputs through the DVC remote by their dvc.lock md5. Real `dvc repro`
of tiny script stages in a real DVC project; a local directory is the DVC remote."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STAGE = textwrap.dedent("""
    import json, os, signal, sys
    mode, path, token = sys.argv[1], os.environ["MEDCLF_STAGE_RESULT"], os.environ["MEDCLF_RUN_TOKEN"]
    def record(**rec):  # what `medclf <stage>` writes (medclf/cli.py)
        with open(path, "w") as fh:
            json.dump({"stage": mode, "token": token, **rec}, fh)
    if mode == "killed":  # started, then SIGKILLed before it could report
        record(status="running")
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "fails":  # its output says one thing, its result file another: the file is what counts
        print("medclf fails: GateFailed: a deterministic-looking line")
        error = {"stage": "fails", "error_type": "TrackingUnavailable", "message": "server down",
                 "transient": True, "exit_code": 75}
        record(exit_code=75, error=error)
        sys.exit(75)
    with open("history.csv", "w") as fh:
        fh.write("epoch,loss\\n0,0.5\\n1,0.25\\n")
    record(exit_code=0, result={"epochs": 2})
""")
DVC_YAML = textwrap.dedent("""
    stages:
      killed: {cmd: python stage.py killed, deps: [stage.py]}
      fails: {cmd: python stage.py fails, deps: [stage.py]}
      report:
        cmd: python stage.py report
        deps: [stage.py]
        outs:
          - history.csv:
              cache: false
""")
DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A DVC project of the three script stages, never run, its remote a local directory."""
    base = tmp_path_factory.mktemp("tasks")
    root = base / "pristine"
    root.mkdir()
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / ".dvc" / "config").write_text(
        f"[core]\n    no_scm = True\n    remote = store\n['remote \"store\"']\n    url = {base / 'remote'}\n"
    )
    return root


def _project(pristine: Path, name: str) -> Path:
    return Path(shutil.copytree(pristine, pristine.parent / name))


def test_failures_are_classified_by_the_result_file(pristine):
    """A killed stage left only its "running" marker: transient (a retry resumes it). A failing stage's
    structured error wins over what it printed."""
    from tasks.common import StageFailed, run_stage_via_dvc

    root = _project(pristine, "p")
    log = logging.getLogger("test.tasks")
    with pytest.raises(StageFailed) as killed:
        run_stage_via_dvc("killed", root, logger=log)
    assert killed.value.transient and killed.value.error_type == "Killed", killed.value
    with pytest.raises(StageFailed) as fails:
        run_stage_via_dvc("fails", root, logger=log)
    err = fails.value
    assert (err.error_type, err.transient, err.exit_code) == ("TrackingUnavailable", True, 75), err
    assert err.error == "medclf fails: TrackingUnavailable: server down"


def test_uncached_outputs_travel_through_the_dvc_remote_by_their_lock_md5(pristine):
    """The GPU worker's `cache: false` output (the history plot) reaches the caller through the DVC remote,
    named by the md5 in the dvc.lock entry; an object that does not hash to it is refused."""
    from tasks.common import dvc_status, lock_entry, merge_lock_entry, run_stage_via_dvc
    from tasks.train import pull_uncached, push_uncached

    worker = _project(pristine, "worker")
    outcome = run_stage_via_dvc("report", worker, logger=logging.getLogger("test.tasks"))
    assert outcome.status == "ran" and outcome.result == {"epochs": 2}
    assert push_uncached(worker, "report") == ["history.csv"]
    entry = lock_entry(worker, "report")
    assert entry is not None

    caller = _project(pristine, "caller")
    merge_lock_entry(caller, "report", entry)
    assert lock_entry(caller, "report") == entry
    assert dvc_status("report", caller)  # the output is not here yet
    assert pull_uncached(caller, "report") == ["history.csv"]
    assert (caller / "history.csv").read_bytes() == (worker / "history.csv").read_bytes()
    assert dvc_status("report", caller) == []  # DVC agrees: the lock entry and the bytes match

    (md5,) = [o["md5"] for o in entry["outs"]]
    obj = pristine.parent / "remote" / "files" / "md5" / md5[:2] / md5[2:]
    obj.chmod(0o644)
    obj.write_text("epoch,loss\n0,9\n")  # a damaged object on the remote
    (caller / "history.csv").unlink()
    with pytest.raises(RuntimeError, match="does not hash to"):
        pull_uncached(caller, "report")
    assert not (caller / "history.csv").exists() and not list(caller.glob(".history.csv*"))
    shutil.rmtree(worker)
