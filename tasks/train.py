"""Prefect task `train`: in process through DVC, or dispatched to the GPU work pool.

Resumable, not restartable: the train stage keeps Keras `BackupAndRestore` state
under `paths.cache_dir` (not a DVC output, so DVC does not delete it before a
rerun). A killed attempt therefore continues from its last finished epoch when
Prefect retries the task.

GPU dispatch (`train_on_gpu`) runs the `medclf-train` deployment on the GPU pool
with `run_deployment`. The GPU worker shares nothing with this machine except the
DVC remote and the Prefect API, so: the inputs are pushed first; the worker gets
this checkout's `params.yaml` and `dvc.lock`, pulls the inputs by hash, runs the
very same `dvc repro --single-item train`, pushes the model, and publishes its
`dvc.lock` entry for `train` as an artifact. Here that entry is merged into
`dvc.lock` and the model pulled, and DVC must then agree that `train` is up to
date, which proves the worker ran the same code on the same inputs and params.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from medclf.config import Settings
from tasks.common import (
    StageFailed,
    StageOutcome,
    describe_status,
    dvc_push,
    dvc_status,
    in_lock,
    stage_target,
    stage_task,
)

LOCK_ARTIFACT_KEY = "medclf-train-lock"
START_TIMEOUT_ENV = "MEDCLF_GPU_START_TIMEOUT_S"
MAX_PACKED_BYTES = 10 * 2**20

train = stage_task("train", "Train the classifier (head, then fine-tune); resumes from its backup on retry.")


def retries(settings: Settings) -> int:
    """Two more attempts: each resumes from the last finished epoch (BackupAndRestore)."""
    return 2


def lock_entry(root: Path, stage: str) -> dict[str, Any] | None:
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    return ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(stage)


def merge_lock_entry(root: Path, stage: str, entry: dict[str, Any]) -> None:
    """Put one stage's record, produced elsewhere, into this checkout's dvc.lock (atomically)."""
    import yaml

    from medclf.io import atomic_file

    lock = root / "dvc.lock"
    data = (yaml.safe_load(lock.read_text()) if lock.exists() else None) or {"schema": "2.0", "stages": {}}
    data.setdefault("stages", {})[stage] = entry
    with atomic_file(lock) as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def uncached_outs(root: Path, stage: str) -> list[str]:
    """The stage's `cache: false` outputs (reports, plots): DVC never pushes these to a remote."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for st in repo.index.stages:
            if getattr(st, "name", None) == stage:
                return [str(o.def_path) for o in st.outs if not o.use_cache]
    return []


def pack_files(root: Path, rel_paths: list[str]) -> dict[str, str]:
    """Small report files as {relative path: base64}, to travel inside the lock artifact."""
    out: dict[str, str] = {}
    for rel in rel_paths:
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
        for f in files:
            out[f.relative_to(root).as_posix()] = base64.b64encode(f.read_bytes()).decode()
    size = sum(len(v) for v in out.values())
    if size > MAX_PACKED_BYTES:
        raise RuntimeError(f"the train stage's cache: false outputs {sorted(out)} total {size} bytes (base64), "
                           f"above {MAX_PACKED_BYTES}; declare large outputs with cache: true in dvc.yaml")
    return out


def unpack_files(root: Path, files: dict[str, str]) -> None:
    from medclf.io import atomic_file

    base = root.resolve()
    for rel, b64 in files.items():
        dest = (base / rel).resolve()
        if not dest.is_relative_to(base) or Path(rel).is_absolute():
            raise RuntimeError(f"refusing to write {rel!r} from the GPU run: outside {base}")
        with atomic_file(dest, "wb") as fh:
            fh.write(base64.b64decode(b64))


def lock_markdown(entry: dict[str, Any], files: dict[str, str] | None = None) -> str:
    """The artifact the GPU run leaves: its dvc.lock entry (yaml) and its uncached outputs (json)."""
    import yaml

    md = "# dvc.lock entry of `train`\n\n```yaml\n" + yaml.safe_dump(entry, sort_keys=False) + "```\n"
    if files:
        md += "\n## cache: false outputs (base64)\n\n```json\n" + json.dumps(files) + "\n```\n"
    return md


