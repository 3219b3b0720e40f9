"""`tasks.common.transient_only`, the real Prefect retry condition of every stage task (issue 15).

`StageFailed.transient` is tested in test_flow.py; this checks the function Prefect actually calls,
`retry_condition_fn(task, task_run, state)`, with real Prefect `State` objects: it must read the
exception out of the failed state, never retry a deterministic failure (a gate, a failed check),
retry a killed process and any other error, and never "retry" a success. Each StageFailed is built the
way the flow builds it: the stage's real exception → `medclf.cli.error_record` (the structured error
`medclf <stage>` writes to its result file) → `StageFailed.from_run`.
"""

from __future__ import annotations

import uuid

import pytest
from prefect import task
from prefect.client.schemas.objects import TaskRun
from prefect.states import Completed, Failed

from medclf.cli import error_record
from tasks.common import StageFailed, transient_only

KILLED = "ERROR: failed to reproduce 'train': failed to run: medclf train, exited with -9"


def _gate() -> BaseException:
    from medclf.stages.evaluate import GateFailed

    return GateFailed("release gates failed: f1 0.4 < min_f1 1.0")


def _check() -> BaseException:
    from medclf.stages.validate import ValidationFailed

    return ValidationFailed("leakage (cannot read x)")  # "cannot read" alone used to look transient


def _s3_throttled() -> BaseException:
    from botocore.exceptions import ClientError

    from medclf.sources.base import SourceError

    try:
        try:
            raise ClientError({"Error": {"Code": "SlowDown"}}, "ListObjectsV2")
        except ClientError as err:
            raise SourceError("s3://b/raw: cannot list (endpoint http://x): SlowDown") from err
    except SourceError as err:
        return err


def failed_stage(stage: str, err: BaseException | None, tail: list[str] | None = None) -> StageFailed:
    """What the flow raises when `dvc repro` of `stage` fails: from this run's result file, which holds the
    structured error of `err`, or only the "running" marker when the process was killed (`err` None)."""
    record = (
        {"stage": stage, "token": "t", "status": "running"}
        if err is None
        else {"stage": stage, "token": "t", "error": error_record(stage, err)}
    )
    return StageFailed.from_run(stage, record, tail or [])


@task(name="evaluate")
def _stage() -> None:  # the `task` argument Prefect passes; transient_only must not depend on it
    return None


def _task_run() -> TaskRun:
    return TaskRun(name="evaluate-0", task_key="evaluate", dynamic_key="0", flow_run_id=uuid.uuid4())


def _failed(err: BaseException):
    return Failed(data=err, message=str(err))


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (lambda: failed_stage("evaluate", _gate()), False),  # a failed gate fails identically every time
        (lambda: failed_stage("validate", _check()), False),  # a failed data check, even with "cannot read" in it
        (lambda: failed_stage("train", None, [KILLED]), True),  # SIGKILL / OOM killer: resumable training
        (lambda: failed_stage("ingest", _s3_throttled()), True),  # throttled S3
        (lambda: OSError(28, "No space left on device"), True),  # not a StageFailed: one more try
        (lambda: RuntimeError("Unable to acquire lock on dvc.lock"), True),
    ],
    ids=["gate", "validation", "killed", "s3-throttled", "oserror", "other"],
)
def test_transient_only_on_failed_states(error, retried):
    state = _failed(error())
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
