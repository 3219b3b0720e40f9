"""S3 failure modes on moto's real HTTP server, through the flow.

- A transient failure (real 503 responses from a fault-injecting front of moto's server) outlasts
  boto3's own retries, fails the ingest attempt, and the flow's retry succeeds.
- A path-traversal key is rejected with an error naming the key, and never retried.
- A server that is down gives a clear error naming the endpoint instead of a stack trace.

The S3 end to end run (raw data in a bucket → ingest → … → register, the DVC remote on S3 with
a push and a `dvc pull` in a fresh clone, MLflow artifacts on S3) is the main project of
test_flow.py, so the suite trains only once.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from tests.conftest import free_port
from tests.test_flow import (
    flow_artifacts,
    make_checkout,
    run_flow,
    s3_client,
    s3_keys,
    task_runs,
    upload_demo,
)

pytestmark = pytest.mark.slow


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
                self.failed.append(
                    f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO')}?{environ.get('QUERY_STRING', '')}"
                )
        if fail:
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>injected by the test: please reduce your request rate</Message></Error>"
            )
            start_response("503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
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
            self._server = make_server(
                self._ip_address, self._port, holder["app"], True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    port = free_port()
    server = Server(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", holder["app"]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def data_bucket(tmp_path_factory, s3_server) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("s3data")
    client, bucket = s3_client(s3_server), f"medclf-raw-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return {
        "client": client,
        "bucket": bucket,
        "images": upload_demo(client, bucket, "raw", tmp),
        "tmp": tmp,
        "endpoint": s3_server,
    }


def test_transient_s3_failure_is_retried_and_succeeds(data_bucket, flaky_s3, prefect_api, tmp_path):
    """503s on listing the bucket outlast boto3's own attempts, so ingest fails; the Prefect retry succeeds."""
    from medclf.sources.store import S3Store

    endpoint, flaky = flaky_s3
    uri = f"s3://{data_bucket['bucket']}/raw"
    # as many failures as the ingest S3 client makes attempts (botocore: 1 + its configured retries)
    n = S3Store(uri, endpoint).client.meta.config.retries["total_max_attempts"]
    checkout = make_checkout(
        tmp_path / "co", {"ingest": {"source": {"kind": "folder", "uri": uri, "s3_endpoint_url": endpoint}}}
    )
    # only ingest's own listing (boto3) fails; DVC's ETag check of the source (aiobotocore) is let through
    flaky.arm(
        n,
        lambda env: (
            env["REQUEST_METHOD"] == "GET"
            and "list-type=2" in env.get("QUERY_STRING", "")
            and "aiobotocore" not in env.get("HTTP_USER_AGENT", "")
        ),
    )
    state = run_flow(checkout, until="ingest", push=False)
    assert state.is_completed(), state.message
    assert len(flaky.failed) == n and flaky.remaining == 0, flaky.failed
    (ingest,) = state.result()["stages"]
    assert ingest["status"] == "ran" and ingest["attempt"] == 2, ingest
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["ingest"].run_count == 2
    assert state.result()["dataset"]["images"] == data_bucket["images"]
    lock_md5 = state.result()["dataset"]["dvc_md5"]
    assert lock_md5 and lock_md5 in flow_artifacts(state.state_details.flow_run_id)["medclf-retrain-summary"].data


def test_path_traversal_key_is_rejected_naming_the_key(data_bucket, prefect_api, tmp_path):
    p = data_bucket
    client, bucket = p["client"], p["bucket"]
    png = next((p["tmp"] / "demo").rglob("*.png")).read_bytes()
    for key in ("evil/normal/a.png", "evil/opacity/b.png", "evil/normal/../../escape.png"):
        client.put_object(Bucket=bucket, Key=key, Body=png)
    assert "evil/normal/../../escape.png" in s3_keys(client, bucket, "evil/")
    checkout = make_checkout(
        tmp_path / "co",
        {"ingest": {"source": {"kind": "folder", "uri": f"s3://{bucket}/evil", "s3_endpoint_url": p["endpoint"]}}},
    )
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
    settings = make_settings(
        {"ingest": {"source": {"kind": "folder", "uri": "s3://nobody-home/raw", "s3_endpoint_url": dead}}}
    )
    with pytest.raises(SourceError) as err:
        ingest.run(settings)
    msg = str(err.value)
    assert "s3://nobody-home/raw" in msg and f"endpoint {dead}" in msg and "cannot list" in msg, msg
