"""MLflow and the Prefect server on a real PostgreSQL cluster: the `MEDCLF_DB=postgres` opt-in of
deploy/servers.sh (`make servers`), issue 14 point 1.

One test runs the whole retrain flow against it: `deploy/servers.sh start` creates a PostgreSQL cluster
(initdb, pg_ctl, a database each for MLflow and Prefect), starts MLflow with its backend store there and its
artifacts on moto S3, and the Prefect server on the other database. The flow (`python -m flows.retrain`, a
subprocess whose PREFECT_API_URL is that server) registers a challenger, a person promotes it (`champion`),
then everything is stopped, the cluster included, and started again: the version, its aliases, the run's
metrics, the artifact on S3 and the Prefect flow run are all still there, and the rows are read from
PostgreSQL itself (psycopg), so the test cannot pass on SQLite.

Needs PostgreSQL's initdb and pg_ctl on PATH (Debian: postgresql-15); skipped with that reason elsewhere.
The cheap checks of the script's refusals run everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port
from tests.test_flow import BIN, make_checkout, s3_client

SERVERS = str(ROOT / "deploy/servers.sh")
POSTGRES = str(ROOT / "deploy/postgres.sh")
HAVE_PG = bool(shutil.which("initdb") and shutil.which("pg_ctl"))
# the URLs come from the environment only: a developer's own must not redirect the test's servers
DB_URL_VARS = (
    "MLFLOW_BACKEND_STORE_URI",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "MLFLOW_REGISTRY_URI",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
)


def script(cmd: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in DB_URL_VARS}
    return subprocess.run(
        ["bash", *cmd], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(cmd: list[str], env: dict[str, str], timeout: float = 400) -> str:
    out = script(cmd, env, timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def flow_runs(api: str) -> list[dict[str, Any]]:
    """Every flow run the Prefect server knows, through its REST API."""
    req = urllib.request.Request(
        f"{api}/flow_runs/filter", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return list(json.loads(r.read()))


def pg_rows(env: dict[str, str], db: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows straight from the cluster's database `db` (mlflow or prefect), not through the servers."""
    import psycopg

    url = ok([POSTGRES, "url", db], env).strip()
    url = url.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url, connect_timeout=10) as conn:
        return list(conn.execute(sql, args).fetchall())  # type: ignore[arg-type]


def kill_cluster(pgdir: Path) -> None:
    """Last resort after `servers.sh stop`: an immediate shutdown (SIGQUIT) of a postmaster still running."""
    pidfile = pgdir / "data" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pidfile.read_text().splitlines()[0])
        if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return  # a stale file, and a pid since reused by something else
        os.kill(pid, signal.SIGQUIT)
        deadline = time.time() + 20
        while time.time() < deadline:
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


