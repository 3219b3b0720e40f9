"""Screenshots of what a reviewer sees, taken by a real headless Chromium (Debian's `chromium` package).

Run after `make servers` and two retrains with a promotion between them (see docs/PROMOTION.md):

    .venv/bin/python docs/screenshots/capture.py --model medclf-demo

It asks the MLflow and Prefect servers for the latest version, its run and the latest flow runs, then
writes PNGs beside this file. Nothing is drawn by hand: each picture is the page a browser renders.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def shoot(url: str, out: Path, width: int = 1400, height: int = 1600, wait_ms: int = 25000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        raise SystemExit("no Chromium on PATH (Debian: apt-get install chromium)")
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"{out.name}: {url}")


async def _prefect_runs(limit: int) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=limit)
    return [(str(r.id), r.name) for r in runs]


async def _latest_artifacts(keys: tuple[str, ...]) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    out = {}
    async with get_client() as client:
        for key in keys:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
            out[key] = str(arts[0].id)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlflow", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    ap.add_argument("--prefect-ui", default=os.environ.get("PREFECT_UI_URL", "http://127.0.0.1:4200"))
    ap.add_argument("--model", default="medclf-demo")
    args = ap.parse_args()

    from mlflow import MlflowClient

    cl = MlflowClient(args.mlflow, args.mlflow)
    versions = sorted(cl.search_model_versions(f"name = '{args.model}'"), key=lambda v: int(v.version))
    latest = versions[-1]
    run = cl.get_run(latest.run_id)
    exp = run.info.experiment_id
    base = args.mlflow.rstrip("/")
    shoot(f"{base}/#/models/{args.model}/versions/{latest.version}", HERE / "mlflow_version_page.png", height=2600)
    # MLflow 3.17 remembers a "GenAI / Model training" switch per browser (default GenAI); the query selects runs
    shoot(f"{base}/#/experiments/{exp}?workflowType=machine_learning", HERE / "mlflow_experiment_runs.png", height=1000)
    shoot(
        f"{base}/#/experiments/{exp}/runs/{latest.run_id}/artifacts/evaluate/champion_comparison.png",
        HERE / "mlflow_champion_comparison.png",
        width=1900,
        height=1000,
    )
    ui = args.prefect_ui.rstrip("/")
    # the Prefect client asks the API of the UI it shoots (not a profile's default server)
    os.environ.setdefault("PREFECT_API_URL", f"{ui}/api")
    runs = asyncio.run(_prefect_runs(5))
    shoot(f"{ui}/runs", HERE / "prefect_runs_list.png", height=1100)
    if runs:
        shoot(f"{ui}/runs/flow-run/{runs[0][0]}", HERE / "prefect_run_page.png", height=1600)
    # the latest run's summary and metrics table (Prefect keeps every version of a keyed artifact)
    ids = asyncio.run(_latest_artifacts(("medclf-retrain-summary", "medclf-metrics")))
    shoot(f"{ui}/artifacts/artifact/{ids['medclf-retrain-summary']}", HERE / "prefect_run_summary.png", height=2400)
    shoot(f"{ui}/artifacts/artifact/{ids['medclf-metrics']}", HERE / "prefect_metrics_table.png", height=1400)


if __name__ == "__main__":
    main()
