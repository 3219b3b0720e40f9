"""Serving under load: concurrent clients against `mlflow models serve` (1 and 2 workers), batching, soak.

Starts the production command `mlflow models serve -m MODEL_URI --env-manager local -w W` (via
bench/serve_bench.py's helpers) and, for each worker count W:

  * load: C concurrent clients (default 1, 4, 16), each with its own keep-alive HTTP connection, each sending
    a fixed count of single-image requests (default 50), after a warm-up;
  * batching: 4 clients sending B images per request (default 1, 8, 32), the same number of images in all;
  * soak (with the last W only): 5,000 single-image requests from 4 clients, in 10 chunks; the server's RSS
    (summed over its process tree: the `mlflow` CLI, uvicorn and its workers; psutil) is sampled before the
    first chunk and after every chunk;
  * oversize (with the first W only): one request whose single cell is 200 MiB of base64 text: its answer,
    time and the server's RSS before, at peak and after (MLflow reads the whole body before the pyfunc's
    size limit can refuse it).

Reports throughput (req/s, img/s), p50/p95/p99 latency and errors (any non-200 answer, wrong row count or
socket error), prints a table and writes JSON. The payload is real: base64 JPEGs from the embedded demo
(data/demo/batch1, 128 px grey), decoded and resized by the served pyfunc as a client's files would be. The
clients run on the same machine as the server, so they share its cores (their CPU time is reported).

The model is either an already registered one (`--model-uri`, with MLFLOW_TRACKING_URI), or a trained
`model.keras` (`--keras-model`, with the `classes.json` ingest wrote and optionally evaluate's `gates.json`
for the threshold), which this script registers as the served pyfunc into a local SQLite registry in
`--workdir`, exactly as `medclf register` logs it (MedclfModel + model_config + signature):

    .venv/bin/python bench/serve_load.py --keras-model DEMO/models/model.keras \\
        --classes DEMO/data/ingest/classes.json --gates DEMO/reports/gates.json --out serve_load.json
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 .venv/bin/python bench/serve_load.py \\
        --model-uri models:/medclf-demo@champion --out serve_load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import contextlib

from bench.serve_bench import image_payload, served_process

DEMO = ROOT / "data" / "demo" / "batch1"


# ----------------------------------------------------------------------------- the model
def register_keras(
    keras_path: Path, classes_json: Path, gates_json: Path | None, workdir: Path, name: str = "medclf-load"
) -> tuple[str, str, dict[str, Any]]:
    """Log `keras_path` as the serving pyfunc (as `medclf register` does) in a SQLite registry; alias `bench`.
    Returns (model URI, tracking URI, what the model is)."""
    import keras
    import mlflow
    import mlflow.pyfunc

    from medclf.release.serving import KERAS_ARTIFACT, MedclfModel, ServingConfig, load_keras, signature

    meta = json.loads(classes_json.read_text())
    threshold = json.loads(gates_json.read_text())["threshold"] if gates_json else 0.5
    cfg = ServingConfig(
        classes=list(meta["classes"]),
        positive_class=str(meta["positive_class"]),
        threshold=float(threshold),
        image_size=int(meta["image_size"]),
        channels=int(meta["channels"]),
    )
    model = load_keras(str(keras_path))
    run_file = keras_path.parent / "train_run.json"  # what train wrote beside the model, if it is there
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    backbone = run.get("backbone") or next(
        (layer.name for layer in model.layers if isinstance(layer, keras.Model)), model.name
    )
    info = {
        "keras_model": str(keras_path),
        "input": f"{cfg.image_size}x{cfg.image_size}x{cfg.channels}",
        "params": int(model.count_params()),
        "backbone": backbone,
        "threshold": cfg.threshold,
        "weights": run.get("weights"),
        "backend": run.get("backend", keras.backend.backend()),
    }
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("serve-load")
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment("serve-load", artifact_location=(workdir / "artifacts").as_uri())
    )
    with mlflow.start_run(experiment_id=exp_id):
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=MedclfModel(),
            artifacts={KERAS_ARTIFACT: str(keras_path)},
            model_config=cfg.to_dict(),
            signature=signature(cfg.classes),
            pip_requirements=["mlflow"],
            registered_model_name=name,
        )
    client.set_registered_model_alias(name, "bench", str(logged.registered_model_version))
    return f"models:/{name}@bench", tracking, info


def demo_images(n: int) -> list[str]:
    """The first n demo JPEGs (both classes, sorted) as base64 text."""
    from medclf.release.serving import encode_file

    files = sorted(DEMO.glob("*/*.jp*g"))[:n]
    if len(files) < n:
        raise SystemExit(f"need {n} demo images under {DEMO}, found {len(files)}")
    return [encode_file(f.read_bytes()) for f in files]


# ----------------------------------------------------------------------------- the clients
def server_rss(pid: int) -> dict[str, Any]:
    """RSS of the `mlflow models serve` process and all its descendants (bytes), with the worker count."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss.append(p.memory_info().rss)
    return {"rss_mib": round(sum(rss) / 2**20, 1), "processes": len(rss), "largest_mib": round(max(rss) / 2**20, 1)}


