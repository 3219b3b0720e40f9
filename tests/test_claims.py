"""Claims of README.md / docs/ORCHESTRATION.md that had no test (issue 15): code changes, `--force`,
DVC's run-cache, `dvc push` without a remote, retry counts and backoff per stage.

Real components only: a temporary git + DVC checkout of this pipeline whose raw data is a folder of
synthetic phantoms (`data/raw/xray`), the Prefect test API, a real MLflow server, real `dvc repro`.
The flow runs stop at validate (augment for the run-cache case), so nothing trains. The module's
tests share one checkout and run in file order.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.test_flow import run_flow
from tests.test_lifecycle import new_folder_project

pytestmark = pytest.mark.slow

CODE_DEP = "src/medclf/stages/validate.py"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, mlflow_server, prefect_api) -> Path:
    """A folder-source checkout, ingested once (by `new_folder_project`), then validated."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.delenv("MEDCLF_GPU_DEPLOYMENT", raising=False)
        root = new_folder_project(tmp_path_factory.mktemp("claims"))["checkout"]
        assert statuses(flow(root, "validate"))["validate"]["status"] == "ran"
        yield root


def flow(root: Path, until: str, **kw: Any) -> dict[str, Any]:
    state = run_flow(root, until=until, push=False, **kw)
    assert state.is_completed(), state.message
    return state.result()


def statuses(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["stage"]: o for o in result["stages"]}


def stale(root: Path, stage: str) -> list[Any]:
    from tasks.common import dvc_status

    return dvc_status(stage, root)


# --------------------------------------------------------------------------- --force
def test_force_reruns_an_up_to_date_stage(checkout):
    """`--force` reruns a stage DVC calls up to date; without it the same run skips the stage."""
    assert stale(checkout, "ingest") == []
    assert statuses(flow(checkout, "ingest"))["ingest"]["status"] == "skipped"
    forced = statuses(flow(checkout, "ingest", force=True))["ingest"]
    assert forced["status"] == "ran" and forced["reason"] == "forced", forced
    # the stage itself ran (it printed its JSON result), not only DVC's "didn't change, skipping"
    assert forced["result"] and forced["result"].get("images"), forced
    assert not any("didn't change" in line for line in forced["tail"]), forced["tail"]
    assert stale(checkout, "ingest") == []


def test_cli_documents_and_passes_force():
    from flows.retrain import _parser

    assert "--force" in _parser().format_help()
    assert _parser().parse_args(["--force"]).force is True
    assert _parser().parse_args([]).force is False


# --------------------------------------------------------------------------- a code change
def test_a_code_change_reruns_its_stage_and_not_the_ones_before(checkout):
    """Editing validate's module makes validate stale (reason: that file), ingest stays skipped."""
    flow(checkout, "validate")  # settle after --force
    assert stale(checkout, "validate") == []
    with (checkout / CODE_DEP).open("a") as fh:
        fh.write("# a code change (tests/test_claims.py)\n")
    assert stale(checkout, "ingest") == []
    reasons = json.dumps(stale(checkout, "validate"))
    assert CODE_DEP in reasons and "modified" in reasons, reasons
    second = statuses(flow(checkout, "validate"))
    assert second["ingest"]["status"] == "skipped", second["ingest"]
    assert second["validate"]["status"] == "ran", second["validate"]
    assert CODE_DEP in second["validate"]["reason"], second["validate"]["reason"]
    assert stale(checkout, "validate") == []


# --------------------------------------------------------------------------- run-cache
def test_deleted_validate_reports_are_recomputed_not_restored(checkout):
    """validate has a `persist: true` output (the drift baseline): DVC never run-caches such a stage.

    So deleting its reports reruns it: status `ran`, never `restored`.
    """
    flow(checkout, "validate")
    shutil.rmtree(checkout / "reports" / "validation")
    assert "deleted" in json.dumps(stale(checkout, "validate"))
    again = statuses(flow(checkout, "validate"))
    assert again["ingest"]["status"] == "skipped"
    assert again["validate"]["status"] == "ran", again["validate"]
    assert not any("is cached - skipping run" in line for line in again["validate"]["tail"])
    assert (checkout / "reports" / "validation" / "summary.json").exists()


