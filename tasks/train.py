"""Prefect task `train`: in process through DVC, or dispatched to the GPU work pool.

Resumable, not restartable: the train stage keeps Keras `BackupAndRestore` state
under `paths.cache_dir` (not a DVC output, so DVC does not delete it before a
rerun). A killed attempt therefore continues from its last finished epoch when
Prefect retries the task.

GPU dispatch (`train_on_gpu`) runs the `medclf-train` deployment on the GPU pool
with `run_deployment`. The GPU worker shares nothing with this machine except the
DVC remote and the Prefect API, so the stage's outputs travel through the DVC remote
and its `dvc.lock` entry through the API:

1. here: the inputs are pushed to the DVC remote; the run gets this checkout's
   `params.yaml` and `dvc.lock`;
2. the worker pulls the inputs by hash, runs the very same `dvc repro --single-item train`,
   pushes every output to the DVC remote (`cache: false` ones too, as objects named by their
   dvc.lock md5: `push_uncached`), and returns its `dvc.lock` entry for `train` (the
   structured artifact `medclf-train-lock`: JSON, no text to parse);
3. here: the entry is written into `dvc.lock`, the outputs are pulled by the hashes it names,
   and DVC must then agree that `train` is up to date, which proves the worker ran the same
   code on the same inputs and params.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from medclf.config import Settings
from tasks.common import (
    UNCHANGED,
    StageFailed,
    StageOutcome,
    artifact_path,
    describe_status,
    dvc_status,
    lock_entry,
    merge_lock_entry,
    plan,
    stage_target,
    stage_task,
    transient_only,
)
from tasks.push import dvc_push

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

LOCK_ARTIFACT_KEY = "medclf-train-lock"
LOCK_ARTIFACT_TYPE = "dvc-lock-entry"
START_TIMEOUT_ENV = "MEDCLF_GPU_START_TIMEOUT_S"

train = stage_task("train", "Train the classifier (head, then fine-tune); resumes from its backup on retry.")


def retries(settings: Settings) -> int:
    """Two more attempts: each resumes from the last finished epoch (BackupAndRestore)."""
    return 2


def uncached_outs(root: Path, stage: str) -> dict[str, str]:
    """The stage's `cache: false` outputs (reports, plots) as {path: md5 in dvc.lock}: `dvc push` skips them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        names = next(
            (
                [str(o.def_path) for o in st.outs if not o.use_cache]
                for st in repo.index.stages
                if getattr(st, "name", None) == stage
            ),
            [],
        )
    outs = {o["path"]: str(o.get("md5") or "") for o in (lock_entry(root, stage) or {}).get("outs") or []}
    found = {p: outs.get(p, "") for p in names}
    bad = [p for p, md5 in found.items() if not md5 or md5.endswith(".dir")]
    if bad:
        raise RuntimeError(
            f"'{stage}' outputs {bad}: a cache: false output must be one file recorded in dvc.lock "
            "to travel through the DVC remote; declare directories with cache: true"
        )
    return found


def _remote_odb(repo: Any) -> Any:
    return repo.cloud.get_remote_odb(None, "push")


def push_uncached(root: Path, stage: str) -> list[str]:
    """Upload the stage's `cache: false` outputs to the DVC remote as objects named by their dvc.lock md5."""
    from dvc.repo import Repo
    from dvc_objects.fs.local import LocalFileSystem

    outs = uncached_outs(root, stage)
    with Repo(str(root)) as repo:
        odb = _remote_odb(repo)
        for rel, md5 in outs.items():
            # dvc_objects ships py.typed but leaves `LocalFileSystem.__init__(self, fs=None, **kwargs)` unannotated
            odb.add(str(root / rel), LocalFileSystem(), md5)  # type: ignore[no-untyped-call]
    return sorted(outs)