def test_servers_script_refuses_clearly_without_postgres(tmp_path):
    """MEDCLF_DB=postgres without initdb/pg_ctl on PATH: a clear error before any server starts; an unknown
    MEDCLF_DB is refused too (never a silent fall back to SQLite)."""
    env = {
        "MEDCLF_DB": "postgres",
        "PATH": "/usr/bin:/bin",
        "MEDCLF_PG_DIR": str(tmp_path / "pg"),
        "MLFLOW_PORT": str(free_port()),
        "PREFECT_PORT": str(free_port()),
        "MLFLOW_STORE_DIR": str(tmp_path / "mlflow"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    if shutil.which("initdb", path=env["PATH"]) or shutil.which("pg_ctl", path=env["PATH"]):
        pytest.skip("initdb/pg_ctl are in /usr/bin here: no PATH without them to test with")
    try:
        out = script([SERVERS, "start"], env, timeout=300)
        assert out.returncode == 3, (out.stdout, out.stderr)
        assert "`initdb` is not on PATH" in out.stderr and "postgresql-15" in out.stderr, out.stderr
        assert not (tmp_path / "mlflow" / "server.pid").exists() and not (tmp_path / "prefect").exists()
        out = script([SERVERS, "start"], {**env, "MEDCLF_DB": "postgresql"}, timeout=300)
        assert out.returncode == 2 and "MEDCLF_DB is sqlite (the default) or postgres" in out.stderr, out.stderr
        out = script([str(ROOT / "mlflow/server.sh"), "start"], {**env, "MEDCLF_DB": "pg"}, timeout=300)
        assert out.returncode == 2 and "not 'pg'" in out.stderr, out.stderr
    finally:  # a broken refusal starts the servers after all: stop them (nothing to do when it refused)
        script([SERVERS, "stop"], env, timeout=200)


def test_explicit_database_urls_win_over_the_local_cluster(tmp_path):
    """MEDCLF_DB=postgres with both URLs given explicitly (a shared database server of one's own): no local
    cluster is created or needed (initdb is not even on PATH here), and each server uses the URL it was given."""
    env = {
        "MEDCLF_DB": "postgres",
        "PATH": "/usr/bin:/bin",
        "MEDCLF_PG_DIR": str(tmp_path / "pg"),
        "MLFLOW_PORT": str(free_port()),
        "PREFECT_PORT": str(free_port()),
        "MLFLOW_STORE_DIR": str(tmp_path / "mlflow"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/explicit-mlflow.db",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/explicit-prefect.db",
    }
    if shutil.which("initdb", path=env["PATH"]):
        pytest.skip("initdb is in /usr/bin here: no PATH without it to prove the cluster is not needed")
    try:
        out = ok([SERVERS, "start"], env)
        assert f"(backend sqlite:///{tmp_path}/explicit-mlflow.db)" in out, out
        status = ok([SERVERS, "status"], env)
        assert f"(database sqlite+aiosqlite:///{tmp_path}/explicit-prefect.db)" in status, status
        assert (tmp_path / "explicit-mlflow.db").exists() and (tmp_path / "explicit-prefect.db").exists()
        assert not (tmp_path / "pg").exists(), "a local cluster was created although both URLs were given"
    finally:
        script([SERVERS, "stop"], env, timeout=200)


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_PG,
    reason="PostgreSQL's initdb and pg_ctl are not on PATH (Debian: postgresql-15, "
    "/usr/lib/postgresql/15/bin): the MEDCLF_DB=postgres backend needs a real cluster",
)
def test_flow_on_postgres_and_s3_survives_a_restart(tmp_path, s3_server):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from medclf.infra import catalog

    bucket, model = f"medclf-pg-{uuid.uuid4().hex[:8]}", f"pgtest-{uuid.uuid4().hex[:8]}"
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket=bucket)
    # the cluster's folder: under /tmp, not tmp_path, whose 0700 parents close it to the `postgres` user the
    # script runs the cluster as when the tests run as root (as CI does)
    pgdir = Path(tempfile.mkdtemp(prefix="medclf-pg-"))
    mlflow_port, prefect_port = free_port(), free_port()
    env = {
        "MEDCLF_DB": "postgres",
        "MEDCLF_PG_DIR": str(pgdir),
        "MEDCLF_PG_PORT": str(free_port()),
        "MLFLOW_PORT": str(mlflow_port),
        "MLFLOW_STORE_DIR": str(tmp_path / "mlflow"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlflow",
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "PREFECT_PORT": str(prefect_port),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    uri, api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    clock, phases = time.time(), []
    flow: subprocess.CompletedProcess[str] | None = None

    def phase(name: str) -> None:  # where the time goes, printed at the end (pytest -s, or on failure)
        nonlocal clock
        phases.append(f"{name} {time.time() - clock:.1f}s")
        clock = time.time()

    try:
        out = ok([SERVERS, "start"], env)
        phase("first start (initdb, migrations)")
        assert "created the cluster" in out and "created database mlflow" in out and "postgresql+psycopg://" in out
        assert "(backend postgresql+psycopg://medclf:***@" in out, out  # the password is never printed
        status = ok([SERVERS, "status"], env)
        assert "Prefect: up" in status and "(database postgresql+asyncpg://medclf:***@" in status, status
        assert "PostgreSQL: up" in status, status

        # the whole flow, in its own process, against this Prefect server and this MLflow
        checkout = make_checkout(tmp_path / "co", {"register": {"model_name": model}})
        base = {k: v for k, v in os.environ.items() if k not in DB_URL_VARS}
        flow = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.retrain",
                "--project-dir",
                str(checkout),
                "--no-push",
                "--retry-delay",
                "0.2",
            ],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env={
                **base,
                "PREFECT_API_URL": api,
                "MLFLOW_TRACKING_URI": uri,
                "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            },
        )
        assert flow.returncode == 0, f"{flow.stdout[-3000:]}\n{flow.stderr[-5000:]}"
        phase("checkout + flow")
        version = json.loads((checkout / "reports/register.json").read_text())["version"]
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # a person promotes the challenger, as in the UI
        client.set_registered_model_alias(model, "champion", version)
        mv = client.get_model_version(model, version)
        assert set(mv.aliases) == {"challenger", "champion"}
        metrics = client.get_run(mv.run_id).data.metrics
        assert metrics, "the registered run has no metrics"
        card = Path(
            download_artifacts(
                run_id=mv.run_id, artifact_path=catalog.RUN_CARD, tracking_uri=uri, dst_path=str(tmp_path / "dl1")
            )
        ).read_bytes()
        (key,) = [
            k["Key"]
            for k in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])
            if k["Key"].endswith(catalog.RUN_CARD)
        ]
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == card  # the artifact lives on S3
        (run,) = flow_runs(api)
        assert run["state"]["type"] == "COMPLETED" and f"v{version}" in run["state"]["message"], run["state"]

        def in_postgres() -> None:
            """The rows are in PostgreSQL itself: the registry, the alias, the metrics, the flow run."""
            assert pg_rows(env, "mlflow", "SELECT name FROM registered_models WHERE name = %s", (model,)) == [(model,)]
            aliases = pg_rows(
                env, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (model,)
            )
            assert sorted(aliases) == [("challenger", int(version)), ("champion", int(version))], aliases
            assert len(
                pg_rows(env, "mlflow", "SELECT key FROM latest_metrics WHERE run_uuid = %s", (mv.run_id,))
            ) == len(metrics)
            rows = pg_rows(env, "prefect", "SELECT id::text, state_type::text FROM flow_run")
            assert rows == [(run["id"], "COMPLETED")], rows

        in_postgres()
        phase("checks")

        # stop everything, the cluster included
        ok([SERVERS, "stop"], env, timeout=200)
        assert not healthy(f"{uri}/health") and not healthy(f"{api}/health")
        assert not (pgdir / "data" / "postmaster.pid").exists(), "servers.sh stop left PostgreSQL running"
        assert script([POSTGRES, "status"], env).returncode == 1
        phase("stop")

        # ... and start again: the same cluster and databases (nothing created), everything still there
        out = ok([SERVERS, "start"], env)
        assert "created" not in out and "PostgreSQL up" in out, out
        phase("restart")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        again = client.get_model_version(model, version)
        assert set(again.aliases) == {"challenger", "champion"} and again.run_id == mv.run_id
        assert client.get_model_version_by_alias(model, "champion").version == str(version)
        assert client.get_run(mv.run_id).data.metrics == metrics
        assert (
            Path(
                download_artifacts(
                    run_id=mv.run_id, artifact_path=catalog.RUN_CARD, tracking_uri=uri, dst_path=str(tmp_path / "dl2")
                )
            ).read_bytes()
            == card
        )
        (after,) = flow_runs(api)
        assert after["id"] == run["id"] and after["state"]["type"] == "COMPLETED", after
        in_postgres()
        phase("checks after restart")
    finally:
        # pytest shows this only when the test fails: what the flow and the MLflow server said
        print("phases:", ", ".join(phases))
        if flow is not None:
            print("--- flow stderr (tail) ---\n", flow.stderr[-4000:])
        with contextlib.suppress(OSError):
            print("--- MLflow server.log (tail) ---\n", (tmp_path / "mlflow/server.log").read_text()[-4000:])
        script([SERVERS, "stop"], env, timeout=200)
        kill_cluster(pgdir)
        shutil.rmtree(pgdir, ignore_errors=True)
