"""Two runs on one checkout cannot collide (issue 14, point 2; docs/ORCHESTRATION.md "Concurrent runs").

Real processes and real flocks: a holder process (a flow's stand-in, `medclf.infra.lock.project_lock`), the real
`medclf ingest` on a tiny synthetic project, SIGKILL, and the real flow on the test Prefect API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from medclf.cli import EXIT_OK, EXIT_STAGE, EXIT_TEMPFAIL, error_record
from medclf.infra import catalog
from medclf.infra.lock import (
    LOCK_ENV,
    TIMEOUT_ENV,
    LockBusy,
    LockError,
    held_env,
    project_lock,
    read_record,
    timeout,
)
from tests.conftest import stop_process, write_params

MEDCLF = str(Path(sys.executable).with_name("medclf"))
# A holder (what a flow run does, or a stage with "stage"): takes the lock, prints its token, holds it until
# a line arrives on stdin (or it is killed). Only medclf.infra.lock is imported: it starts in a fraction of a second.
HOLDER = """
import os, sys
from types import SimpleNamespace
from medclf.infra.lock import project_lock
with project_lock(SimpleNamespace(cache_dir=sys.argv[1]), sys.argv[2], wait=0,
                  hold_stage=sys.argv[3] == "stage") as token:
    print(token, flush=True)
    sys.stdin.readline()
"""
# Makes the stage process that won the lock pause once its stage is done, before it writes its result file
# (the last thing it does under the lock), until the test creates the file named by MEDCLF_TEST_PAUSE.
PAUSE_HOOK = """
import os, time
if os.environ.get("MEDCLF_TEST_PAUSE"):
    import medclf.cli as cli
    _write = cli.write_result
    def write_result(path, record):
        if record.get("exit_code") == 0:
            flag = os.environ["MEDCLF_TEST_PAUSE"]
            open(f"{flag}.{os.getpid()}.reached", "w").close()
            while not os.path.exists(flag):
                time.sleep(0.02)
        _write(path, record)
    cli.write_result = write_result
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (LOCK_ENV, TIMEOUT_ENV)}
    return {**env, **extra}


def _paths(tmp: Path) -> SimpleNamespace:
    return SimpleNamespace(cache_dir=tmp / ".cache")


def _take(tmp: Path, what: str, *, wait: float, hold_stage: bool = True) -> None:
    with project_lock(_paths(tmp), what, wait=wait, hold_stage=hold_stage):  # type: ignore[arg-type]
        pass


def _ingest(params: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MEDCLF, "--params", str(params), "ingest"],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file of the project (outputs, reports, result files), by content and mtime; the lock files aside."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "locks" not in p.parts
    }


@contextlib.contextmanager
def holder(
    cache_dir: Path, what: str = "test holder", *, stage: bool = False, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(cache_dir), what, "stage" if stage else "flow"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env or _env(),
    )
    try:
        assert proc.stdout is not None
        token = proc.stdout.readline().strip()
        assert token, f"the holder did not get the lock (rc {proc.wait(30)})"
        yield proc, token
    finally:
        stop_process(proc)


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0