def run_clients(
    url: str,
    bodies: list[bytes],
    images_per_request: int,
    clients: int,
    per_client: int,
    keepalive: bool = True,
    watch: list[Any] | None = None,
) -> dict[str, Any]:
    """`clients` threads, each sending `per_client` requests over one keep-alive connection (or, keepalive
    False, a new connection per request). watch: server processes whose CPU seconds are reported."""
    host, port = url.removeprefix("http://").split(":")
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        start.wait()
        for r in range(per_client):
            body = bodies[(k * per_client + r) % len(bodies)]
            t0 = time.perf_counter()
            try:
                if not keepalive:
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=300)
                conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
                if len(json.loads(data)["predictions"]) != images_per_request:
                    raise RuntimeError("wrong number of predictions")
                lat[k].append((time.perf_counter() - t0) * 1000)
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"{type(err).__name__}: {err}"[:300])
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=300)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    cpu0, server0 = time.process_time(), cpu_seconds(watch or [])
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = [x for per in lat for x in per]
    n = clients * per_client
    q = np.percentile(all_lat, [50, 95, 99]) if all_lat else [float("nan")] * 3
    return {
        "clients": clients,
        "images_per_request": images_per_request,
        "requests": n,
        "ok": len(all_lat),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "wall_s": round(wall, 2),
        "req_per_s": round(len(all_lat) / wall, 1),
        "img_per_s": round(len(all_lat) * images_per_request / wall, 1),
        "p50_ms": round(float(q[0]), 1),
        "p95_ms": round(float(q[1]), 1),
        "p99_ms": round(float(q[2]), 1),
        "client_cpu_s": round(time.process_time() - cpu0, 1),
        "keepalive": keepalive,
        "server_cpu_s": [round(b - a, 1) for a, b in zip(server0, cpu_seconds(watch or []), strict=False)],
    }


def cpu_seconds(procs: list[Any]) -> list[float]:
    """user + system CPU seconds of each process (0 for one that is gone)."""
    out = []
    for p in procs:
        try:
            t = p.cpu_times()
            out.append(t.user + t.system)
        except Exception:  # noqa: BLE001 - a process that ended counts 0
            out.append(0.0)
    return out


def server_processes(pid: int) -> list[Any]:
    """The processes that run the model: the leaves of the server's process tree (the uvicorn worker(s))."""
    import psutil

    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [p for p in tree if not p.children() and p.pid != pid]


def bodies_for(images: list[str], per_request: int, count: int = 8) -> list[bytes]:
    """`count` different request bodies of `per_request` images each (dataframe_split, as clients send)."""
    return [
        json.dumps(image_payload([images[(j * per_request + i) % len(images)] for i in range(per_request)])).encode()
        for j in range(count)
    ]


