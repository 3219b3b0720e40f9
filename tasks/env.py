"""The environment of stage processes and of DVC's in-process calls (tasks.common runs stages with it)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medclf.infra.lock import held_env

QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
"""Defaults for stage processes (an explicit setting in the environment wins): no TensorFlow INFO/WARNING lines."""


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for stage processes: this interpreter's bin dir first on PATH, and the token of the
    project lock this process holds (MEDCLF_PROJECT_LOCK: the stage runs under it instead of waiting for it).

    `sys.executable` is not resolved on purpose: a venv's `python` is a symlink to the
    base interpreter, and only the unresolved path points at the venv's bin dir.
    """
    env = {**QUIET_ENV, **os.environ}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(held_env())
    env.update(extra or {})
    return env


def settings_or_none(root: Path) -> Any:
    """The checkout's settings, or None when params.yaml does not load (the stage reports that itself)."""
    from medclf.config import ConfigError, load_settings

    try:
        return load_settings(root / "params.yaml")
    except (ConfigError, OSError):
        return None


def source_env(root: Path) -> dict[str, str]:
    """Environment DVC needs to see the raw source: the S3 endpoint of an `s3://` raw_data (MinIO, moto).

    DVC checks an external S3 dependency by listing ETags through its own client, which reads the
    endpoint from `AWS_ENDPOINT_URL_S3`; params.yaml names it once, in `ingest.source.s3_endpoint_url`.
    An endpoint already set in the environment wins.
    """
    s = settings_or_none(root)
    endpoint = s.ingest.source.s3_endpoint_url if s is not None else None
    if not (endpoint and s.paths.raw_data.startswith("s3://")):
        return {}
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return {}
    return {"AWS_ENDPOINT_URL_S3": endpoint}


@contextlib.contextmanager
def patched_env(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
