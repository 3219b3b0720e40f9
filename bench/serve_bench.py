"""Batch-1 CPU latency of the served model over real HTTP.

Starts `mlflow models serve -m MODEL_URI --env-manager local -p PORT` (the production command),
waits for /ping, sends N single-image requests (a base64 PNG at the model's input size, the
way a client would send it), and reports p50/p95/mean latency in milliseconds. The same
helpers start and stop the server in tests/test_serve.py.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 .venv/bin/python bench/serve_bench.py \
        --model-uri models:/medclf-demo@challenger -n 200 --warmup 20 --out reports/bench/serve.json
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_bin() -> str:
    return str(Path(sys.executable).with_name("mlflow"))


@contextlib.contextmanager
def served(
    model_uri: str,
    tracking_uri: str | None,
    port: int | None = None,
    log_path: Path | None = None,
    timeout: float = 300,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`mlflow models serve` in its own process group; yields the base URL; always stopped after.

    env: extra environment for the server, e.g. MLFLOW_PYFUNC_INFERENCE_CONFIG (model_config overrides)."""
    with served_process(model_uri, tracking_uri, port, log_path, timeout, workers, env) as (url, _proc):
        yield url


@contextlib.contextmanager
def served_process(
    model_uri: str,
    tracking_uri: str | None,
    port: int | None = None,
    log_path: Path | None = None,
    timeout: float = 300,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """As `served`, yielding (base URL, the `mlflow models serve` process) for callers that watch it."""
    port = port or free_port()
    # mlflow runs `bash -c "exec uvicorn ..."`: the venv's bin must be on PATH (exit 127 otherwise)
    full_env = {
        **os.environ,
        **(env or {}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if tracking_uri:
        full_env["MLFLOW_TRACKING_URI"] = tracking_uri
    log_path = log_path or Path(f"/tmp/medclf-serve-{port}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                mlflow_bin(),
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                str(workers),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout, log_path)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # uvicorn workers are children: stop the whole group
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def invoke(url: str, payload: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """POST /invocations; raise with the server's message on HTTP errors."""
    req = urllib.request.Request(
        url + "/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"HTTP {err.code}: {err.read().decode(errors='replace')[:2000]}") from None


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    img = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_payload(images_b64: list[str]) -> dict[str, Any]:
    return {"dataframe_split": {"columns": ["image"], "data": [[b] for b in images_b64]}}


def measure(url: str, payload: dict[str, Any], n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        invoke(url, payload)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        invoke(url, payload)
        lat.append((time.perf_counter() - t0) * 1000)
    q = np.percentile(lat, [50, 95, 99])
    return {
        "n": n,
        "warmup": warmup,
        "p50_ms": round(float(q[0]), 2),
        "p95_ms": round(float(q[1]), 2),
        "p99_ms": round(float(q[2]), 2),
        "mean_ms": round(statistics.fmean(lat), 2),
        "min_ms": round(min(lat), 2),
        "max_ms": round(max(lat), 2),
    }


def _phantom(size: int, channels: int) -> np.ndarray:
    """A synthetic phantom at the model's input size (never a patient image)."""
    from medclf.sources.synthetic import phantom

    img = phantom(np.random.default_rng(0), size, True, 1.0)
    return np.repeat(img, 3, axis=-1) if channels == 3 else img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-uri", default=None, help="default: models:/<register.model_name>@challenger")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or params mlflow.tracking_uri")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--image", default=None, help="an image file to send (default: a synthetic phantom)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    from medclf.config import load_settings

    settings = load_settings(args.params)
    tracking = args.tracking_uri or settings.mlflow.resolved_uri()
    uri = args.model_uri or f"models:/{settings.registry.model_name}@challenger"
    if args.image:
        b64 = base64.b64encode(Path(args.image).read_bytes()).decode("ascii")
        size = "file"
    else:
        from mlflow import MlflowClient

        name, alias = uri[len("models:/") :].split("@", 1) if "@" in uri else (None, None)
        tags = MlflowClient(tracking_uri=tracking).get_model_version_by_alias(name, alias).tags if name else {}
        s, c = (
            int(tags.get("image_size", settings.ingest.image_size)),
            int(tags.get("channels", settings.ingest.channels)),
        )
        b64, size = png_b64(_phantom(s, c)), f"{s}x{s}x{c}"
    t0 = time.time()
    with served(uri, tracking, args.port) as url:
        startup = time.time() - t0
        first = invoke(url, image_payload([b64]))
        stats = measure(url, image_payload([b64]), args.n, args.warmup)
    result = {
        "model_uri": uri,
        "image": size,
        "server_startup_s": round(startup, 1),
        **stats,
        "prediction": first["predictions"][0],
        "cpu_count": os.cpu_count(),
        "command": f"mlflow models serve -m {uri} --env-manager local -p PORT -w 1",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
