"""The retraining flow: ingest → validate → augment → train → evaluate → register, each through DVC.

    python -m flows.retrain                          # the whole flow, once, on params.yaml
    python -m flows.retrain --until validate         # stop after a stage
    python -m flows.retrain --serve --cron "0 3 * * 1"   # long-running process with a schedule

Prefect adds what DVC lacks (schedule, retries, UI, artifacts, GPU routing); DVC decides
what is stale and keeps `dvc.lock` the single record of what ran. Without
PREFECT_API_URL Prefect starts a temporary local API for the run (ephemeral mode).
Stages talk to MLflow at `settings.mlflow.resolved_uri()` (MLFLOW_TRACKING_URI wins).
"""

# No `from __future__ import annotations` here: a served or deployed run loads this file under another
# module name, and Prefect's parameter model could not resolve the string annotation "StageName" there
# (PydanticUserError "RetrainModel is not fully defined"; tests/test_flow.py::test_flow_serve_...).
import argparse
import json
import os
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from flows.summary import NO_CHANGE, failure_outcome, headline, metrics_table, render_summary, run_tags
from medclf import STAGES
from medclf.config import Settings, load_settings
from medclf.infra import catalog
from medclf.infra.catalog import Artifact
from medclf.infra.lock import FLOW_TIMEOUT, project_lock
from medclf.infra.lock import timeout as lock_timeout
from tasks import RETRIES, TASKS
from tasks.common import StageFailed, artifact_path
from tasks.push import push_task
from tasks.train import train_on_gpu

GPU_ENV = "MEDCLF_GPU_DEPLOYMENT"
"""`flow-name/deployment-name` of the GPU training deployment; unset = train in process."""
StageName = Literal["ingest", "validate", "augment", "train", "evaluate", "register"]
_push = push_task()


def _read(root: Path, artifact: Artifact) -> dict[str, Any] | None:
    """A JSON catalog entry of the checkout at `root` (a stage's result), None when absent or unreadable."""
    path = artifact_path(root, artifact)
    try:
        data = catalog.load_file(path, "json") if path is not None else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _dataset(root: Path, s: Settings) -> dict[str, Any]:
    from medclf.infra.tracking import dvc_lock_hash, raw_data_version

    info: dict[str, Any] = {"path": str(s.paths.ingest_dir)}
    md5 = dvc_lock_hash(s.paths.ingest_dir, root / "dvc.lock")
    if md5:
        info["dvc_md5"] = md5
    raw = raw_data_version(s.paths.raw_data, root / "dvc.lock")
    if raw:
        info["raw_data"] = raw
    summary = _read(root, catalog.INGEST_SUMMARY) or {}
    info.update(
        {k: summary[k] for k in ("images", "patients", "splits", "classes", "quarantined", "changes") if k in summary}
    )
    return info