def test_a_holders_child_runs_and_any_other_stage_is_refused_at_once_naming_the_holder(tmp_path):
    """(1) While a run holds the project, `medclf ingest` by hand (no token, or another run's) exits 75 at once,
    naming the holder's pid, host, what and since and the lock file, and touches no file: not the outputs, not
    the holder's result file. (2) The holder's own stage process, given its token the way the flow gives it
    (tasks.env.venv_env), runs."""
    from tasks.env import venv_env

    params = write_params(tmp_path)
    lock_file = catalog.PROJECT_LOCK.path(_paths(tmp_path))  # type: ignore[arg-type]
    with project_lock(_paths(tmp_path), "test holder (in-process flow)", wait=0, hold_stage=False) as token:
        assert token and held_env() == {LOCK_ENV: token}
        child = subprocess.run(
            [MEDCLF, "--params", str(params), "ingest"],
            env=venv_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == EXIT_OK, child.stderr[-2000:]
        done = json.loads(catalog.STAGE_RESULT.path(_paths(tmp_path), stage="ingest").read_text())  # type: ignore[arg-type]
        assert done["exit_code"] == EXIT_OK and done["result"]["images"] == 80, done
        record = read_record(lock_file)
        assert record["token"] == token and record["pid"] == os.getpid()  # the child left the holder's record
        before = _snapshot(tmp_path)
        for env in ({}, {LOCK_ENV: "another-runs-token"}):
            refused = _ingest(params, **env)
            assert refused.returncode == EXIT_TEMPFAIL, (env, refused.stderr[-2000:])
            assert (
                f"medclf ingest: LockBusy: medclf ingest cannot start: the project is locked by test holder "
                f"(in-process flow) (pid {os.getpid()} on {socket.gethostname()}, since {record['since']}); "
                f"lock file {lock_file}. Waited 0 s"
            ) in refused.stderr, refused.stderr[-2000:]
            assert _snapshot(tmp_path) == before  # outputs, reports and the holder's result file untouched
    assert held_env() == {} and read_record(lock_file) == {}  # released: the record is cleared


def test_sigkill_of_the_holder_leaves_no_stale_lock_but_a_stage_outliving_its_flow_still_holds(tmp_path, monkeypatch):
    """(3) The kernel drops a killed holder's flock: the next run gets the project at once, and a process
    still carrying the dead holder's token takes the lock itself instead of running unlocked. A stage whose
    flow was killed keeps holding the stage lock: the next run is refused, naming that stage."""
    monkeypatch.delenv(LOCK_ENV, raising=False)
    cache = tmp_path / ".cache"
    with holder(cache, stage=True) as (proc, token):
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        assert read_record(catalog.PROJECT_LOCK.path(_paths(tmp_path)))["pid"] == proc.pid  # type: ignore[arg-type]
        t0 = time.monotonic()
        with project_lock(_paths(tmp_path), "next run", wait=0) as mine:  # the dead holder's record means nothing
            assert mine and mine != token
        assert time.monotonic() - t0 < 1.0
        monkeypatch.setenv(LOCK_ENV, token)
        with project_lock(_paths(tmp_path), "a child of the killed run", wait=0) as own:
            assert own is not None and own != token  # it holds the lock itself, not "under" a dead holder
        monkeypatch.delenv(LOCK_ENV)
    # a flow (holder) and its stage (a second process under its token); the flow is killed, the stage runs on
    with holder(cache, "flow run f") as (flow, token):
        with holder(cache, "medclf train (stage of flow run f)", stage=True, env=_env(**{LOCK_ENV: token})) as (
            stage,
            nested,
        ):
            assert nested == "None"  # it ran under the flow's lock and did not take the project lock
            flow.send_signal(signal.SIGKILL)
            flow.wait(30)
            with pytest.raises(LockBusy, match=rf"locked by medclf train \(stage of flow run f\) \(pid {stage.pid} "):
                _take(tmp_path, "next flow", wait=0, hold_stage=False)
            release(stage)
        with project_lock(_paths(tmp_path), "next flow", wait=0, hold_stage=False) as mine:
            assert mine is not None


def test_a_waiting_run_gets_the_lock_once_the_holder_releases(tmp_path, monkeypatch):
    """(4) With MEDCLF_LOCK_TIMEOUT, the real `medclf ingest` waits (and says for whom), and runs once the holder
    releases; a wait that expires is a LockBusy saying how long it waited. LockBusy is transient (exit 75), a
    bad MEDCLF_LOCK_TIMEOUT is a deterministic error (exit 3)."""
    params = write_params(tmp_path)
    with holder(tmp_path / ".cache", "flow run w") as (proc, _token):
        t0 = time.monotonic()
        with pytest.raises(LockBusy, match=r"locked by flow run w .* Waited 0 s") as busy:
            _take(tmp_path, "impatient", wait=0.3)
        assert time.monotonic() - t0 >= 0.3 and busy.value.waited >= 0.3
        waiting = subprocess.Popen(
            [MEDCLF, "--params", str(params), "ingest"],
            env=_env(**{TIMEOUT_ENV: "30"}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stderr is not None
            lines = []
            for line in waiting.stderr:  # released only once the stage says it waits
                lines.append(line)
                if "waiting up to 30 s for the project lock" in line:
                    break
            assert f"held by flow run w (pid {proc.pid} on " in "".join(lines), "".join(lines)[-2000:]
            assert waiting.poll() is None
            release(proc)
            rest = waiting.stderr.read()
            assert waiting.wait(120) == EXIT_OK, rest[-2000:]
        finally:
            stop_process(waiting)
    assert (tmp_path / "data/ingest/manifest.parquet").exists()
    err = error_record("ingest", busy.value)
    assert err["transient"] is True and err["exit_code"] == EXIT_TEMPFAIL
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(LockError, match="MEDCLF_LOCK_TIMEOUT='soon' is not a number") as bad:
        timeout(0)
    assert error_record("ingest", bad.value)["exit_code"] == EXIT_STAGE


def test_a_loser_in_the_holders_first_instant_still_names_the_holder(tmp_path):
    """The holder takes the flock, then writes its record: a run refused in between (CI saw it, two ingests
    started at once) read an empty record and said "another process (no record yet)". The loser now re-reads
    an empty record for a moment, so the error names the holder."""
    import fcntl
    import threading

    lock_file = catalog.PROJECT_LOCK.path(_paths(tmp_path))  # type: ignore[arg-type]
    lock_file.parent.mkdir(parents=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken, no record yet: the holder's first instant
    late = threading.Timer(
        0.3,
        lambda: os.pwrite(fd, json.dumps({"what": "slow writer", "pid": 4242, "host": "h", "since": "s"}).encode(), 0),
    )
    late.start()
    try:
        with pytest.raises(LockBusy, match=r"locked by slow writer \(pid 4242 on h, since s\)"):
            _take(tmp_path, "loser", wait=0)
    finally:
        late.join()
        os.close(fd)


def test_two_ingests_started_at_once_exactly_one_runs_and_its_output_is_whole(tmp_path):
    """Two real `medclf ingest` started together on one project: the one that gets the lock holds it until its
    result file is written (it pauses there), the other is refused with exit 75 meanwhile, and so is a third
    started during the pause; the outputs, the summary and the result file then all describe the one run."""
    import numpy as np
    import pandas as pd

    params = write_params(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    flag = tmp_path / "go"
    env = _env(
        MEDCLF_TEST_PAUSE=str(flag),
        PYTHONPATH=os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
    )
    procs = [
        subprocess.Popen(
            [MEDCLF, "--params", str(params), "ingest"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            reached = list(tmp_path.glob("go.*.reached"))
            assert len(reached) <= 1, "both ingests ran their stage at the same time"
            time.sleep(0.05)
        (loser,) = [p for p in procs if p.poll() is not None]
        (winner,) = [p for p in procs if p is not loser]
        said = loser.communicate()[1]
        assert loser.returncode == EXIT_TEMPFAIL, said[-2000:]
        assert f"locked by medclf ingest (pid {winner.pid} " in said, said[-2000:]
        while time.monotonic() < deadline and winner.poll() is None and not list(tmp_path.glob("go.*.reached")):
            time.sleep(0.05)
        assert [p.name for p in tmp_path.glob("go.*.reached")] == [f"go.{winner.pid}.reached"]
        assert winner.poll() is None  # paused before its result file, still holding the lock:
        before = _snapshot(tmp_path)
        late = _ingest(params)  # a third one, started now, is refused too and changes nothing
        assert late.returncode == EXIT_TEMPFAIL and f"(pid {winner.pid} " in late.stderr, late.stderr[-2000:]
        assert _snapshot(tmp_path) == before
        flag.touch()
        assert winner.wait(120) == EXIT_OK, winner.communicate()[1][-2000:]
    finally:
        for p in procs:
            stop_process(p)
    paths = _paths(tmp_path)
    done = json.loads(catalog.STAGE_RESULT.path(paths, stage="ingest").read_text())  # type: ignore[arg-type]
    manifest = pd.read_parquet(tmp_path / "data/ingest/manifest.parquet")
    labels = {s: np.load(tmp_path / f"data/ingest/{s}_labels.npy") for s in ("train", "val", "test")}
    summary = json.loads((tmp_path / "reports/ingest/summary.json").read_text())
    assert (
        done["exit_code"] == EXIT_OK
        and done["result"]["images"] == summary["images"] == len(manifest) == sum(len(v) for v in labels.values()) == 80
    ), (done, summary)
    assert not list(tmp_path.glob("data/.*staging*")) and not list(tmp_path.glob("data/ingest/.*"))


def test_a_flow_on_a_held_project_fails_naming_the_holder(tmp_path, prefect_api, monkeypatch):
    """The retrain flow takes the project lock for its whole run: on a project held by a `medclf` stage it
    waits MEDCLF_LOCK_TIMEOUT, then fails, naming the holder, before any stage ran."""
    from flows.retrain import retrain

    write_params(tmp_path)
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    with holder(tmp_path / ".cache", "medclf train", stage=True) as (proc, _token):
        state = retrain(project_dir=str(tmp_path), until="ingest", push=False, return_state=True)
    assert state.is_failed()
    assert (
        f"LockBusy: flow run {state.state_details.flow_run_id} (medclf-retrain) cannot start: the project is "
        f"locked by medclf train (pid {proc.pid} " in state.message
    ), state.message
    assert not (tmp_path / "data/ingest").exists()
