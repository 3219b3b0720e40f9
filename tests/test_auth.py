"""`MLFLOW_AUTH=1 bash mlflow/server.sh start` (mlflow/README.md): login required, a wrong password refused.

The real script starts the real server on a free port with its store in a temporary folder (its
MLFLOW_PORT / MLFLOW_STORE_DIR / MLFLOW_ARTIFACTS_DESTINATION knobs), then plain REST calls check
the answers: no credentials 401, a wrong password 401, an unknown user 401, the admin of
mlflow/basic_auth.ini 200. The server is stopped through its process group (the script's session),
never by name.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, stop_process

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "mlflow" / "server.sh"


def status_of(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def stop_group(proc: subprocess.Popen, pidfile: Path) -> None:
    """SIGTERM the script's session (the detached server lives in it), wait, then SIGKILL what is left."""
    server = int(pidfile.read_text()) if pidfile.exists() else None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 30
    while server and _alive(server) and time.time() < deadline:
        time.sleep(0.3)
    stop_process(proc)  # SIGKILL to the group, whatever is left


def test_server_sh_with_auth_requires_login_and_refuses_a_wrong_password(tmp_path):
    ini = configparser.ConfigParser()
    ini.read(SCRIPT.with_name("basic_auth.ini"))
    admin, password = ini["mlflow"]["admin_username"], ini["mlflow"]["admin_password"]
    port, store = free_port(), tmp_path / "store"
    env = {
        **os.environ,
        "MLFLOW_AUTH": "1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_STORE_DIR": str(store),
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_BACKEND_STORE_URI", None)
    cwd = tmp_path / "elsewhere"  # not the repository: nothing may depend on the current directory
    cwd.mkdir()
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "start"],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=400)
        log = (store / "server.log").read_text()[-3000:] if (store / "server.log").exists() else ""
        assert proc.returncode == 0, out + log
        base = f"http://127.0.0.1:{port}"
        assert f"MLflow UI: {base}" in out, out
        api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status_of(api) == 401  # no credentials: login required
        assert status_of(api, admin, password + "-wrong") == 401
        assert status_of(api, "nobody", password) == 401
        assert status_of(api, admin, password) == 200
        assert status_of(f"{base}/health") == 200  # what the script's own readiness probe calls
        # the users database sits beside the tracking store, not under the current directory
        assert (store / "basic_auth.db").exists() and not (cwd / "mlflow").exists()
        assert (store / "flask_secret_key").stat().st_mode & 0o077 == 0  # the CSRF secret: private
    finally:
        stop_group(proc, store / "server.pid")
    with socket.socket() as s:  # stopped: nothing answers on the port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