def wait_workers(log: Path, workers: int, timeout: float = 300) -> None:
    """/ping answers as soon as one worker is up: wait until every worker has loaded the model."""
    t0 = time.time()
    while len(re.findall(r"Application startup complete", log.read_text(errors="replace"))) < workers:
        if time.time() - t0 > timeout:
            raise RuntimeError(f"not all {workers} workers started:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- main
def one_server(
    uri: str, tracking: str | None, workers: int, args: argparse.Namespace, images: list[str], soak: bool
) -> dict[str, Any]:
    log = Path(args.workdir) / f"serve-w{workers}.log"
    out: dict[str, Any] = {"workers": workers, "load": [], "batching": []}
    t0 = time.time()
    with served_process(uri, tracking, log_path=log, workers=workers) as (url, proc):
        wait_workers(log, workers)
        out["startup_s"] = round(time.time() - t0, 1)
        watch = server_processes(proc.pid)
        keep = not args.no_keepalive
        single = bodies_for(images, 1)
        run_clients(url, single, 1, max(args.clients), args.warmup, False)  # new connections reach every worker
        out["rss_after_warmup"] = server_rss(proc.pid)
        for c in args.clients:
            row = {"workers": workers, "load1": load1(), **run_clients(url, single, 1, c, args.requests, keep, watch)}
            out["load"].append(row)
            print(fmt(row), flush=True)
        for b in args.batch_sizes:
            per_client = max(1, args.batch_images // b)
            bodies = bodies_for(images, b)
            # a new batch size traces a new predict function (seconds, once per worker): not measured
            run_clients(url, bodies, b, args.batch_clients * 2, 3, False)
            row = {
                "workers": workers,
                "load1": load1(),
                **run_clients(url, bodies, b, args.batch_clients, per_client, keep, watch),
            }
            out["batching"].append(row)
            print(fmt(row), flush=True)
        if soak:
            out["soak"] = soak_run(url, proc.pid, single, args, keep)
        if args.oversize_mib and workers == args.workers[0]:
            out["oversize"] = oversize_probe(url, proc.pid, args.oversize_mib)
            print(f"oversize: {out['oversize']}", flush=True)
    return out


def oversize_probe(url: str, pid: int, mib: int) -> dict[str, Any]:
    """One request whose single cell is `mib` MiB of base64 text: MLflow reads and parses the whole body before
    the pyfunc's limit refuses it. Records the answer, its time and the server's RSS before, at peak, after."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(image_payload(["A" * (mib << 20)])).encode()
    before = server_rss(pid)["rss_mib"]
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(server_rss(pid)["rss_mib"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = resp.read().decode(errors="replace")
    wall = time.perf_counter() - t0
    conn.close()
    done.set()
    watcher.join()
    time.sleep(1)
    return {
        "body_mib": round(len(body) / 2**20, 1),
        "status": resp.status,
        "seconds": round(wall, 2),
        "reason": answer[answer.find("Error: ") + 7 :][:160] if "Error: " in answer else answer[:160],
        "rss_mib_before": before,
        "rss_mib_peak": max(peak),
        "rss_mib_after": server_rss(pid)["rss_mib"],
    }


def soak_run(url: str, pid: int, bodies: list[bytes], args: argparse.Namespace, keep: bool) -> dict[str, Any]:
    chunks, clients = 10, 4
    per_client = args.soak // chunks // clients
    samples = [{"after_requests": 0, **server_rss(pid)}]
    rows = []
    for i in range(chunks):
        rows.append(run_clients(url, bodies, 1, clients, per_client, keep))
        samples.append({"after_requests": (i + 1) * clients * per_client, **server_rss(pid)})
        print(
            f"soak {samples[-1]['after_requests']:>5}: RSS {samples[-1]['rss_mib']} MiB, "
            f"errors {sum(r['errors'] for r in rows)}",
            flush=True,
        )
    rss = [s["rss_mib"] for s in samples]
    return {
        "requests": chunks * clients * per_client,
        "clients": clients,
        "ok": sum(r["ok"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
        "error_examples": sorted({e for r in rows for e in r["error_examples"]})[:3],
        "req_per_s": round(sum(r["ok"] for r in rows) / sum(r["wall_s"] for r in rows), 1),
        "p50_ms_by_chunk": [r["p50_ms"] for r in rows],
        "p99_ms_by_chunk": [r["p99_ms"] for r in rows],
        "rss_mib_start": rss[0],
        "rss_mib_mid": rss[chunks // 2],
        "rss_mib_end": rss[-1],
        "rss_mib_growth_second_half": round(rss[-1] - rss[chunks // 2], 1),
        "samples": samples,
    }


def fmt(r: dict[str, Any]) -> str:
    return (
        f"w={r['workers']} clients={r['clients']:>2} img/req={r['images_per_request']:>2} "
        f"n={r['requests']:>5}  {r['req_per_s']:>7.1f} req/s {r['img_per_s']:>7.1f} img/s  "
        f"p50 {r['p50_ms']:>7.1f}  p95 {r['p95_ms']:>7.1f}  p99 {r['p99_ms']:>7.1f} ms  "
        f"errors {r['errors']}  CPU s client {r['client_cpu_s']} server {r['server_cpu_s']}  load {r['load1']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-uri", help="a registered model (MLFLOW_TRACKING_URI says where)")
    src.add_argument("--keras-model", type=Path, help="a trained model.keras to register and serve")
    ap.add_argument("--classes", type=Path, help="ingest's classes.json (with --keras-model)")
    ap.add_argument("--gates", type=Path, help="evaluate's gates.json: the threshold (with --keras-model)")
    ap.add_argument("--workdir", default=None, help="registry, logs (default: a temporary folder)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=50, help="requests per client in the load runs")
    ap.add_argument("--warmup", type=int, default=5, help="requests per client (16 clients) before measuring")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batch-clients", type=int, default=4)
    ap.add_argument("--batch-images", type=int, default=256, help="images per client in each batching run")
    ap.add_argument(
        "--no-keepalive",
        action="store_true",
        help="a new connection per request (default: one keep-alive connection per client)",
    )
    ap.add_argument("--soak", type=int, default=5000, help="requests in the soak run (0: none)")
    ap.add_argument(
        "--oversize-mib",
        type=int,
        default=200,
        help="one request of this many MiB (a single cell): how the server copes (0: none)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="serve-load-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    if args.keras_model:
        if not args.classes:
            ap.error("--keras-model needs --classes")
        uri, tracking, model = register_keras(args.keras_model, args.classes, args.gates, Path(args.workdir))
    else:
        uri, tracking, model = args.model_uri, os.environ.get("MLFLOW_TRACKING_URI"), {}
    images = demo_images(max(args.batch_sizes) * 2)
    result: dict[str, Any] = {
        "model_uri": uri,
        "model": model,
        "payload": "base64 JPEG, 128x128 grey, from data/demo/batch1",
        "cpu_count": os.cpu_count(),
        "load1_start": load1(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": f"mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p PORT -w W",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "servers": [],
    }
    for w in args.workers:
        result["servers"].append(
            one_server(uri, tracking, w, args, images, soak=bool(args.soak) and w == args.workers[-1])
        )
    result["load1_end"] = load1()
    soak = next((s["soak"] for s in result["servers"] if "soak" in s), None)
    if soak:
        print(
            f"soak: {soak['requests']} requests, {soak['errors']} errors, RSS start/mid/end "
            f"{soak['rss_mib_start']}/{soak['rss_mib_mid']}/{soak['rss_mib_end']} MiB"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return (
        1
        if any(r["errors"] for s in result["servers"] for r in s["load"] + s["batching"]) or (soak and soak["errors"])
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