def _experiment_id(uri: str, run_id: str) -> str | None:
    """One REST call instead of importing mlflow (seconds) into the orchestrating process."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/runs/get?" + urllib.parse.urlencode({"run_id": run_id})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            experiment_id: str | None = json.load(resp)["run"]["info"]["experiment_id"]
            return experiment_id
    except (OSError, ValueError, KeyError):
        return None


def mlflow_links(uri: str, register: dict[str, Any] | None, train_run: dict[str, Any] | None) -> dict[str, str]:
    if not uri.startswith(("http://", "https://")):
        return {}
    base = uri.rstrip("/")
    links: dict[str, str] = {}
    for label, rec in (("MLflow training run", train_run), ("MLflow registered run", register)):
        run_id = (rec or {}).get("run_id")
        if run_id and run_id not in " ".join(links.values()):
            exp = _experiment_id(uri, run_id)
            links[label] = f"{base}/#/experiments/{exp}/runs/{run_id}" if exp else f"{base}/#/runs/{run_id}"
    if register and register.get("version") is not None:
        name = urllib.parse.quote(str(register.get("model_name")))
        links["MLflow model version"] = f"{base}/#/models/{name}/versions/{register['version']}"
    return links


def backoff(base: float, retries: int) -> list[float] | float:
    """Delays base, 2·base, 4·base, ... (Prefect wants a list, or a number when there are none)."""
    return [base * 2**i for i in range(retries)] if base and retries else 0


def _tag_run(tags: list[str]) -> None:
    """Add tags to this flow run (the runs list in the UI filters on them); never fails the run."""
    from prefect import get_client
    from prefect.runtime import flow_run

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run.id)
            client.update_flow_run(run.id, tags=sorted(set(run.tags or []) | {f"medclf:{t}" for t in tags}))
    except Exception as err:  # noqa: BLE001 - tags are a convenience; the run's outcome must not depend on them
        get_run_logger().warning("could not tag the flow run: %s", err)


def _stage_task(stage: str, s: Settings, delay: float, gpu_deployment: str | None) -> Any:
    task = train_on_gpu if stage == "train" and gpu_deployment else TASKS[stage]
    retries = RETRIES[stage](s)
    return task.with_options(
        retries=retries, retry_delay_seconds=backoff(delay, retries), retry_jitter_factor=0.2 if delay else None
    )


def _stage_artifact(stage: str, outcome: dict[str, Any]) -> None:
    """A stage that returns `markdown` (validate's report) gets its own artifact in the UI."""
    from prefect.artifacts import create_markdown_artifact

    md = (outcome.get("result") or {}).get("markdown")
    if isinstance(md, str) and md.strip():
        create_markdown_artifact(md, key=f"medclf-{stage}", description=f"report of the {stage} stage")


def _publish(
    root: Path,
    s: Settings,
    outcomes: list[dict[str, Any]],
    planned: list[str],
    t0: float,
    push: dict[str, Any] | None,
    failure: StageFailed | None,
) -> dict[str, Any]:
    """Markdown run summary + metrics table in the Prefect UI; returns the facts used and the outcome line."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    register = _read(root, catalog.REGISTER)
    gates = _read(root, catalog.GATES)
    train_run = _read(root, catalog.TRAIN_RUN)
    links = mlflow_links(s.mlflow.resolved_uri(), register, train_run)
    dataset = _dataset(root, s)
    # metrics.json describes this run's model only if evaluate ran, was up to date, or failed a gate
    evaluated = any(o["stage"] == "evaluate" for o in outcomes) or (failure is not None and failure.stage == "evaluate")
    metrics = _read(root, catalog.METRICS) if evaluated else None
    if failure is not None:
        outcome = failure_outcome(failure.stage, failure.error, gates, failure.error_type)
    else:
        outcome = headline(outcomes, register, dataset.get("changes"))
    md = render_summary(
        outcomes=outcomes,
        dataset=dataset,
        gates=gates if evaluated else None,
        register=register,
        links=links,
        push=push,
        wall_seconds=time.perf_counter() - t0,
        failure=None if failure is None else str(failure),
        planned=planned,
        metrics=metrics,
        outcome=outcome,
    )
    create_markdown_artifact(md, key="medclf-retrain-summary", description=outcome)
    rows = metrics_table(metrics)
    if rows:
        create_table_artifact(
            rows, key="medclf-metrics", description="reports/metrics.json at 3 decimals (95 % CIs; counts as integers)"
        )
    return {
        "register": register,
        "gates": gates,
        "dataset": dataset,
        "links": links,
        "markdown": md,
        "outcome": outcome,
    }


@flow(
    name="medclf-retrain",
    description="Retrain through DVC: ingest, validate, augment, train, evaluate, "
    "register (a gate-passing model becomes the challenger).",
)
def retrain(
    project_dir: str = ".",
    until: StageName | None = None,
    force: bool = False,
    push: bool = True,
    gpu_deployment: str | None = None,
    retry_delay_seconds: float = 10.0,
) -> dict[str, Any]:
    """Run the pipeline; unchanged stages are skipped by DVC, failed checks and gates fail the run.

    gpu_deployment: `flow/deployment` to train on (GPU work pool); default env MEDCLF_GPU_DEPLOYMENT,
    unset = train in this process. retry_delay_seconds: base of the exponential backoff.

    The run holds the project lock (medclf/infra/lock.py) from start to end, and its stage processes inherit its
    token: another flow, `medclf <stage>` or plain `dvc repro` on this checkout waits or is refused
    (MEDCLF_LOCK_TIMEOUT, default lock.FLOW_TIMEOUT here; docs/ORCHESTRATION.md "Concurrent runs").
    """
    from prefect.runtime import flow_run

    log = get_run_logger()
    t0 = time.perf_counter()
    root = Path(project_dir).resolve()
    s = load_settings(root / "params.yaml")
    with project_lock(
        s.paths,
        f"flow run {flow_run.id} (medclf-retrain)",
        root=root,
        hold_stage=False,
        wait=lock_timeout(FLOW_TIMEOUT),
        log=log,
    ):
        return _run(root, s, t0, until, force, push, gpu_deployment, retry_delay_seconds)


def _run(
    root: Path,
    s: Settings,
    t0: float,
    until: str | None,
    force: bool,
    push: bool,
    gpu_deployment: str | None,
    retry_delay_seconds: float,
) -> dict[str, Any]:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from tqdm import tqdm

    log = get_run_logger()
    gpu = gpu_deployment or os.environ.get(GPU_ENV) or None
    planned = list(STAGES[: STAGES.index(until) + 1] if until else STAGES)
    log.info("medclf retrain in %s: %s%s", root, " → ".join(planned), f" (train on GPU: {gpu})" if gpu else "")
    # a sync flow: `create_progress_artifact` (async_dispatch) returns the UUID itself here, never a coroutine
    progress = cast(UUID, create_progress_artifact(0.0, key="medclf-retrain-progress", description="stages done"))
    outcomes: list[dict[str, Any]] = []
    pushed: dict[str, Any] | None = None
    bar = tqdm(total=len(planned), desc="medclf retrain", unit="stage", disable=None, file=sys.stderr)
    try:
        for i, stage in enumerate(planned):
            bar.set_postfix_str(stage)
            task = _stage_task(stage, s, retry_delay_seconds, gpu)
            outcome = task(gpu, str(root), force) if stage == "train" and gpu else task(str(root), force)
            outcomes.append(outcome)
            _stage_artifact(stage, outcome)
            log.info("%s: %s in %.1f s (%s)", stage, outcome["status"], outcome["seconds"], outcome["reason"])
            update_progress_artifact(progress, 100.0 * (i + 1) / len(planned))
            bar.update()
        if push:
            pushed = _push.with_options(retry_delay_seconds=backoff(retry_delay_seconds, 3))(str(root))
    except StageFailed as err:
        bar.close()
        if err.result:  # a failed check still has its report (validate's markdown)
            _stage_artifact(err.stage, {"result": err.result})
        facts = _publish(root, s, outcomes, planned, t0, pushed, failure=err)
        _tag_run(
            run_tags(
                outcomes,
                facts["register"],
                facts["dataset"],
                failed_stage=err.stage,
                gate_failed=err.error_type == "GateFailed",
            )
        )
        log.error("%s", err)
        # the outcome leads the state message ("gate failed: recall 0.773 < 0.800"), the stage's error follows;
        # `state.result()` still raises the StageFailed
        return Failed(message=f"{facts['outcome']}\n{err}", data=err)  # type: ignore[return-value]
    bar.close()
    facts = _publish(root, s, outcomes, planned, t0, pushed, failure=None)
    line = facts["outcome"]
    log.info("%s (%.1f s)", line, time.perf_counter() - t0)
    _tag_run(run_tags(outcomes, facts["register"], facts["dataset"]))
    result = {
        "headline": line,
        "retrained": line != NO_CHANGE,
        "stages": outcomes,
        "push": pushed,
        "model": facts["register"],
        "dataset": facts["dataset"],
        "links": facts["links"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    # the headline is the run's state message, so the Prefect runs list tells "challenger v2" from "no change"
    return Completed(message=line, data=result)  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--project-dir", default=".", help="the DVC project (default: current directory)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    p.add_argument("--force", action="store_true", help="rerun every stage even if DVC says it is up to date")
    p.add_argument("--no-push", dest="push", action="store_false", help="skip the final `dvc push`")
    p.add_argument("--gpu-deployment", default=None, help=f"train on this deployment (or env {GPU_ENV})")
    p.add_argument("--retry-delay", type=float, default=10.0, help="base seconds of the retry backoff")
    p.add_argument("--serve", action="store_true", help="serve the flow with a schedule (blocks)")
    p.add_argument("--cron", default="0 3 * * 1", help="cron schedule for --serve (default: Mondays 03:00)")
    p.add_argument("--name", default="medclf-retrain-served", help="deployment name for --serve")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = {
        "project_dir": str(Path(args.project_dir).resolve()),
        "until": args.until,
        "force": args.force,
        "push": args.push,
        "gpu_deployment": args.gpu_deployment,
        "retry_delay_seconds": args.retry_delay,
    }
    if args.serve:
        retrain.serve(name=args.name, cron=args.cron, parameters=params, global_limit=1)  # one run at a time
        return 0
    state = retrain(**params, return_state=True)
    if state.is_completed():
        print(state.result()["headline"])
        return 0
    print(f"medclf retrain failed: {state.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