def pull_uncached(root: Path, stage: str) -> list[str]:
    """Fetch the `cache: false` outputs dvc.lock names from the DVC remote, each checked against its md5."""
    from dvc.repo import Repo

    from medclf.infra.io import file_digest

    outs = uncached_outs(root, stage)
    with Repo(str(root)) as repo:
        odb = _remote_odb(repo)
        for rel, md5 in outs.items():
            dest = (root / rel).resolve()
            if not dest.is_relative_to(root.resolve()):
                raise RuntimeError(f"refusing to write {rel!r} from the GPU run: outside {root}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                odb.fs.get_file(odb.oid_to_path(md5), str(tmp))
                if file_digest(tmp, algo="md5") != md5:
                    raise RuntimeError(f"{rel}: the DVC remote's object {md5} does not hash to {md5}")
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
    return sorted(outs)


def publish_lock_entry(entry: dict[str, Any]) -> None:
    """The worker's half: its dvc.lock entry for `train`, as a structured (JSON) Prefect artifact."""
    from prefect.artifacts import Artifact

    Artifact(
        key=LOCK_ARTIFACT_KEY,
        type=LOCK_ARTIFACT_TYPE,
        data={"stage": "train", "entry": entry},
        description="dvc.lock entry of the train stage run on this worker",
    ).create()


def _remote_lock_entry(flow_run_id: Any) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[LOCK_ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    data = arts[-1].data if arts else None
    with contextlib.suppress(TypeError, ValueError):  # Prefect stores an artifact's data as JSON text
        data = json.loads(data) if isinstance(data, str) else data
    if not (isinstance(data, dict) and data.get("stage") == "train" and isinstance(data.get("entry"), dict)):
        raise StageFailed(
            "train",
            "RemoteRunFailed",
            f"GPU flow run {flow_run_id} finished without a '{LOCK_ARTIFACT_KEY}' artifact holding its dvc.lock entry",
            transient=False,
        )
    entry: dict[str, Any] = data["entry"]
    return entry


def _wait_for(flow_run_id: Any, deployment: str, start_timeout_s: float, poll_s: float = 2.0) -> Any:
    """Wait for the remote run to finish; give up (and cancel it) if no worker takes it in time.

    Without this, a deployment whose pool has no running worker would leave the flow
    waiting forever on a run that stays Scheduled.
    """
    from prefect import get_client
    from prefect.states import Cancelled

    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if run.state is not None and run.state.is_scheduled() and time.monotonic() - t0 > start_timeout_s:
                client.set_flow_run_state(flow_run_id, Cancelled(message="no GPU worker picked it up"), force=True)
                raise StageFailed(
                    "train",
                    "NoGpuWorker",
                    f"no worker picked up the run of '{deployment}' within "
                    f"{start_timeout_s:.0f} s (env {START_TIMEOUT_ENV}); start one: "
                    "`prefect worker start --pool medclf-gpu`",
                    transient=False,
                )
            time.sleep(poll_s)


def _train_on_gpu(deployment: str, project_dir: str = ".", force: bool = False) -> dict[str, Any]:
    from dvc.repo import Repo
    from prefect import get_run_logger
    from prefect.deployments import run_deployment
    from prefect.runtime import task_run

    from medclf.infra import catalog

    log = get_run_logger()
    root = Path(project_dir).resolve()
    t0 = time.perf_counter()
    attempt = task_run.run_count or 1
    reason = plan("train", root, force)
    if reason is None:
        return StageOutcome("train", "skipped", UNCHANGED, round(time.perf_counter() - t0, 2), attempt).to_dict()
    log.info("train: dispatching to deployment '%s' (%s); pushing inputs to the DVC remote first", deployment, reason)
    dvc_push(root, logger=log)
    lock = root / "dvc.lock"
    # a sync task: `run_deployment` (async_dispatch) returns the FlowRun itself here, never a coroutine
    run = cast(
        "FlowRun",
        run_deployment(
            deployment,
            parameters={
                "params_yaml": (root / "params.yaml").read_text(),
                "dvc_lock": lock.read_text() if lock.exists() else None,
                "force": force,
            },
            timeout=0,
        ),
    )
    log.info("train: GPU flow run '%s' created; waiting for a worker of the deployment's pool", run.name)
    run = _wait_for(run.id, deployment, float(os.environ.get(START_TIMEOUT_ENV, "1800")))
    state = run.state
    if state is None or not state.is_completed():
        # crashed (worker lost, pod evicted): another attempt may land on a healthy worker; a failed run
        # has already had its own retries on the worker
        raise StageFailed(
            "train",
            "RemoteRunFailed",
            f"GPU flow run '{run.name}' on '{deployment}' ended "
            f"{state.type.value if state else '?'}: {state.message if state else 'no state'}",
            transient=bool(state and state.is_crashed()),
        )
    merge_lock_entry(root, "train", _remote_lock_entry(run.id))
    with Repo(str(root)) as repo:
        repo.pull(targets=[stage_target(root, "train")])
    pull_uncached(root, "train")
    left = dvc_status("train", root)
    if left:
        raise StageFailed(
            "train",
            "RemoteMismatch",
            "the GPU run's dvc.lock entry does not match this checkout "
            f"({describe_status(left)}); is the worker on the same commit?",
            transient=False,
        )
    run_file = artifact_path(root, catalog.TRAIN_RUN)
    result = catalog.load_file(run_file, "json") if run_file is not None and run_file.exists() else None
    return StageOutcome(
        "train",
        "ran",
        f"{reason} (on GPU deployment '{deployment}', flow run '{run.name}')",
        round(time.perf_counter() - t0, 2),
        attempt,
        result=result,
    ).to_dict()


def _make_gpu_task() -> Any:
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(
        name="train-on-gpu",
        cache_policy=NO_CACHE,
        persist_result=False,
        retry_condition_fn=transient_only,
        description="Run the train stage on the GPU work pool (run_deployment); its outputs come back "
        "through the DVC remote, its dvc.lock entry through the Prefect API.",
    )(_train_on_gpu)


train_on_gpu = _make_gpu_task()