def parse_lock_markdown(markdown: str) -> tuple[dict[str, Any], dict[str, str]]:
    import yaml

    m = re.search(r"```yaml\n(.*?)```", markdown, re.DOTALL)
    if not m:
        raise ValueError("the GPU run's lock artifact holds no ```yaml block")
    f = re.search(r"```json\n(.*?)\n```", markdown, re.DOTALL)
    return yaml.safe_load(m.group(1)), (json.loads(f.group(1)) if f else {})


def _remote_lock_entry(flow_run_id: Any) -> tuple[dict[str, Any], dict[str, str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[LOCK_ARTIFACT_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    if not arts:
        raise RuntimeError(f"GPU flow run {flow_run_id} finished without a '{LOCK_ARTIFACT_KEY}' artifact")
    return parse_lock_markdown(str(arts[-1].data))


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
                client.set_flow_run_state(flow_run_id, Cancelled(message="no GPU worker picked it up"),
                                          force=True)
                raise StageFailed("train", 1, f"medclf train: NoGpuWorker: no worker picked up the run of "
                                  f"'{deployment}' within {start_timeout_s:.0f} s (env {START_TIMEOUT_ENV}); "
                                  "start one: `prefect worker start --pool medclf-gpu`", [])
            time.sleep(poll_s)


def _train_on_gpu(deployment: str, project_dir: str = ".", force: bool = False) -> dict[str, Any]:
    from dvc.repo import Repo
    from prefect import get_run_logger
    from prefect.deployments import run_deployment
    from prefect.runtime import task_run

    log = get_run_logger()
    root = Path(project_dir).resolve()
    t0 = time.perf_counter()
    entries = dvc_status("train", root)
    attempt = task_run.run_count or 1
    if not entries and not force:
        return StageOutcome("train", "skipped", "unchanged: code, params and inputs match dvc.lock",
                            round(time.perf_counter() - t0, 2), attempt).to_dict()
    reason = "forced" if force else describe_status(entries) if in_lock("train", root) else \
        "first run (not in dvc.lock yet)"
    log.info("train: dispatching to deployment '%s' (%s); pushing inputs to the DVC remote first",
             deployment, reason)
    dvc_push(root, logger=log)
    lock = root / "dvc.lock"
    run = run_deployment(deployment, parameters={
        "params_yaml": (root / "params.yaml").read_text(),
        "dvc_lock": lock.read_text() if lock.exists() else None, "force": force}, timeout=0)
    log.info("train: GPU flow run '%s' created; waiting for a worker of the deployment's pool", run.name)
    run = _wait_for(run.id, deployment, float(os.environ.get(START_TIMEOUT_ENV, "1800")))
    state = run.state
    if state is None or not state.is_completed():
        msg = state.message if state else "no state"
        raise StageFailed("train", 1, f"medclf train: RemoteRunFailed: GPU flow run '{run.name}' on "
                          f"'{deployment}' ended {state.type.value if state else '?'}: {msg}", [])
    entry, files = _remote_lock_entry(run.id)
    merge_lock_entry(root, "train", entry)
    unpack_files(root, files)
    with Repo(str(root)) as repo:
        repo.pull(targets=[stage_target(root, "train")])
    left = dvc_status("train", root)
    if left:
        raise StageFailed("train", 1, "medclf train: RemoteMismatch: the GPU run's dvc.lock entry does not "
                          f"match this checkout ({describe_status(left)}); is the worker on the same commit?",
                          [])
    return StageOutcome("train", "ran", f"{reason} (on GPU deployment '{deployment}', flow run '{run.name}')",
                        round(time.perf_counter() - t0, 2), attempt).to_dict()


def _make_gpu_task() -> Any:
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from tasks.common import transient_only

    return task(_train_on_gpu, name="train-on-gpu", cache_policy=NO_CACHE, persist_result=False,
                retry_condition_fn=transient_only,
                description="Run the train stage on the GPU work pool (run_deployment) and bring back "
                            "its dvc.lock entry and model.")


train_on_gpu = _make_gpu_task()
