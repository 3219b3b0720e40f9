"""S3 end to end on moto's real HTTP server: raw data in a bucket → ingest → validate → augment → train, with the DVC
remote on S3 (push here, pull in a fresh clone) and MLflow storing its artifacts on S3. The flow runs
up to `train` here (the first stage that logs to MLflow); evaluate/register run in test_flow.py.

Also: a transient S3 failure (real 503 responses from a fault-injecting front of moto's server)
is retried by the flow and succeeds; a path-traversal key is rejected naming the key; a server
that is down gives a clear error instead of a stack trace.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _wait_http, free_port
from tests.test_flow import flow_artifacts, make_checkout, run_cmd, run_flow, task_runs

pytestmark = pytest.mark.slow
DVC_KEY, DVC_SECRET = "AKIAMEDCLFDVCTEST", "medclf-dvc-secret-not-real"


class FlakyS3:
    """WSGI middleware in front of moto: answers the next `n` matching requests with 503 SlowDown.

    The failures are real HTTP responses on a real socket, so boto3's own retries and then the
    Prefect task retry are exercised exactly as with a throttling or failing S3.
    """

    def __init__(self, app: Any) -> None:
        self.app, self.remaining, self.failed, self.lock = app, 0, [], threading.Lock()
        self.match = lambda environ: False

    def arm(self, n: int, match) -> None:
        with self.lock:
            self.remaining, self.match, self.failed = n, match, []

    def __call__(self, environ: dict, start_response):
        with self.lock:
            fail = self.remaining > 0 and self.match(environ)
            if fail:
                self.remaining -= 1
                self.failed.append(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO')}?"
                                   f"{environ.get('QUERY_STRING', '')}")
        if fail:
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>injected by the test: please reduce your request rate</Message></Error>")
            start_response("503 Slow Down", [("Content-Type", "application/xml"),
                                              ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def flaky_s3(s3_server):
    """A second moto ThreadedMotoServer (same in-process backend as `s3_server`) behind `FlakyS3`."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    holder: dict[str, FlakyS3] = {}

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:
            holder["app"] = FlakyS3(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, holder["app"], True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    port = free_port()
    server = Server(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", holder["app"]
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload_demo(client, bucket: str, prefix: str, tmp: Path) -> int:
    """The SYNTHETIC demo phantoms as PNG class folders under s3://bucket/prefix/<class>/."""
    from medclf.config import SyntheticSource
    from medclf.sources.demo import write_demo_folder

    folder = tmp / "demo"
    write_demo_folder(SyntheticSource(n_patients=40, images_per_patient=2, native_size=48), folder)
    n = 0
    for f in sorted(folder.rglob("*.png")):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}", Body=f.read_bytes())
        n += 1
    return n


@pytest.fixture(scope="module")
def mlflow_s3(tmp_path_factory, s3_server):
    """An extra MLflow server whose artifact store is s3://<bucket>/mlflow on moto."""
    bucket = f"medclf-mlflow-{uuid.uuid4().hex[:8]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    d = tmp_path_factory.mktemp("mlflow-s3")
    port, log = free_port(), d / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
             "--artifacts-destination", f"s3://{bucket}/mlflow"], stdout=fh, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", proc, 180, log)
        yield {"uri": uri, "bucket": bucket}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def s3_project(tmp_path_factory, s3_server, mlflow_s3, prefect_api):
    bucket = f"medclf-data-{uuid.uuid4().hex[:8]}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("s3flow")
    n = upload_demo(client, bucket, "raw", tmp)
    model = f"s3test-{uuid.uuid4().hex[:8]}"
    checkout = make_checkout(tmp / "checkout", {
        "ingest": {"source": {"kind": "folder", "uri": f"s3://{bucket}/raw", "s3_endpoint_url": s3_server}},
        "register": {"model_name": model}})
    # the DVC remote on S3: URL and endpoint in .dvc/config (committed), credentials only in config.local
    run_cmd(checkout, "dvc", "remote", "add", "-d", "s3store", f"s3://{bucket}/dvcstore")
    run_cmd(checkout, "dvc", "remote", "modify", "s3store", "endpointurl", s3_server)
    run_cmd(checkout, "dvc", "remote", "modify", "--local", "s3store", "access_key_id", DVC_KEY)
    run_cmd(checkout, "dvc", "remote", "modify", "--local", "s3store", "secret_access_key", DVC_SECRET)
    run_cmd(checkout, "git", "add", ".dvc/config")
    run_cmd(checkout, "git", "commit", "-qm", "S3 DVC remote")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_s3["uri"])
        mp.delenv("MEDCLF_GPU_DEPLOYMENT", raising=False)
        yield {"checkout": checkout, "bucket": bucket, "client": client, "images": n, "model": model,
               "endpoint": s3_server, "tmp": tmp}


