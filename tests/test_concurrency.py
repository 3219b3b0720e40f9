"""Concurrent runs cannot collide (issue 14, points 2 and 4; docs/ORCHESTRATION.md "Concurrent runs").

One checkout (tiny synthetic phantoms, its DVC remote on moto S3, the session MLflow server) and two tests
that run in order on it, with one training between them (the suite's time is short on 2 cores):

1. four retrains of the same input, started together: two manual `python -m flows.retrain` processes, and a
   run of the scheduled deployment `medclf-retrain/weekly` (prefect.yaml, deployed by the real
   `prefect deploy --all`) with a manual run of it, on a process worker with two slots. One trains, on the
   GPU pool's CPU stand-in: a second process worker in a separate clone that shares only the DVC remote on
   moto and the Prefect API. The others wait (Prefect's deployment limit, the project lock) and find
   nothing stale. One version.
2. two concurrent `medclf register` of that training run, from two copies of the checkout (the project lock
   is per checkout, so only the registry can settle it): still one version.

Two fast tests check the pieces: the GPU worker's flow holds its checkout's lock, and the registry helpers
keep the lowest version of a model and read a version's aliases. Real processes, real servers: no mocks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, stop_process
from tests.test_flow import (
    BIN,
    DVC_KEY,
    DVC_SECRET,
    add_s3_remote,
    deploy_all,
    digests,
    make_checkout,
    model_versions,
    run_cmd,
    s3_client,
    s3_keys,
    set_params,
)

pytestmark = pytest.mark.slow

GPU_POOL, GPU_DEPLOYMENT = "medclf-gpu-test", "medclf-train/gpu-test"
NO_CHANGE = "no change, nothing retrained"
WAITING = "waiting up to"


def _env(**extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k not in ("MEDCLF_GPU_DEPLOYMENT", "MEDCLF_PROJECT_LOCK")}
    return {
        **env,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PATH": f"{BIN}{os.pathsep}{env['PATH']}",
        "MEDCLF_LOCK_TIMEOUT": "900",
        **extra,
    }


def _flow_runs(flow: str, project_dir: Path | None = None) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])))
    return [r for r in runs if project_dir is None or r.parameters.get("project_dir") == str(project_dir)]


def _stage_span(flow_run_id: Any) -> tuple[Any, Any]:
    """(first start, last end) of a flow run's task runs: when it executed stages."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert tasks and all(t.start_time and t.end_time for t in tasks), tasks
    return min(t.start_time for t in tasks), max(t.end_time for t in tasks)


def _consistent(checkout: Path) -> dict[str, Any]:
    """dvc.lock agrees with every output (DVC rehashes them: nothing half-written), and the model that was
    evaluated and registered is the model file on disk. Returns register.json."""
    from medclf.infra.io import file_digest

    assert json.loads(run_cmd(checkout, "dvc", "status", "--json") or "{}") == {}  # every stage, every output
    lock = yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"ingest", "validate", "augment", "train", "evaluate", "register"}
    gates = json.loads((checkout / "reports/gates.json").read_text())
    assert gates["passed"] and gates["model_sha256"] == file_digest(checkout / "models/model.keras")
    manifest = yaml.safe_load((checkout / "reports/ingest/summary.json").read_text())
    import pandas as pd

    assert len(pd.read_parquet(checkout / "data/ingest/manifest.parquet")) == manifest["images"]
    return json.loads((checkout / "reports/register.json").read_text())


@pytest.fixture(scope="module")
def shared(tmp_path_factory, s3_server, mlflow_server, prefect_api):
    """A checkout whose DVC remote is a bucket on moto (credentials in .dvc/config.local only)."""
    tmp = tmp_path_factory.mktemp("concurrency")
    bucket = f"medclf-conc-{uuid.uuid4().hex[:8]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    model = f"conc-{uuid.uuid4().hex[:8]}"
    checkout = make_checkout(tmp / "checkout", {"register": {"model_name": model}})
    add_s3_remote(checkout, f"s3://{bucket}/dvcstore", s3_server)
    run_cmd(checkout, "git", "add", ".dvc/config")
    run_cmd(checkout, "git", "commit", "-qm", "S3 DVC remote")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.delenv("MEDCLF_GPU_DEPLOYMENT", raising=False)
        yield {
            "checkout": checkout,
            "model": model,
            "mlflow": mlflow_server,
            "tmp": tmp,
            "s3": s3_server,
            "bucket": bucket,
        }


