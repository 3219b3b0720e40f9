"""Prefect task `dvc-push`: every DVC-cached output in dvc.lock to the configured DVC remote."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any


def dvc_push(
    project_dir: str | Path = ".",
    remote: str | None = None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
) -> dict[str, Any]:
    """Push every cached output in dvc.lock to the configured remote (no-op if none is set)."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    log = logger or logging.getLogger("medclf.tasks.push")
    t0 = time.perf_counter()
    with Repo(str(Path(project_dir).resolve())) as repo:
        name = remote or repo.config["core"].get("remote")
        if not name:
            log.warning("no DVC remote configured (`dvc remote add -d NAME URL`); outputs stay local")
            return {"remote": None, "pushed": 0, "seconds": 0.0}
        try:
            pushed = repo.push(remote=name)
        except NoRemoteError as err:
            raise RuntimeError(f"dvc push: {err}") from err
    out = {"remote": name, "pushed": int(pushed), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("dvc push to '%s': %d file(s) uploaded", name, out["pushed"])
    return out


def push_task() -> Any:
    """Prefect task `dvc-push`: uploads are network I/O, so up to 3 retries with backoff."""
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE

    def dvc_push_task(project_dir: str = ".") -> dict[str, Any]:
        return dvc_push(project_dir, logger=get_run_logger())

    return task(
        name="dvc-push",
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=3,
        description="Push every DVC-cached output to the configured remote.",
    )(dvc_push_task)