def keys(client, bucket: str, prefix: str) -> list[str]:
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_s3_end_to_end_ingest_dvc_remote_and_mlflow_artifacts(s3_project, mlflow_s3):
    p = s3_project
    checkout, client = p["checkout"], p["client"]
    # up to train: the first stage that talks to MLflow; evaluate/register are covered by test_flow.py
    state = run_flow(checkout, until="train")
    assert state.is_completed(), state.message
    result = state.result()
    assert [o["stage"] for o in result["stages"]] == ["ingest", "validate", "augment", "train"]
    assert all(o["status"] == "ran" for o in result["stages"]), result["stages"]
    # ingest read the bucket: every uploaded PNG is in the manifest with its s3:// URI
    import pandas as pd

    manifest = pd.read_parquet(checkout / "data/ingest/manifest.parquet")
    assert len(manifest) == p["images"]
    assert manifest.source_uri.str.startswith(f"s3://{p['bucket']}/raw/").all()
    # the DVC remote on S3 received the pushed outputs
    assert result["push"]["remote"] == "s3store" and result["push"]["pushed"] > 0
    assert keys(client, p["bucket"], "dvcstore/")
    # MLflow stored the training run's artifacts on S3 (through the server's artifact proxy)
    run_id = json.loads((checkout / "models/train_run.json").read_text())["run_id"]
    stored = keys(client, mlflow_s3["bucket"], "mlflow/")
    mine = [k for k in stored if f"/{run_id}/" in k]
    assert any(k.endswith("/train/history.csv") for k in mine), stored[:20]
    assert any(k.endswith("/train/train_run.json") for k in mine), stored[:20]
    # credentials live only in the git-ignored .dvc/config.local: never in params.yaml or git
    assert DVC_SECRET not in (checkout / ".dvc/config").read_text()
    assert DVC_SECRET not in (checkout / "params.yaml").read_text()
    assert DVC_SECRET in (checkout / ".dvc/config.local").read_text()
    assert run_cmd(checkout, "git", "check-ignore", ".dvc/config.local").strip()
    grep = subprocess.run(["git", "grep", "-I", DVC_SECRET], check=False, cwd=checkout, capture_output=True,
                          text=True)
    assert grep.returncode == 1, grep.stdout
    # pull: a fresh clone with only its own credentials gets identical data and model from S3
    run_cmd(checkout, "git", "add", "dvc.lock", "params.yaml")
    run_cmd(checkout, "git", "commit", "-qm", "pipeline run")
    clone = p["tmp"] / "clone"
    run_cmd(p["tmp"], "git", "clone", "-q", str(checkout), str(clone))
    run_cmd(clone, "dvc", "remote", "modify", "--local", "s3store", "access_key_id", DVC_KEY)
    run_cmd(clone, "dvc", "remote", "modify", "--local", "s3store", "secret_access_key", DVC_SECRET)
    run_cmd(clone, "dvc", "pull", "-q")
    for out in ("data/ingest", "data/augment", "models"):
        assert digests(clone / out) == digests(checkout / out), out
    # every cached output of the run is on the remote (cache: false reports are git's business, not DVC's)
    assert json.loads(run_cmd(checkout, "dvc", "status", "--cloud", "--json") or "{}") == {}


def test_transient_s3_failure_is_retried_and_succeeds(s3_project, flaky_s3):
    """503s on listing the bucket outlast boto3's own attempts, so ingest fails; the Prefect retry succeeds."""
    from medclf.sources.store import S3Store
    from tests.test_flow import set_params

    endpoint, flaky = flaky_s3
    p = s3_project
    # as many failures as the ingest S3 client makes attempts (botocore: 1 + its configured retries)
    n = S3Store(f"s3://{p['bucket']}/raw", endpoint).client.meta.config.retries["total_max_attempts"]
    set_params(p["checkout"], {"ingest": {"source": {"s3_endpoint_url": endpoint}}})
    flaky.arm(n, lambda env: env["REQUEST_METHOD"] == "GET" and "list-type=2" in env.get("QUERY_STRING", ""))
    state = run_flow(p["checkout"], until="ingest", push=False)
    assert state.is_completed(), state.message
    assert len(flaky.failed) == n and flaky.remaining == 0, flaky.failed
    (ingest,) = state.result()["stages"]
    assert ingest["status"] == "ran" and ingest["attempt"] == 2, ingest
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["ingest"].run_count == 2
    # same bytes from the same bucket: the dataset version did not change
    lock_md5 = state.result()["dataset"]["dvc_md5"]
    assert lock_md5 and lock_md5 in flow_artifacts(state.state_details.flow_run_id)["medclf-retrain-summary"].data


def test_path_traversal_key_is_rejected_naming_the_key(s3_project, tmp_path):
    p = s3_project
    client, bucket = p["client"], p["bucket"]
    png = next((p["tmp"] / "demo").rglob("*.png")).read_bytes()
    for key in ("evil/normal/a.png", "evil/opacity/b.png", "evil/normal/../../escape.png"):
        client.put_object(Bucket=bucket, Key=key, Body=png)
    assert "evil/normal/../../escape.png" in keys(client, bucket, "evil/")
    checkout = make_checkout(tmp_path / "co", {"ingest": {"source": {
        "kind": "folder", "uri": f"s3://{bucket}/evil", "s3_endpoint_url": p["endpoint"]}}})
    state = run_flow(checkout, until="ingest", push=False)
    assert state.is_failed()
    msg = state.message or ""
    assert "stage 'ingest' failed" in msg and "evil/normal/../../escape.png" in msg and "'..'" in msg, msg
    # deterministic: rejected once, not retried
    assert task_runs(state.state_details.flow_run_id)["ingest"].run_count == 1


def test_s3_server_down_gives_a_clear_error(make_settings):
    from medclf.sources.base import SourceError
    from medclf.stages import ingest

    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings({"ingest": {"source": {"kind": "folder", "uri": "s3://nobody-home/raw",
                                                    "s3_endpoint_url": dead}}})
    with pytest.raises(SourceError) as err:
        ingest.run(settings)
    msg = str(err.value)
    assert "s3://nobody-home/raw" in msg and f"endpoint {dead}" in msg and "cannot list" in msg, msg
