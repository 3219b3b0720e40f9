"""`medclf <stage>` leaves its outcome in a result file on every exit (issue 11): the orchestrator reads
that file and the exit code, never the stage's stdout. In process, on real stages and real exceptions."""

from __future__ import annotations

import json
from urllib.error import URLError

import pytest

from medclf.cli import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_STAGE,
    EXIT_TEMPFAIL,
    RESULT_FILE_ENV,
    RUN_TOKEN_ENV,
    error_record,
    main,
)
from medclf.infra import catalog
from tests.conftest import write_params


def test_a_bad_params_yaml_still_leaves_its_structured_error(tmp_path, monkeypatch, capsys):
    """No settings, so no cache_dir: the orchestrator names the file (MEDCLF_STAGE_RESULT); exit 2."""
    params = write_params(tmp_path)
    params.write_text(params.read_text() + "\nnot_a_section: 1\n")
    out = tmp_path / "elsewhere" / "train.json"
    monkeypatch.setenv(RUN_TOKEN_ENV, "tok-1")
    monkeypatch.setenv(RESULT_FILE_ENV, str(out))
    assert main(["--params", str(params), "train"]) == EXIT_CONFIG
    record = json.loads(out.read_text())
    assert record["token"] == "tok-1" and record["exit_code"] == EXIT_CONFIG and "result" not in record
    assert record["error"] == {
        "stage": "train",
        "error_type": "ConfigError",
        "exit_code": EXIT_CONFIG,
        "transient": False,
        "message": record["error"]["message"],
    }
    assert "not_a_section" in record["error"]["message"]
    assert "not_a_section" in capsys.readouterr().err  # and one clear line for a person


def test_stage_result_on_failure_and_on_success(tmp_path, monkeypatch, capsys):
    """A refused ingest (deterministic: exit 3, not transient) writes its error to catalog.STAGE_RESULT under
    cache_dir; a passing ingest replaces it with its result, which is also printed for a person, unless an
    orchestrator's token says the file is read instead."""
    monkeypatch.delenv(RESULT_FILE_ENV, raising=False)
    monkeypatch.delenv(RUN_TOKEN_ENV, raising=False)
    from medclf.config import load_settings

    bad = write_params(tmp_path, {"ingest": {"positive_class": "no-such-class"}})
    where = catalog.STAGE_RESULT.path(load_settings(bad).paths, stage="ingest")
    assert where == tmp_path / ".cache" / "runs" / "ingest.json"
    assert main(["--params", str(bad), "ingest"]) == EXIT_STAGE
    record = json.loads(where.read_text())
    assert record["error"]["error_type"] == "IngestError" and record["error"]["transient"] is False
    assert record["exit_code"] == EXIT_STAGE and record["token"] is None
    assert "medclf ingest: IngestError: " in capsys.readouterr().err

    good = write_params(tmp_path)
    monkeypatch.setenv(RUN_TOKEN_ENV, "tok-2")
    assert main(["--params", str(good), "ingest"]) == 0
    record = json.loads(where.read_text())
    assert record["token"] == "tok-2" and record["exit_code"] == 0 and "error" not in record
    assert record["result"]["images"] == 80 and record["seconds"] > 0
    assert capsys.readouterr().out.strip() == f"medclf ingest: done in {record['seconds']:.1f} s; result in {where}"
    monkeypatch.delenv(RUN_TOKEN_ENV)
    assert main(["--params", str(good), "ingest"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 80  # by hand: the JSON, for a person


def _raised(inner: Exception, outer: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as err:
            raise outer from err
    except Exception as err:  # noqa: BLE001 - the exception as a stage would raise it, cause attached
        return err


def _s3(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    from medclf.sources.base import SourceError

    return _raised(
        ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"),
        SourceError("s3://b/k: cannot read"),
    )


def _connection_lost() -> Exception:
    from botocore.exceptions import EndpointConnectionError

    return _raised(EndpointConnectionError(endpoint_url="http://x"), RuntimeError("registering failed"))


def _marked(name: str) -> Exception:
    from medclf.infra.tracking import TrackingUnavailable
    from medclf.sources.base import SourceChanged, SourceError

    return {
        "tracking": TrackingUnavailable("down"),
        "changed": SourceChanged("changed"),
        "download": SourceError("offline?", transient=True),
    }[name]


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: _s3("SlowDown", 503), EXIT_TEMPFAIL),
        (lambda: _s3("AccessDenied", 403), EXIT_STAGE),
        (_connection_lost, EXIT_TEMPFAIL),
        (lambda: _marked("tracking"), EXIT_TEMPFAIL),
        (lambda: _marked("changed"), EXIT_TEMPFAIL),
        (lambda: _marked("download"), EXIT_TEMPFAIL),
        (lambda: URLError(ConnectionRefusedError(111, "refused")), EXIT_TEMPFAIL),
        (lambda: KeyError("a bug"), EXIT_ERROR),
    ],
    ids=[
        "s3-slowdown",
        "s3-denied",
        "connection-in-cause",
        "tracking-down",
        "source-changed",
        "download-failed",
        "urlerror",
        "bug",
    ],
)
def test_exit_code_follows_what_the_exception_says(make, code):
    """Transient where the error is raised (an attribute) or by what caused it, never by its text."""
    record = error_record("ingest", make())
    assert record["exit_code"] == code and record["transient"] is (code == EXIT_TEMPFAIL), record


def test_a_killed_stage_leaves_its_running_marker_and_is_transient(tmp_path):
    """The real `medclf ingest`, SIGKILLed once it started: no final record replaces the marker it wrote
    first, so the orchestrator reads "killed" (transient, a retry resumes) from this run's file."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tasks.common import StageFailed, read_result

    out = tmp_path / "ingest.json"
    env = {**os.environ, RUN_TOKEN_ENV: "tok-3", RESULT_FILE_ENV: str(out)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("medclf")), "--params", str(write_params(tmp_path)), "ingest"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    record = read_result(out, "tok-3")
    assert record == {"stage": "ingest", "status": "running", "pid": proc.pid, "token": "tok-3"}, record
    assert read_result(out, "another-run") is None  # a file of another invocation is never read as this one's
    killed = StageFailed.from_run("ingest", record, [])
    assert killed.transient and killed.error_type == "Killed"
