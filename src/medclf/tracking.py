"""The thin edge to MLflow, git and DVC metadata (provenance for every run)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached (after retries)."""


def wait_for_server(uri: str, attempts: int = 5, delay: float = 1.0) -> None:
    """Fail fast and clearly when an http(s) tracking server is down, instead of a deep stack trace."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    last: Exception | None = None
    for i in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = err
        time.sleep(delay * (2**i))
    raise TrackingUnavailable(
        f"MLflow tracking server at {uri} is unreachable after {attempts} attempts ({last}). "
        "Start it with `bash mlflow/server.sh start` or set MLFLOW_TRACKING_URI.")


def configure(tracking_uri: str, experiment: str | None = None, attempts: int = 5) -> str:
    """Point the mlflow client at the server; returns the experiment id (if one is named)."""
    import mlflow

    wait_for_server(tracking_uri, attempts=attempts)
    mlflow.set_tracking_uri(tracking_uri)
    if experiment:
        return mlflow.set_experiment(experiment).experiment_id
    return ""


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=cwd, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def dir_digest(path: str | Path) -> str:
    """A content hash of a file or directory (names + bytes), stable across machines."""
    path = Path(path)
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def dvc_lock_hash(out_path: str | Path, lock: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for an output in dvc.lock, if the stage ran under DVC."""
    import yaml

    lock = Path(lock)
    if not lock.exists():
        return None
    data = yaml.safe_load(lock.read_text()) or {}
    want = str(Path(out_path))
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if str(Path(out.get("path", ""))) == want:
                return out.get("md5")
    return None


def data_version(path: str | Path) -> dict[str, str]:
    """Dataset version: DVC's md5 when available, and always our own content digest."""
    out = {"data_digest": dir_digest(path)}
    dvc = dvc_lock_hash(path)
    if dvc:
        out["dvc_md5"] = dvc
    return out


def params_hash(*sections: BaseModel) -> str:
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flat_params(section: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten a settings section for mlflow.log_params (values stringified, MLflow limit 6000)."""
    out: dict[str, Any] = {}
    for k, v in section.model_dump(mode="json").items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{key}.{k2}"] = str(v2)[:500]
        else:
            out[key] = str(v)[:500]
    return out
