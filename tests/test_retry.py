"""`tasks.common.transient_only`, the real Prefect retry condition of every stage task (issue 15).

`StageFailed.transient` is tested in test_flow.py; this checks the function Prefect actually calls,
`retry_condition_fn(task, task_run, state)`, with real Prefect `State` objects: it must read the
exception out of the failed state, never retry a deterministic failure (a gate, a failed check),
retry a killed process and any other error, and never "retry" a success.
"""

from __future__ import annotations

import uuid

import pytest
from prefect import task
from prefect.client.schemas.objects import TaskRun
from prefect.states import Completed, Failed

from tasks.common import StageFailed, transient_only

GATE = "medclf evaluate: GateFailed: release gates failed: f1 0.4 < min_f1 1.0"
CHECK = "medclf validate: ValidationFailed: leakage (cannot read x)"  # "cannot read" alone looks transient
KILLED = "ERROR: failed to reproduce 'train': failed to run: medclf train, exited with -9"
S3 = "medclf ingest: SourceError: s3://b/raw: cannot list (endpoint http://x): SlowDown"


@task(name="evaluate")
def _stage() -> None:  # the `task` argument Prefect passes; transient_only must not depend on it
    return None


def _task_run() -> TaskRun:
    return TaskRun(name="evaluate-0", task_key="evaluate", dynamic_key="0", flow_run_id=uuid.uuid4())


def _failed(err: BaseException):
    return Failed(data=err, message=str(err))


@pytest.mark.parametrize(("error", "retried"), [
    (StageFailed("evaluate", 255, GATE, []), False),  # a failed gate fails identically every time
    (StageFailed("validate", 255, CHECK, []), False),  # a failed data check, even with "cannot read" in it
    (StageFailed("train", 255, KILLED, []), True),  # SIGKILL / OOM killer: resumable training
    (StageFailed("ingest", 255, S3, []), True),  # throttled S3
    (OSError(28, "No space left on device"), True),  # not a StageFailed: one more try
    (RuntimeError("Unable to acquire lock on dvc.lock"), True),
], ids=["gate", "validation", "killed", "s3-throttled", "oserror", "other"])
def test_transient_only_on_failed_states(error, retried):
    state = _failed(error)
    assert state.is_failed()
    assert transient_only(_stage, _task_run(), state) is retried


def test_transient_only_never_retries_a_completed_state():
    assert transient_only(_stage, _task_run(), Completed(data={"stage": "train", "status": "ran"})) is False


def test_every_stage_task_retries_only_on_transient_only():
    """The condition tested above is the one every stage task (and the GPU train task) carries, also
    after the flow's `with_options(retries=...)`."""
    from tasks import TASKS
    from tasks.train import train_on_gpu

    for name, t in {**TASKS, "train-on-gpu": train_on_gpu}.items():
        assert t.retry_condition_fn is transient_only, name
        assert t.with_options(retries=2, retry_delay_seconds=[1, 2]).retry_condition_fn is transient_only, name
