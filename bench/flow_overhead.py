"""Orchestration overhead of the Prefect flow: flow wall time minus the stages' own time, per stage.

    .venv/bin/python bench/flow_overhead.py [--out overhead.json] [--no-dvc-baseline]

Three fresh copies of this project (git + DVC, tiny synthetic data, the test suite's tiny
settings) run the same pipeline three ways:

1. `medclf <stage>` one after another: each stage's own wall time (process start included,
   since that is what a stage costs however it is launched);
2. `dvc repro` (optional): what DVC adds (hashing deps/outs, lock, run-cache);
3. the Prefect flow `retrain` (Prefect API already up, as in production): what DVC + Prefect add,
   then the same flow again with nothing changed (the "no change" run).

Per stage, overhead = the task's wall time in the flow − the stage's own wall time. Flow-level
overhead (flow run bookkeeping, artifacts, final `dvc push` to a local remote) = flow wall − Σ task
times. Machine load matters: run on an otherwise idle machine and report `os.getloadavg()`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medclf.config import deep_merge

BIN = Path(sys.executable).parent
STAGES = ("ingest", "validate", "augment", "train", "evaluate", "register")
TINY = {
    "paths": {
        "ingest_dir": "data/ingest",
        "augment_dir": "data/augment",
        "model_dir": "models",
        "reports_dir": "reports",
        "cache_dir": ".cache",
    },
    "ingest": {
        "image_size": 32,
        "source": {"synthetic": {"n_patients": 40, "images_per_patient": 2, "native_size": 48}},
    },
    "augment": {"preview_n": 4},
    "train": {
        "weights": "none",
        "width": 0.35,
        "head_epochs": 1,
        "finetune_epochs": 1,
        "batch_size": 16,
        "early_stopping_patience": 0,
    },
    "evaluate": {"bootstrap": 20, "gradcam_n": 1, "gates": {"min_f1": 0.0, "min_recall": 0.0}},
}


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MEDCLF_PATIENT_SALT": os.environ.get("MEDCLF_PATIENT_SALT", "bench-salt-not-secret"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def sh(cwd: Path, *args: str) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(list(args), cwd=cwd, env=_env(), capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed in {cwd}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def checkout(dst: Path, model: str) -> Path:
    """A copy of the pipeline (dvc.yaml, stage code, tiny params) as its own git + DVC project."""
    dst.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = deep_merge(params, TINY)
    params = deep_merge(params, {"register": {"model_name": model}})
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "bench@example.invalid"],
        ["git", "config", "user.name", "bench"],
        ["dvc", "init", "-q"],
        ["dvc", "remote", "add", "-d", "local", str(dst.parent / f"{dst.name}-remote")],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "bench"],
    ):
        sh(dst, *cmd)
    return dst


def mlflow_uri(tmp: Path) -> tuple[str, subprocess.Popen | None]:
    """MLFLOW_TRACKING_URI if set and up, else a throw-away server (SQLite) for the benchmark."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "mlflow.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp}/mlflow.db",
            "--artifacts-destination",
            str(tmp / "mlartifacts"),
        ],
        stdout=log,
        stderr=log,
    )
    uri = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                return uri, proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited; see {tmp / 'mlflow.log'}") from None
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start")


def run_flow(project: Path) -> tuple[float, dict[str, Any]]:
    from flows.retrain import retrain

    t0 = time.perf_counter()
    state = retrain(project_dir=str(project), retry_delay_seconds=1.0, return_state=True)
    wall = time.perf_counter() - t0
    if not state.is_completed():
        raise SystemExit(f"flow failed: {state.message}")
    return wall, state.result()