def _deploy_gpu_stand_in(clone: Path) -> None:
    """The train deployment (flows/train_remote.py) on a process pool: a CPU stand-in for `medclf-train/gpu`
    (prefect.yaml puts that on a Kubernetes pool), running in its own clone of the project."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from flows.train_remote import train_remote

    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=GPU_POOL, type="process"))
        flow_id = client.create_flow(train_remote)
        client.create_deployment(
            flow_id,
            "gpu-test",
            entrypoint="flows/train_remote.py:train_remote",
            work_pool_name=GPU_POOL,
            parameters={"project_dir": str(clone)},
            concurrency_limit=1,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        )


def _worker(pool: str, limit: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--limit",
                str(limit),
            ],
            cwd=log.parent,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_final(ids: list[Any], timeout: float) -> dict[Any, Any]:
    from prefect import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = {i: client.read_flow_run(i) for i in ids}
            if all(r.state is not None and r.state.is_final() for r in runs.values()) or time.time() > deadline:
                return runs
            time.sleep(1)


def _held_by(log: str) -> set[str]:
    """The flow runs a retrain's log says it waited for (the project lock's holder record)."""
    return set(re.findall(r"held by flow run ([0-9a-f-]{36})", log))


def test_four_retrains_at_once_train_once_on_the_gpu_pool(shared):
    """Four retrains of one checkout with the same input, started together:

    - two manual `python -m flows.retrain` processes;
    - a run of `medclf-retrain/weekly` as its schedule creates it, and a manual run of the same deployment,
      both on a process worker of `medclf-cpu` with two slots (prefect.yaml, deployed by `prefect deploy --all`).

    Exactly one trains, through `run_deployment` of the train deployment on the GPU pool's CPU stand-in (a
    second process worker, in a separate clone that shares only the DVC remote on moto S3 and the Prefect
    API); the three others wait and then find nothing stale. The layers: Prefect's deployment limit
    (`concurrency_limit: 1`) holds the second deployment run in AwaitingConcurrencySlot; the project lock
    makes everything else wait, and each waiter names the flow run it waited for. One version; dvc.lock
    agrees with every output; no two runs' stages overlap."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    checkout, tmp = shared["checkout"], shared["tmp"]
    deployments = deploy_all()  # the real `prefect deploy --all` of prefect.yaml
    assert deployments["medclf-retrain/weekly"].global_concurrency_limit.limit == 1
    clone = tmp / "gpu-clone"
    run_cmd(tmp, "git", "clone", "-q", str(checkout), str(clone))
    run_cmd(clone, "dvc", "remote", "modify", "--local", "s3store", "access_key_id", DVC_KEY)
    run_cmd(clone, "dvc", "remote", "modify", "--local", "s3store", "secret_access_key", DVC_SECRET)
    _deploy_gpu_stand_in(clone)
    env = _env(
        MLFLOW_TRACKING_URI=shared["mlflow"], PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1"
    )
    cpu = _worker("medclf-cpu", 2, tmp / "cpu-worker.log", env)
    gpu = _worker(GPU_POOL, 1, tmp / "gpu-worker.log", env)
    manual: list[subprocess.Popen] = []
    try:
        params = {
            "project_dir": str(checkout),
            "gpu_deployment": GPU_DEPLOYMENT,
            "push": False,
            "retry_delay_seconds": 0.2,
        }
        scheduled = run_deployment("medclf-retrain/weekly", timeout=0, parameters=params, tags=["scheduled"])
        by_hand = run_deployment("medclf-retrain/weekly", timeout=0, parameters=params, tags=["manual"])
        for i in (1, 2):
            with open(tmp / f"manual{i}.log", "w") as log:
                manual.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "flows.retrain",
                            "--project-dir",
                            str(checkout),
                            "--no-push",
                            "--gpu-deployment",
                            GPU_DEPLOYMENT,
                            "--retry-delay",
                            "0.2",
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        codes = [p.wait(900) for p in manual]
        deployed = _wait_final([scheduled.id, by_hand.id], 900)
    finally:
        for p in (*manual, cpu, gpu):
            stop_process(p)
    logs = {f"manual{i}": (tmp / f"manual{i}.log").read_text() for i in (1, 2)}
    logs |= {w: (tmp / f"{w}-worker.log").read_text() for w in ("cpu", "gpu")}
    tails = "\n----\n".join(f"{k}:\n{v[-2500:]}" for k, v in logs.items())
    assert codes == [0, 0] and all(r.state.is_completed() for r in deployed.values()), tails
    runs = {r.id: r for r in _flow_runs("medclf-retrain", checkout)}
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs.values()), [r.state for r in runs.values()]
    # exactly one retrained; the three others found nothing stale
    (trainer,) = [r for r in runs.values() if r.state.message != NO_CHANGE]
    assert "challenger v1" in trainer.state.message, trainer.state.message
    # serialised: no two runs executed stages at the same time
    spans = sorted(_stage_span(i) for i in runs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
    assert _stage_span(trainer.id) == spans[0]
    # which layer held whom: Prefect's deployment limit held one deployment run (it never ran while the other
    # deployment run held the slot); every manual process that did not start first waited for the project
    # lock and named a real flow run as the holder
    with get_client(sync_client=True) as client:
        held = [i for i in deployed if "AwaitingConcurrencySlot" in {s.name for s in client.read_flow_run_states(i)}]
    assert len(held) >= 1, "the deployment concurrency limit never held a run"
    cli = [r for r in runs.values() if r.id not in deployed]
    waited = [logs[n] for n in ("manual1", "manual2") if WAITING in logs[n]]
    assert len(cli) == 2 and len(waited) == sum(r.id != trainer.id for r in cli), tails
    assert all(_held_by(log) and _held_by(log) <= {str(i) for i in runs} for log in waited), waited
    assert {r.work_pool_name for r in deployed.values()} == {"medclf-cpu"}
    # training ran on the GPU pool's worker, in the clone, and came back through the DVC remote on S3
    from tests.test_flow import task_runs

    assert task_runs(trainer.id)["train-on-gpu"].state.is_completed()  # not in-process training
    (remote,) = _flow_runs("medclf-train", clone)
    assert remote.state.is_completed() and remote.work_pool_name == GPU_POOL, remote.state
    assert remote.parameters["params_yaml"] == (checkout / "params.yaml").read_text()
    assert (clone / "models/model.keras").read_bytes() == (checkout / "models/model.keras").read_bytes()
    assert digests(clone / "reports/train") == digests(checkout / "reports/train")
    assert s3_keys(s3_client(shared["s3"]), shared["bucket"], "dvcstore/")
    # one version for this input; dvc.lock, the outputs and the registry agree
    reg = _consistent(checkout)
    versions = model_versions(shared["mlflow"], shared["model"])
    assert [int(v.version) for v in versions] == [reg["version"]] and reg["alias"] == "challenger"
    assert versions[0].run_id == json.loads((checkout / "models/train_run.json").read_text())["run_id"]
    shared["v1"] = versions[0]


REGISTER_BARRIER = """
import os, time
if os.environ.get("MEDCLF_TEST_REGISTER_BARRIER"):
    import medclf.release.versions as versions
    _find_version = versions.find_version
    def _barrier(*args, **kwargs):
        found = _find_version(*args, **kwargs)
        flag = os.environ["MEDCLF_TEST_REGISTER_BARRIER"]
        open(f"{flag}.{os.getpid()}", "w").close()
        t0 = time.time()  # both processes have looked for a version before either creates one
        while len([f for f in os.listdir(os.path.dirname(flag)) if f.startswith(os.path.basename(flag))]) < 2:
            if time.time() - t0 > 120:
                raise SystemExit("register barrier: the other process never came")
            time.sleep(0.02)
        return found
    versions.find_version = _barrier
"""


def test_concurrent_register_of_one_training_run_keeps_one_version(shared, tmp_path):
    """`medclf register` of the same training run, from two checkouts at once (the project lock does not
    reach across checkouts): both look for a version before either creates one (a test hook holds them at
    that point), both create one, and the registry keeps exactly one; both report it."""
    if "v1" not in shared:
        pytest.skip("needs the four retrains")
    model = f"conc-reg-{uuid.uuid4().hex[:8]}"  # a fresh name: nothing is registered for this run under it
    copies = []
    for name in ("a", "b"):
        copy = tmp_path / name
        shutil.copytree(shared["checkout"], copy, symlinks=True, ignore=shutil.ignore_patterns(".cache"))
        set_params(copy, {"register": {"model_name": model}})
        copies.append(copy)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(REGISTER_BARRIER)
    barrier = tmp_path / "barrier" / "reached"
    barrier.parent.mkdir()
    env = _env(
        MLFLOW_TRACKING_URI=shared["mlflow"],
        MEDCLF_TEST_REGISTER_BARRIER=str(barrier),
        PYTHONPATH=os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
    )
    procs = [
        subprocess.Popen(
            [str(BIN / "medclf"), "register"],
            cwd=copy,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for copy in copies
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop_process(p)
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    assert len(list(barrier.parent.iterdir())) == 2  # both passed the hook: both had found no version
    versions = model_versions(shared["mlflow"], model)
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    (mv,) = versions
    regs = [json.loads((copy / "reports/register.json").read_text()) for copy in copies]
    assert {r["version"] for r in regs} == {int(mv.version)}
    assert sorted(r["created"] for r in regs) == [False, True], regs
    from mlflow import MlflowClient

    cl = MlflowClient(tracking_uri=shared["mlflow"])
    assert cl.get_model_version_by_alias(model, "challenger").version == mv.version
    assert mv.run_id == shared["v1"].run_id
    # the loser's duplicate and its logged models are gone: only the survivor's models remain in the run
    # (with the pair that the flow's own registration logged under the first model name)
    logged = cl.search_logged_models(
        experiment_ids=[cl.get_run(mv.run_id).info.experiment_id], filter_string=f"source_run_id = '{mv.run_id}'"
    )
    assert sorted(m.name for m in logged) == sorted(["keras_model", "medclf_pyfunc"] * 2), [m.name for m in logged]


def test_the_gpu_worker_flow_holds_its_checkout(tmp_path, prefect_api, monkeypatch):
    """`medclf-train` (flows/train_remote.py) takes its checkout's project lock before it writes the caller's
    params.yaml and dvc.lock there: while another run holds that checkout it waits, then fails naming the holder,
    and has touched nothing. (A served `--serve` worker has no Prefect limit of its own but this.)"""
    from flows.train_remote import train_remote
    from medclf.config import load_settings
    from medclf.infra.lock import project_lock
    from tests.conftest import write_params

    params = write_params(tmp_path)
    before = params.read_bytes()
    monkeypatch.setenv("MEDCLF_LOCK_TIMEOUT", "0")
    monkeypatch.delenv("MEDCLF_PROJECT_LOCK", raising=False)
    with project_lock(load_settings(params).paths, "flow run holder-1 (medclf-train)", wait=0):
        state = train_remote(
            params_yaml="caller: params\n",
            dvc_lock="schema: '2.0'\n",
            project_dir=str(tmp_path),
            pull=False,
            push=False,
            return_state=True,
        )
    assert state.is_failed() and "LockBusy" in (state.message or "") + repr(state.data), state.message
    assert "holder-1" in (state.message or ""), state.message
    assert params.read_bytes() == before and not (tmp_path / "dvc.lock").exists()


def test_the_registry_keeps_the_lowest_version_of_a_model_and_reads_its_aliases(mlflow_server):
    """The pieces `medclf register` settles a race with, on a real MLflow server: of two versions of the same
    model (file sha256 + training run) the lowest number is the one to keep; and a version found for reuse comes
    with its aliases (MLflow's search returns none), so a reused champion is not given the challenger alias."""
    import mlflow

    from medclf.release.versions import find_version, first_of_model

    cl, name = mlflow.MlflowClient(mlflow_server, mlflow_server), f"race-{uuid.uuid4().hex[:8]}"
    cl.create_registered_model(name)
    run = cl.create_run(cl.create_experiment(name)).info.run_id
    v1, v2 = (
        cl.create_model_version(name, source=f"runs:/{run}/m", run_id=run, tags={"model_sha256": "abc"})
        for _ in range(2)
    )
    cl.create_model_version(name, source=f"runs:/{run}/m", run_id=run, tags={"model_sha256": "other"})
    assert first_of_model(cl, name, run, "abc", None).version == v1.version != v2.version
    assert first_of_model(cl, name, run, "nothing", None) is None
    cl.set_registered_model_alias(name, "champion", v1.version)
    assert find_version(cl, name, run, "abc").aliases == ["champion"]