def test_deleted_augment_output_is_restored_from_the_run_cache(checkout):
    """augment has no persist output, so DVC checks a deleted output out of its cache: `restored`.

    With deps unchanged DVC restores from dvc.lock's hashes + the local cache (it does so even with
    `--no-run-cache`); the run-cache proper is only needed when dvc.lock names another run.
    """
    first = statuses(flow(checkout, "augment"))["augment"]
    assert first["status"] == "ran", first
    out = checkout / "data" / "augment"
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out)
    assert "deleted" in json.dumps(stale(checkout, "augment"))
    again = statuses(flow(checkout, "augment"))["augment"]
    assert again["status"] == "restored", again
    assert "run-cache" in again["reason"], again["reason"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == before
    assert stale(checkout, "augment") == []


# --------------------------------------------------------------------------- dvc push
def test_dvc_push_without_a_remote_is_a_warned_no_op(checkout, caplog):
    from tasks.push import dvc_push

    logger = logging.getLogger("medclf.tests.push")
    with caplog.at_level(logging.WARNING, logger="medclf.tests.push"):
        out = dvc_push(checkout, logger=logger)
    assert out == {"remote": None, "pushed": 0, "seconds": 0.0}
    warned = [r for r in caplog.records if r.name == "medclf.tests.push" and r.levelno == logging.WARNING]
    assert warned and "no DVC remote configured" in warned[0].getMessage(), caplog.records
    # the default logger of the task warns as well
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medclf.tasks.push"):
        assert dvc_push(checkout)["remote"] is None
    assert any(r.name == "medclf.tasks.push" and r.levelno == logging.WARNING for r in caplog.records)


# --------------------------------------------------------------------------- retries and backoff
def test_backoff_doubles_from_the_base():
    from flows.retrain import backoff

    assert backoff(10, 3) == [10, 20, 40]
    assert backoff(10, 2) == [10, 20]
    assert backoff(0.5, 1) == [0.5]
    assert backoff(0, 3) == 0
    assert backoff(10, 0) == 0


S3_FOLDER = {
    "paths": {"raw_data": "s3://bucket/xray"},
    "ingest": {"source": {"kind": "folder", "uri": "s3://bucket/xray"}},
}
LOCAL_FOLDER = {
    "paths": {"raw_data": "data/raw/xray"},
    "ingest": {"source": {"kind": "folder", "uri": "data/raw/xray"}},
}
# docs/ORCHESTRATION.md, "Retries"
DOCUMENTED = {
    "local": {"ingest": 0, "validate": 0, "augment": 0, "train": 2, "evaluate": 1, "register": 3},
    "s3": {"ingest": 3, "validate": 0, "augment": 0, "train": 2, "evaluate": 1, "register": 3},
}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_retry_counts_and_backoff_per_stage(make_settings, where):
    from flows.retrain import _push, _stage_task
    from medclf import STAGES
    from tasks import RETRIES

    settings = make_settings(LOCAL_FOLDER if where == "local" else S3_FOLDER)
    assert {s: RETRIES[s](settings) for s in STAGES} == DOCUMENTED[where]
    for stage in STAGES:
        task = _stage_task(stage, settings, 10.0, None)
        n = DOCUMENTED[where][stage]
        assert task.retries == n, stage
        assert task.retry_delay_seconds == ([10.0 * 2**i for i in range(n)] if n else 0), stage
        assert task.retry_jitter_factor == 0.2, stage
    # retry_delay_seconds=0 (the tests' fast path) gives no delays and no jitter
    assert _stage_task("register", settings, 0, None).retry_jitter_factor is None
    assert _push.retries == 3


def test_ingest_retries_for_http_and_medmnist_downloads(make_settings):
    from tasks import RETRIES

    assert (
        RETRIES["ingest"](
            make_settings({"ingest": {"source": {"kind": "medmnist", "uri": None, "medmnist_flag": "pneumoniamnist"}}})
        )
        == 3
    )
    assert RETRIES["ingest"](make_settings()) == 0  # synthetic: nothing to download