def measure(tmp: Path, dvc_baseline: bool) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    own: dict[str, float] = {}
    a = checkout(tmp / "standalone", f"bench-a-{tag}")
    for stage in STAGES:
        own[stage] = round(sh(a, "medclf", stage), 2)
    out: dict[str, Any] = {"stage_own_s": own, "stage_own_total_s": round(sum(own.values()), 2)}
    if dvc_baseline:
        c = checkout(tmp / "dvc", f"bench-c-{tag}")
        out["dvc_repro_s"] = round(sh(c, "dvc", "repro"), 2)
        out["dvc_repro_noop_s"] = round(sh(c, "dvc", "repro"), 2)
    b = checkout(tmp / "flow", f"bench-b-{tag}")
    wall, result = run_flow(b)
    tasks = {o["stage"]: o["seconds"] for o in result["stages"]}
    out["flow_wall_s"] = round(wall, 2)
    out["flow_task_s"] = tasks
    out["per_stage_overhead_s"] = {s: round(tasks[s] - own[s], 2) for s in STAGES}
    # the same split inside the one flow run (immune to load drifting between the runs)
    cmd = {o["stage"]: o.get("command_seconds") for o in result["stages"]}
    out["flow_command_s"] = cmd
    out["in_run_overhead_s"] = {s: round(tasks[s] - cmd[s], 2) for s in STAGES if cmd.get(s) is not None}
    out["flow_level_overhead_s"] = round(wall - sum(tasks.values()), 2)
    out["dvc_push_s"] = (result.get("push") or {}).get("seconds")
    out["orchestration_overhead_s"] = round(wall - out["stage_own_total_s"], 2)
    out["orchestration_overhead_pct"] = round(100 * out["orchestration_overhead_s"] / wall, 1)
    wall2, result2 = run_flow(b)
    out["no_change_flow_s"] = round(wall2, 2)
    out["no_change_headline"] = result2["headline"]
    out["no_change_task_s"] = {o["stage"]: o["seconds"] for o in result2["stages"]}
    return out


def table(r: dict[str, Any]) -> str:
    header = (
        "| stage | standalone `medclf <stage>` s | task in flow s | overhead vs standalone s | "
        "command inside the task s | overhead in the same run s |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    ino = r["in_run_overhead_s"]
    for s in STAGES:
        lines.append(
            f"| {s} | {r['stage_own_s'][s]:.1f} | {r['flow_task_s'][s]:.1f} | "
            f"{r['per_stage_overhead_s'][s]:+.1f} | {r['flow_command_s'].get(s) or 0:.1f} | "
            f"{ino.get(s, float('nan')):+.1f} |"
        )
    lines.append(
        f"| **total** | {r['stage_own_total_s']:.1f} | {sum(r['flow_task_s'].values()):.1f} | "
        f"{sum(r['per_stage_overhead_s'].values()):+.1f} | "
        f"{sum(v or 0 for v in r['flow_command_s'].values()):.1f} | {sum(ino.values()):+.1f} |"
    )
    overhead = (
        f"- flow wall: {r['flow_wall_s']:.1f} s; orchestration overhead {r['orchestration_overhead_s']:.1f} s "
        f"({r['orchestration_overhead_pct']:.0f} %), of which flow-level (run bookkeeping, artifacts, "
        f"dvc push {r['dvc_push_s']} s) {r['flow_level_overhead_s']:.1f} s"
    )
    lines += ["", overhead, f"- no-change rerun: {r['no_change_flow_s']:.1f} s ({r['no_change_headline']})"]
    if "dvc_repro_s" in r:
        lines.append(f"- plain `dvc repro`: {r['dvc_repro_s']:.1f} s; no-op `dvc repro`: {r['dvc_repro_noop_s']:.1f} s")
    lines.append(
        f"- machine: {os.cpu_count()} CPUs, load average at start {r['loadavg_start']}, at end {r['loadavg_end']}"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    p.add_argument(
        "--no-dvc-baseline",
        dest="dvc_baseline",
        action="store_false",
        help="skip the plain `dvc repro` run (saves one pipeline run)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medclf-flow-bench-"))
    load0 = [round(x, 2) for x in os.getloadavg()]
    uri, server = mlflow_uri(tmp)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("MEDCLF_PATIENT_SALT", "bench-salt-not-secret")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.pop("MEDCLF_GPU_DEPLOYMENT", None)
    try:
        if os.environ.get("PREFECT_API_URL"):
            result = measure(tmp, args.dvc_baseline)
        else:  # a Prefect API started before timing: production flows do not pay its start-up
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=300):
                result = measure(tmp, args.dvc_baseline)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_start"], result["loadavg_end"] = load0, [round(x, 2) for x in os.getloadavg()]
    result["cpus"] = os.cpu_count()
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
