"""The GPU pool's half of training: the `medclf-train` flow, started by `retrain` via `run_deployment`.

It runs on a worker of the GPU work pool (see prefect.yaml and deploy/k8s/). The
worker shares only the DVC remote and the Prefect API with the caller, so it

1. takes the caller's `params.yaml` and `dvc.lock` (parameters), so it trains on
   exactly the caller's settings and input versions;
2. pulls the train stage's inputs by hash from the DVC remote;
3. runs the same task as in-process training (`dvc repro --single-item train`,
   resumable through BackupAndRestore under `paths.cache_dir`, so keep that on a
   persistent volume for resume-after-preemption);
4. pushes every output to the DVC remote (the stage's `cache: false` outputs, e.g. the
   history plot, as objects named by their dvc.lock md5) and returns the `train` entry of
   its `dvc.lock`, also published as the structured artifact `medclf-train-lock`, which the
   caller writes into its dvc.lock before pulling the outputs by those hashes.

    python -m flows.train_remote --serve        # serve it from any machine, e.g. a GPU box
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from medclf.config import load_settings
from tasks.common import lock_entry, stage_target
from tasks.push import dvc_push
from tasks.train import publish_lock_entry, push_uncached
from tasks.train import retries as train_retries
from tasks.train import train as train_task


def _write_if_changed(path: Path, text: str | None) -> bool:
    from medclf.infra.io import atomic_file

    if text is None or (path.exists() and path.read_text() == text):
        return False
    with atomic_file(path) as fh:
        fh.write(text)
    return True


@flow(
    name="medclf-train",
    description="Train on this worker (GPU pool) with the caller's params and "
    "inputs; push the outputs to the DVC remote and return the dvc.lock entry.",
)
def train_remote(
    params_yaml: str | None = None,
    dvc_lock: str | None = None,
    project_dir: str = ".",
    force: bool = False,
    pull: bool = True,
    push: bool = True,
    retry_delay_seconds: float = 10.0,
) -> dict[str, Any]:
    from prefect.runtime import flow_run

    from medclf.infra.lock import FLOW_TIMEOUT, project_lock
    from medclf.infra.lock import timeout as lock_timeout

    log = get_run_logger()
    root = Path(project_dir).resolve()
    # the worker's checkout, like the caller's, runs one flow at a time: taken before the caller's params.yaml
    # and dvc.lock overwrite this checkout's (its own params.yaml says where the lock is)
    with project_lock(
        load_settings(root / "params.yaml").paths,
        f"flow run {flow_run.id} (medclf-train)",
        root=root,
        hold_stage=False,
        wait=lock_timeout(FLOW_TIMEOUT),
        log=log,
    ):
        return _train(root, params_yaml, dvc_lock, force, pull, push, retry_delay_seconds)


def _train(
    root: Path,
    params_yaml: str | None,
    dvc_lock: str | None,
    force: bool,
    pull: bool,
    push: bool,
    retry_delay_seconds: float,
) -> dict[str, Any]:
    from dvc.repo import Repo

    from flows.retrain import backoff

    log = get_run_logger()
    changed = [
        name
        for name, text in (("params.yaml", params_yaml), ("dvc.lock", dvc_lock))
        if _write_if_changed(root / name, text)
    ]
    if changed:
        log.info("using the caller's %s", " and ".join(changed))
    settings = load_settings(root / "params.yaml")
    if pull:
        with Repo(str(root)) as repo:
            stats = repo.pull(targets=[stage_target(root, s) for s in ("ingest", "augment")])
        log.info("pulled train inputs from the DVC remote: %s", stats)
    n = train_retries(settings)
    outcome = train_task.with_options(retries=n, retry_delay_seconds=backoff(retry_delay_seconds, n))(str(root), force)
    entry = lock_entry(root, "train")
    if entry is None:
        raise RuntimeError(f"{root / 'dvc.lock'} has no 'train' entry after training")
    pushed = None
    if push:
        pushed = {**dvc_push(root, logger=log), "uncached": push_uncached(root, "train")}
    publish_lock_entry(entry)
    return {"outcome": outcome, "push": pushed, "lock_entry": entry}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.train_remote", description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help="serve as deployment 'medclf-train/<name>' (blocks)")
    p.add_argument("--name", default="gpu")
    p.add_argument("--project-dir", default=".")
    args = p.parse_args(argv)
    if args.serve:
        train_remote.serve(
            name=args.name, parameters={"project_dir": str(Path(args.project_dir).resolve())}, global_limit=1
        )  # one run at a time, as prefect.yaml's concurrency_limit
        return 0
    state = train_remote(project_dir=args.project_dir, pull=False, push=False, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
