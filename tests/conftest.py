"""Shared fixtures: real servers (MLflow + SQLite, moto S3, Prefect API), started once per session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from medclf.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHEST_XRAY = SHARED / "data" / "chest_xray"
KERMANY_REGEX = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MEDCLF_PATIENT_SALT", "test-salt-not-secret")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry writes racing the test DB
# MLflow 3 telemetry: off, as in the Makefile. Its client thread pops _MLFLOW_TELEMETRY_SESSION_ID from os.environ
# while another thread iterates it (requests reading proxies): a KeyError that failed 9 evaluate tests at setup.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow 3.x servers start ~8 huey job-consumer processes (GenAI jobs) that this project never uses: each imports
# mlflow, ~20 CPU-s per server start on 2 cores. mlflow/server.sh turns them off the same way.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# The Prefect test server re-offers a run held by a deployment's concurrency limit after this many seconds (default
# 30; a server setting, read when the session's server starts): tests/test_concurrency.py holds one that way.
os.environ.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server or worker and everything it started; never raises, never leaks.

    SIGTERM to its process group (start it with `start_new_session=True`), wait, then SIGKILL the
    group. A Prefect worker under load did not exit within 30 s of SIGTERM, and a bare `wait(30)`
    then failed the test and left the worker running after the suite (issue 12, row 18).
    """
    import signal

    def _signal(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig) if os.getpgid(proc.pid) == proc.pid else proc.send_signal(sig)

    if proc.poll() is None:
        _signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # children of an exited leader too
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not start in {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def start_mlflow_server(workdir: Path, artifacts: str | None = None, env: dict[str, str] | None = None):
    """A real `mlflow server` (SQLite backend) on a free port; yields its URI.

    `artifacts` is the `--artifacts-destination` (a local folder by default, or `s3://bucket/prefix`
    with `MLFLOW_S3_ENDPOINT_URL` in `env`).
    """
    port, log = free_port(), workdir / "server.log"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                str(mlflow_bin),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{workdir}/mlflow.db",
                "--artifacts-destination",
                artifacts or str(workdir / "artifacts"),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", proc, 300, log)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextlib.contextmanager
def restored_mlflow_globals():
    """MLflow's process-wide tracking/registry URIs and active experiment, and the environment variables that
    setting them writes, put back as they were when the block ends.

    `tracking.configure` (any stage or registry call run in process) does `mlflow.set_tracking_uri`, which
    exports MLFLOW_TRACKING_URI, and the environment wins over params.yaml: a test that ran against a server of
    its own (test_promotion_audit's) left that URI behind, and 7 tests on the same xdist worker then talked to
    the stopped server ("connection refused" on a port none of them had started; CI, 2026-12-07)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (
        tracking_utils._tracking_uri,
        registry_utils._registry_uri,
        fluent._active_experiment_id,
        {name: os.environ.get(name) for name in MLFLOW_ENV},
    )
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id = saved[:3]
        for name, value in saved[3].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True, scope="module")
def _mlflow_globals_per_module():
    """The same around each test file: a module fixture that trains or evaluates (test_kclass_pipeline's) points
    MLflow at its server before any test's own guard starts; the next file must not inherit that."""
    with restored_mlflow_globals():
        yield


@pytest.fixture(autouse=True)
def _mlflow_globals_per_test():
    """Every test starts with the MLflow globals the one before it started with (see restored_mlflow_globals)."""
    with restored_mlflow_globals():
        yield


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` (SQLite backend, local artifacts), shared by the session."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer: a real HTTP S3 endpoint on loopback."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def prefect_api():
    """A real temporary Prefect API server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def write_params(tmp: Path, overrides: dict | None = None) -> Path:
    """params.yaml for a test: the repository defaults, tiny sizes, all paths inside `tmp`."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["paths"] = {
        "raw_data": str(tmp / "data/raw"),
        "external_data": str(tmp / "data/external"),
        "ingest_dir": str(tmp / "data/ingest"),
        "augment_dir": str(tmp / "data/augment"),
        "model_dir": str(tmp / "models"),
        "reports_dir": str(tmp / "reports"),
        "cache_dir": str(tmp / ".cache"),
    }
    # in-process stage tests ingest tiny synthetic phantoms (the repository default is the real demo folder)
    data["ingest"]["source"] = {
        "kind": "synthetic",
        "synthetic": {"n_patients": 40, "images_per_patient": 2, "native_size": 48},
    }
    data["ingest"]["image_size"] = 32
    # tests train the small from-scratch net whatever the demo default is (tests that need pretrained
    # weights say so); the demo's real ImageNet MobileNetV2 is width 1.0 and two-phase
    data["train"].update(weights="none", width=0.35)
    data = deep_merge(data, overrides or {})
    src = data["ingest"]["source"]
    if src.get("kind") != "synthetic" and "raw_data" not in ((overrides or {}).get("paths") or {}):
        # a test that points ingest at files tracks exactly those files (params.yaml's rule)
        from medclf.config import Source, source_location

        where = source_location(Source.model_validate(src))
        if where:
            data["paths"]["raw_data"] = where
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def make_settings(tmp_path):
    """Factory: `make_settings({...overrides})` -> Settings rooted in tmp_path."""
    from medclf.config import load_settings

    def make(overrides: dict | None = None):
        return load_settings(write_params(tmp_path, overrides))

    return make


# --------------------------------------------------------------------------- end-of-suite leak check
# Every process a test starts inherits this marker (tests pass `{**os.environ, ...}` to their children), so a
# leaked process is found even after its parent died and it was re-parented to init. The value is unique to
# this pytest process: another suite running on the machine is not counted.
_LEAK_MARKER = "MEDCLF_PYTEST_SESSION"
# Under pytest-xdist the workers inherit the controller's token, so the controller's end-of-run check sees their
# children too (it runs after the workers have exited).
_LEAK_TOKEN = (
    os.environ.get(_LEAK_MARKER) if os.environ.get("PYTEST_XDIST_WORKER") else None
) or f"{os.getpid()}-{os.urandom(4).hex()}"
os.environ[_LEAK_MARKER] = _LEAK_TOKEN
_LEAK_TEST = "MEDCLF_PYTEST_TEST"  # the nodeid of the test running when a process was started
# Python's own helpers that live as long as the interpreter, by design, and die with it
_INTERPRETER_HELPERS = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
    "loky.backend.popen",
    "joblib.externals.loky",
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    os.environ[_LEAK_TEST] = item.nodeid


def leaked_processes() -> list[tuple[object, str]]:
    """Live processes started during this session and still running: descendants of pytest, and any process
    carrying this session's marker in its environment (orphans included). Returns (psutil.Process, who)."""
    import psutil

    me = psutil.Process()
    found: dict[int, psutil.Process] = {p.pid: p for p in me.children(recursive=True)}
    for p in psutil.process_iter():
        if p.pid == me.pid or p.pid in found:
            continue
        with contextlib.suppress(psutil.Error):
            if p.environ().get(_LEAK_MARKER) == _LEAK_TOKEN:
                found[p.pid] = p
    leaked = []
    for p in found.values():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline()) or p.name()
            who = p.environ().get(_LEAK_TEST, "?")
        except psutil.Error:
            continue  # exited meanwhile, or not ours to read
        if any(h in cmd for h in _INTERPRETER_HELPERS):
            continue
        leaked.append((p, f"pid {p.pid} `{cmd[:200]}` (started during {who})"))
    return leaked


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a process behind (issue 12, row 18), naming it; then kill it.

    Runs after every fixture's teardown (session servers included), so anything still alive leaked.
    A process that is just exiting gets a few seconds first.
    """
    if sys.platform != "linux" or hasattr(session.config, "workerinput"):
        return
    import psutil

    leaked = leaked_processes()
    if leaked:
        _gone, alive = psutil.wait_procs([p for p, _ in leaked], timeout=5)
        alive_pids = {p.pid for p in alive}
        leaked = [(p, what) for p, what in leaked if p.pid in alive_pids]
    if not leaked:
        return
    lines = ["", f"LEAKED PROCESSES: {len(leaked)} process(es) started by the tests are still running:"]
    lines += [f"  {what}" for _, what in leaked]
    for p, _ in leaked:
        with contextlib.suppress(psutil.Error):
            p.kill()
    lines.append("  (killed now; a test must stop what it starts, e.g. with tests/conftest.py::stop_process)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
