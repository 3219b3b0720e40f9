"""The Prefect retrain flow, end to end, in a temporary git + DVC checkout of this project.

Real components only: the Prefect test API (`prefect_api`), moto's S3 server (`s3_server`), a
real MLflow server storing its artifacts on that S3, real `dvc repro` of every stage on tiny
synthetic data, real Keras training. The main project is the production-like configuration,
so one pipeline run covers both the flow and S3 end to end (the suite must stay short on 2
cores): raw PNGs in a bucket, the DVC remote on S3 (credentials only in `.dvc/config.local`),
MLflow artifacts on S3. The tests sharing it run in order: full run → S3 checks and a `dvc pull`
in a fresh clone → unchanged rerun → GPU dispatch without a worker → failing gate. S3 failure
modes (transient errors, traversal keys, server down) are in test_s3.py.

A second, smaller checkout of its own (`small_project`: synthetic phantoms, no S3) holds the tests
that each run alone: a SIGKILLed training resumed by the flow's retry, its backup discarded when
the params change, and `dvc repro` against the flow recording the same `dvc.lock`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Self

import pytest
import yaml

from medclf.config import deep_merge
from tests.conftest import ROOT, stop_process, write_params

pytestmark = pytest.mark.slow

RELATIVE_PATHS = {
    "paths": {
        "external_data": "data/external",
        "ingest_dir": "data/ingest",
        "augment_dir": "data/augment",
        "model_dir": "models",
        "reports_dir": "reports",
        "cache_dir": ".cache",
    }
}
TINY = {
    "augment": {"preview_n": 4},
    "train": {"head_epochs": 1, "finetune_epochs": 1, "batch_size": 16, "early_stopping_patience": 0},
    # the robustness report (22 more predictions of the test split) is tested at the stage (tests/test_external.py)
    "evaluate": {
        "bootstrap": 20,
        "gradcam_n": 1,
        "gates": {"min_f1": 0.0, "min_recall": 0.0},
        "robustness": {"enabled": False},
    },
}
BIN = Path(sys.executable).parent
GPU_ENV = "MEDCLF_GPU_DEPLOYMENT"
TINY_SEED = 1234  # train.seed in params.yaml


def run_cmd(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        list(args),
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})},
    )
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed in {cwd}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def make_checkout(dst: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A fresh git + DVC project holding this repository's pipeline: dvc.yaml, the stage code, tiny params.

    Copied (not cloned) so the other engineers' uncommitted stage code is what runs; `src/` must
    be present because dvc.yaml lists stage modules as deps. `medclf` itself is imported from the
    editable install.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params: dict[str, Any] = {}
    for part in (RELATIVE_PATHS, TINY, overrides or {}):
        params = deep_merge(params, part)
    raw = yaml.safe_load(write_params(dst, params).read_text())["paths"]["raw_data"]
    if not raw.startswith("s3://") and not (dst / raw).exists():
        # the synthetic source reads no files, but dvc.yaml's ingest still depends on paths.raw_data
        (dst / raw).mkdir(parents=True)
        (dst / raw / "SYNTHETIC_SOURCE.txt").write_text("ingest.source.kind is synthetic: no raw files.\n")
    # evaluate's DVC input, the external validation sets (none here): present, and in git as in this repository
    (dst / "data" / "external").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "data" / "external" / "README.md", dst / "data" / "external" / "README.md")
    run_cmd(dst, "git", "init", "-q", "-b", "main")
    run_cmd(dst, "git", "config", "user.email", "test@example.invalid")
    run_cmd(dst, "git", "config", "user.name", "medclf test")
    run_cmd(dst, "dvc", "init", "-q")
    run_cmd(dst, "git", "add", "-A")
    run_cmd(dst, "git", "commit", "-qm", "test checkout")
    return dst


def set_params(checkout: Path, overrides: dict[str, Any]) -> None:
    data = yaml.safe_load((checkout / "params.yaml").read_text())
    data = deep_merge(data, overrides)
    (checkout / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def run_flow(checkout: Path, **kw: Any):
    from flows.retrain import retrain

    return retrain(
        project_dir=str(checkout), retry_delay_seconds=kw.pop("retry_delay_seconds", 0.2), return_state=True, **kw
    )


def flow_artifacts(flow_run_id: Any) -> dict[str, Any]:
    """Every artifact of a flow run and of its task runs, by key (latest wins)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in arts if a.key}


def model_versions(uri: str, name: str) -> list[Any]:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).search_model_versions(f"name='{name}'")


def run_tags(flow_run_id: Any) -> list[str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return list(client.read_flow_run(flow_run_id).tags or [])


def task_runs(flow_run_id: Any) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


# --------------------------------------------------------------------------- shared checkout
DVC_KEY, DVC_SECRET = "AKIAMEDCLFDVCTEST", "medclf-dvc-secret-not-real"


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload_demo(client, bucket: str, prefix: str, tmp: Path) -> int:
    """The SYNTHETIC demo phantoms as PNG class folders under s3://bucket/prefix/<class>/."""
    from medclf.config import SyntheticSource
    from medclf.sources.demo import write_demo_folder

    folder = tmp / "demo"
    if not folder.exists():
        write_demo_folder(SyntheticSource(n_patients=40, images_per_patient=2, native_size=48), folder)
    n = 0
    for f in sorted(folder.rglob("*.png")):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}", Body=f.read_bytes())
        n += 1
    return n


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def add_s3_remote(checkout: Path, url: str, endpoint: str) -> None:
    """URL and endpoint in .dvc/config (committed); credentials only in the git-ignored config.local."""
    run_cmd(checkout, "dvc", "remote", "add", "-d", "s3store", url)
    run_cmd(checkout, "dvc", "remote", "modify", "s3store", "endpointurl", endpoint)
    run_cmd(checkout, "dvc", "remote", "modify", "--local", "s3store", "access_key_id", DVC_KEY)
    run_cmd(checkout, "dvc", "remote", "modify", "--local", "s3store", "secret_access_key", DVC_SECRET)


@pytest.fixture(scope="module")
def mlflow_s3(tmp_path_factory, s3_server):
    """An extra MLflow server whose artifact store is s3://<bucket>/mlflow on moto."""
    from tests.conftest import start_mlflow_server

    bucket = f"medclf-mlflow-{uuid.uuid4().hex[:8]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    with start_mlflow_server(
        tmp_path_factory.mktemp("mlflow-s3"), f"s3://{bucket}/mlflow", {"MLFLOW_S3_ENDPOINT_URL": s3_server}
    ) as uri:
        yield {"uri": uri, "bucket": bucket}


@pytest.fixture(scope="module")
def project(tmp_path_factory, s3_server, mlflow_s3, prefect_api):
    tmp = tmp_path_factory.mktemp("flow")
    client, bucket = s3_client(s3_server), f"medclf-data-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    images = upload_demo(client, bucket, "raw", tmp)
    model = f"flowtest-{uuid.uuid4().hex[:8]}"
    checkout = make_checkout(
        tmp / "checkout",
        {
            "ingest": {"source": {"kind": "folder", "uri": f"s3://{bucket}/raw", "s3_endpoint_url": s3_server}},
            "register": {"model_name": model},
        },
    )
    add_s3_remote(checkout, f"s3://{bucket}/dvcstore", s3_server)
    run_cmd(checkout, "git", "add", ".dvc/config")
    run_cmd(checkout, "git", "commit", "-qm", "S3 DVC remote")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_s3["uri"])
        mp.delenv(GPU_ENV, raising=False)
        yield {
            "checkout": checkout,
            "model": model,
            "dvc_env": {"AWS_ENDPOINT_URL_S3": s3_server},
            "mlflow": mlflow_s3["uri"],
            "mlflow_bucket": mlflow_s3["bucket"],
            "bucket": bucket,
            "client": client,
            "images": images,
            "tmp": tmp,
        }


def backed_up_epochs(phase_dir: Path, since: float = 0.0) -> int | None:
    """How many epochs Keras' BackupAndRestore has saved in `phase_dir` (its `training_metadata.json`
    holds the next epoch to run), or None when no backup written at or after `since` is there yet."""
    meta = phase_dir / "training_metadata.json"
    try:
        if meta.stat().st_mtime < since:
            return None
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or caught while Keras rewrites it


class TrainKiller:
    """SIGKILL the real `medclf train` process once, mid-training, right after BackupAndRestore saved
    its first epoch (a backup written at or after `since`, so a stale backup of an earlier run is no trigger).

    Only this test process's own descendants are looked at (the flow runs in-process and DVC runs the
    stage as a grandchild; a `medclf train` the test starts itself is a child), so nothing else is ever
    signalled. Once the killed process is gone, what it left for the retry is recorded: the number of
    backed-up epochs (`epochs`), the resume state (`state`) and the per-epoch history rows (`history`).
    """

    def __init__(self, backup: Path, since: float) -> None:
        self.backup, self.since = backup, since
        self.killed_pid: int | None = None
        self.epochs: int | None = None
        self.state: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _train_pid() -> int | None:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if any(c.endswith("medclf") for c in cmd) and "train" in cmd:
                return p.pid
        return None

    def _watch(self) -> None:
        import psutil

        while not self.stop.is_set():
            pid = self._train_pid()
            if pid and (backed_up_epochs(self.backup / "phase1", self.since) or 0) >= 1:
                os.kill(pid, signal.SIGKILL)
                self.killed_pid = pid
                deadline = time.time() + 30
                while time.time() < deadline:  # dead; not reaped here (its parent reads its exit status)
                    try:
                        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                            break
                    except psutil.NoSuchProcess:
                        break
                    time.sleep(0.05)
                self.epochs = backed_up_epochs(self.backup / "phase1")
                self.state = json.loads((self.backup / "state.json").read_text())
                rows = (self.backup / "history.jsonl").read_text().splitlines()
                self.history = [json.loads(r) for r in rows if r.strip()]
                return
            time.sleep(0.05)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(40)


# --------------------------------------------------------------------------- tests
def test_full_flow_registers_challenger(project):
    checkout, model = project["checkout"], project["model"]
    state = run_flow(checkout)
    assert state.is_completed(), state.message
    result = state.result()
    stages = {o["stage"]: o for o in result["stages"]}
    assert [o["stage"] for o in result["stages"]] == ["ingest", "validate", "augment", "train", "evaluate", "register"]
    assert all(o["status"] == "ran" for o in stages.values()), stages
    # a challenger exists in the real registry, and the flow reports the same version
    reg = json.loads((checkout / "reports/register.json").read_text())
    versions = model_versions(project["mlflow"], model)
    assert [int(v.version) for v in versions] == [int(reg["version"])]
    assert reg["alias"] == "challenger" and result["model"]["version"] == reg["version"]
    assert result["headline"].startswith(f"retrained (first ingest: {project['images']} images)")
    assert "challenger" in result["headline"]
    # dvc.lock is the record: every stage is in it and DVC agrees nothing is stale
    lock = yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages)
    # (plain `dvc` reads an S3 source's endpoint from the environment, as docs/ORCHESTRATION.md says)
    assert run_cmd(checkout, "dvc", "status", "--json", env=project["dvc_env"]).strip() in ("{}", "")
    # the raw bucket's hash is in dvc.lock and on the registered version: the model leads back to its images
    (raw,) = [d for d in lock["ingest"]["deps"] if d["path"] == f"s3://{project['bucket']}/raw"]
    assert versions[0].tags["raw_data_md5"] == raw["md5"] and raw["nfiles"] == project["images"]
    # pushed to the DVC remote (on S3) at the end
    assert result["push"]["remote"] == "s3store" and result["push"]["pushed"] > 0
    # artifacts: the run summary (dataset version, stages, gates, links) and the metrics table
    arts = flow_artifacts(state.state_details.flow_run_id)
    summary = arts["medclf-retrain-summary"].data
    assert lock["ingest"]["outs"][0]["md5"] in summary
    assert "## Gates (passed)" in summary and "min_f1" in summary
    assert f"/#/models/{model}/versions/{reg['version']}" in summary and "/runs/" in summary
    table = {r["metric"]: r for r in json.loads(arts["medclf-metrics"].data)}
    # one set of headline numbers: `dvc metrics show`, the Prefect metrics table and the MLflow version page
    shown = json.loads(run_cmd(checkout, "dvc", "metrics", "show", "--json", env=project["dvc_env"]))
    (head,) = [d["data"]["reports/evaluate.json"]["data"] for d in shown.values()]
    dvc_doc = json.loads((checkout / "reports/metrics.json").read_text())  # the detail behind it (CIs)
    assert head["threshold"] == dvc_doc["threshold"] and head["failed"] == 0
    page = versions[0].description
    for key in ("roc_auc", "recall", "specificity", "f1"):
        value, lo, hi = (f"{dvc_doc['test'][k]:.3f}" for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
        assert f"{head['auc' if key == 'roc_auc' else key]:.3f}" == value, (key, head)
        assert table[key]["test"] == value and table[key]["95 % CI"] == f"{lo}–{hi}", (key, table[key])
        assert f"**{value}** | {lo}–{hi} |" in page, (key, value, page)
        assert f"{value} ({lo}–{hi})" in summary, (key, value)
    assert table["threshold"]["test"] == f"{dvc_doc['threshold']:.3f}" and f"{dvc_doc['threshold']:.4f}" in page
    assert "medclf-validate" in arts  # validate's own markdown report
    assert {"medclf:retrained", f"medclf:model-v{reg['version']}"} <= set(run_tags(state.state_details.flow_run_id))
    assert state.message == result["headline"]
    project["version"] = reg["version"]


def test_s3_end_to_end_data_remote_and_mlflow_artifacts(project):
    """Raw data from the bucket, outputs on the S3 DVC remote, MLflow artifacts on S3, pull in a clone."""
    import pandas as pd

    if "version" not in project:
        pytest.skip("needs the full run")
    checkout, client = project["checkout"], project["client"]
    manifest = pd.read_parquet(checkout / "data/ingest/manifest.parquet")
    assert len(manifest) == project["images"]
    assert manifest.source_uri.str.startswith(f"s3://{project['bucket']}/raw/").all()
    assert s3_keys(client, project["bucket"], "dvcstore/")
    # every cached output of the run is on the remote (cache: false reports travel with git, not DVC)
    assert json.loads(run_cmd(checkout, "dvc", "status", "--cloud", "--json", env=project["dvc_env"]) or "{}") == {}
    # MLflow stored the training run's files and the registered model on S3, via its artifact proxy
    run_id = json.loads((checkout / "models/train_run.json").read_text())["run_id"]
    stored = s3_keys(client, project["mlflow_bucket"], "mlflow/")
    assert any(f"/{run_id}/" in k and k.endswith("/train/history.csv") for k in stored), stored[:20]
    assert any(k.endswith("/MLmodel") for k in stored), stored[:20]
    # credentials only in the git-ignored .dvc/config.local: never in params.yaml or any tracked file
    assert DVC_SECRET not in (checkout / ".dvc/config").read_text()
    assert DVC_SECRET not in (checkout / "params.yaml").read_text()
    assert DVC_SECRET in (checkout / ".dvc/config.local").read_text()
    assert run_cmd(checkout, "git", "check-ignore", ".dvc/config.local").strip()
    grep = subprocess.run(["git", "grep", "-I", DVC_SECRET], check=False, cwd=checkout, capture_output=True, text=True)
    assert grep.returncode == 1, grep.stdout
    # pull: a fresh clone with only its own credentials gets byte-identical data and model from S3
    run_cmd(checkout, "git", "add", "dvc.lock")
    run_cmd(checkout, "git", "commit", "-qm", "pipeline run")
    clone = project["tmp"] / "clone"
    run_cmd(project["tmp"], "git", "clone", "-q", str(checkout), str(clone))
    run_cmd(clone, "dvc", "remote", "modify", "--local", "s3store", "access_key_id", DVC_KEY)
    run_cmd(clone, "dvc", "remote", "modify", "--local", "s3store", "secret_access_key", DVC_SECRET)
    run_cmd(clone, "dvc", "pull", "-q")
    for out in ("data/ingest", "data/augment", "models"):
        assert digests(clone / out) == digests(checkout / out), out


def digests(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_unchanged_rerun_skips_every_stage(project):
    checkout = project["checkout"]
    t0 = time.perf_counter()
    state = run_flow(checkout)
    wall = time.perf_counter() - t0
    assert state.is_completed(), state.message
    result = state.result()
    assert {o["status"] for o in result["stages"]} == {"skipped"}
    assert all("unchanged" in o["reason"] for o in result["stages"])
    assert result["headline"] == "no change, nothing retrained" and result["retrained"] is False
    # the runs list in the Prefect UI tells this run apart: its state message and tags
    assert state.message == result["headline"]
    assert "medclf:no-change" in run_tags(state.state_details.flow_run_id)
    assert len(model_versions(project["mlflow"], project["model"])) == 1
    arts = flow_artifacts(state.state_details.flow_run_id)
    assert "no change, nothing retrained" in arts["medclf-retrain-summary"].data
    assert wall < 60, f"a no-change run took {wall:.1f} s"


def test_failing_gate_fails_flow_without_new_version(project):
    checkout = project["checkout"]
    set_params(checkout, {"evaluate": {"gates": {"min_f1": 1.0}}})
    state = run_flow(checkout)
    assert state.is_failed()
    msg = state.message or ""
    assert "stage 'evaluate' failed" in msg and "GateFailed" in msg and "min_f1" in msg, msg
    outcomes = task_runs(state.state_details.flow_run_id)
    assert "register" not in outcomes, "register must not run after a failed gate"
    assert len(model_versions(project["mlflow"], project["model"])) == 1
    gates = json.loads((checkout / "reports/gates.json").read_text())
    assert gates["passed"] is False and any("min_f1" in f for f in gates["failures"])
    arts = flow_artifacts(state.state_details.flow_run_id)
    assert "FAILED" in arts["medclf-retrain-summary"].data and "min_f1" in arts["medclf-retrain-summary"].data
    # the gate is deterministic: evaluate ran once, never retried
    assert outcomes["evaluate"].run_count == 1
    assert {"medclf:failed:evaluate", "medclf:gate-failed"} <= set(run_tags(state.state_details.flow_run_id))


# --------------------------------------------------------------------------- a small checkout of its own
RESUME_EPOCHS = 6  # weights: none trains from scratch in one phase of head_epochs + finetune_epochs
SMALL_TRAIN = {"head_epochs": 1, "finetune_epochs": RESUME_EPOCHS - 1}
UP_TO_AUGMENT = ("ingest", "validate", "augment")


@pytest.fixture(scope="module")
def small_project(tmp_path_factory, mlflow_server, prefect_api):
    """A checkout of tiny synthetic phantoms (no S3), run by the flow up to augment; and a pristine copy
    of it taken before that run (`template`), for a run of the same checkout by other means."""
    tmp = tmp_path_factory.mktemp("small")
    template = make_checkout(
        tmp / "template",
        {
            "paths": {"raw_data": "data/raw"},
            "train": SMALL_TRAIN,
            "register": {"model_name": f"small-{uuid.uuid4().hex[:8]}"},
        },
    )
    checkout = tmp / "checkout"
    shutil.copytree(template, checkout, symlinks=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.delenv(GPU_ENV, raising=False)
        state = run_flow(checkout, until="augment", push=False)
        assert state.is_completed(), state.message
        yield {
            "template": template,
            "checkout": checkout,
            "tmp": tmp,
            "flow_lock": yaml.safe_load((checkout / "dvc.lock").read_text())["stages"],
        }


def test_killed_training_resumes_and_a_params_change_discards_the_backup(small_project):
    """docs/ORCHESTRATION.md, "Training resumes instead of restarting" (and its backup of another configuration
    is discarded), with real SIGKILLs of `medclf train` mid-training:

    1. a training started by hand is killed after its first backed-up epoch; then `train.seed` changes;
    2. the flow's training must not resume that backup: it starts again at epoch 0 (attempt 1, a new
       MLflow run), and is itself killed after its first backed-up epoch(s);
    3. the flow's retry resumes it: it runs only the epochs not backed up, in the same MLflow run.
    """
    checkout = small_project["checkout"]
    backup = checkout / ".cache/train_backup"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # 1. killed by hand, mid-training, leaving a backup of the seed-1234 configuration
    with open(small_project["tmp"] / "train-by-hand.log", "w") as log, TrainKiller(backup, since=0.0) as first:
        proc = subprocess.Popen(
            [str(BIN / "medclf"), "train"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            rc = proc.wait(600)
        finally:
            stop_process(proc)
    assert rc == -signal.SIGKILL and first.killed_pid == proc.pid, (
        f"`medclf train` was not killed after a backed-up epoch (rc {rc}; no BackupAndRestore backup in {backup}?):\n"
        + (small_project["tmp"] / "train-by-hand.log").read_text()[-3000:]
    )
    assert first.epochs is not None and 1 <= first.epochs < RESUME_EPOCHS, first.epochs
    assert first.state["attempt"] == 1 and first.state["run_id"], first.state
    assert not (checkout / "models/model.keras").exists()
    set_params(checkout, {"train": {"seed": 99}})  # between the kill and the retry, the params change
    try:
        # 2. + 3. the flow: its attempt 1 is killed in turn once it has backed up an epoch of its own
        with TrainKiller(backup, since=time.time()) as second:
            state = run_flow(checkout, until="train", push=False)
    finally:
        set_params(checkout, {"train": {"seed": TINY_SEED}})
    assert state.is_completed(), state.message
    assert second.killed_pid is not None and second.epochs is not None, "the flow's training was never killed"
    assert second.epochs < RESUME_EPOCHS, f"the kill landed after the last epoch ({second.epochs}); nothing to resume"
    # 2. the other configuration's backup was discarded, not resumed: a new fingerprint, attempt 1, a new
    #    MLflow run, and its history starts at epoch 0 with none of the first run's rows
    assert second.state["fingerprint"] != first.state["fingerprint"], second.state
    assert second.state["attempt"] == 1, f"the backup of another configuration was resumed: {second.state}"
    assert second.state["run_id"] != first.state["run_id"], second.state
    assert [(r["epoch"], r["attempt"]) for r in second.history] == [(e, 1) for e in range(second.epochs)], (
        second.history
    )
    # 3. the retry resumed from the last backed-up epoch; no finished epoch was trained again
    (train,) = [o for o in state.result()["stages"] if o["stage"] == "train"]
    res = train["result"] or {}
    assert train["status"] == "ran" and train["attempt"] == 2, train
    assert res["attempt"] == 2 and res["resumed_from_epoch"] == second.epochs, res
    assert res["epochs_executed_this_attempt"] == list(range(second.epochs, RESUME_EPOCHS)), res
    assert res["epochs_run"] == RESUME_EPOCHS and res["run_id"] == second.state["run_id"], res
    epochs = [int(r.split(",")[0]) for r in (checkout / "reports/train/history.csv").read_text().split()[1:]]
    assert epochs == list(range(RESUME_EPOCHS))
    assert not backup.exists()  # cleared once the model is saved


def lock_fields(lock: dict[str, Any], stages: tuple[str, ...]) -> dict[tuple[str, str, str], Any]:
    """dvc.lock flattened: (stage, "cmd" | "params" | "deps" | "outs", name) -> value (md5 for files)."""
    flat: dict[tuple[str, str, str], Any] = {}
    for stage in stages:
        entry = lock[stage]
        flat[(stage, "cmd", "")] = entry["cmd"]
        for file, params in entry.get("params", {}).items():
            flat[(stage, "params", file)] = params
        for kind in ("deps", "outs"):
            for item in entry.get(kind, []):
                flat[(stage, kind, item["path"])] = item["md5"]
    return flat


# Outputs that record a run's duration or time of day ("seconds", "created", GX's run time): they differ
# between any two runs, by whichever way. None is an input of a later stage (validate's DVC metrics file,
# an input of augment, holds no timings), so no hash of a dependency may differ.
RUN_TIME_REPORTS = {"reports/ingest/summary.json", "reports/validation/site", ".cache/validation_baseline.json"}


def test_medclf_dvc_repro_and_the_flow_record_the_same_dvc_lock(small_project):
    """README: "The same stage code runs three ways ...". On the same checkout: `medclf ingest` by hand writes
    the same data but records nothing in dvc.lock; `dvc repro` then writes the dvc.lock the flow wrote
    (`small_project`): same stages, commands, params, code and data hashes. Only the run-time reports differ."""
    checkout = small_project["tmp"] / "by-hand"
    shutil.copytree(small_project["template"], checkout, symlinks=True)
    run_cmd(checkout, str(BIN / "medclf"), "ingest")
    from tasks.common import dvc_status

    assert not (checkout / "dvc.lock").exists()  # the stage alone records nothing for DVC,
    assert dvc_status("ingest", checkout)  # which still calls it stale
    by_hand = digests(checkout / "data/ingest")
    run_cmd(checkout, "dvc", "repro", "-q", "augment")
    assert digests(checkout / "data/ingest") == by_hand  # same code, same data, whichever way runs it
    repro = lock_fields(yaml.safe_load((checkout / "dvc.lock").read_text())["stages"], UP_TO_AUGMENT)
    flow = lock_fields(small_project["flow_lock"], UP_TO_AUGMENT)
    assert repro.keys() == flow.keys()
    differ = {k for k in repro if repro[k] != flow[k]}
    assert {k[2] for k in differ} <= RUN_TIME_REPORTS and not {k for k in differ if k[1] == "deps"}, sorted(differ)
    # the data every later stage trains on is recorded with identical hashes
    for out in ("data/ingest", "data/augment"):
        (key,) = [k for k in repro if k[1] == "outs" and k[2] == out]
        assert repro[key] == flow[key] and repro[key].endswith(".dir"), key


# --------------------------------------------------------------------------- deployments
def deploy_all() -> dict[str, Any]:
    """Create the two work pools and run the real `prefect deploy --all` on prefect.yaml."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    template = json.loads((ROOT / "deploy/k8s/gpu-job-template.json").read_text())
    with get_client(sync_client=True) as client:
        for pool in (
            WorkPoolCreate(name="medclf-cpu", type="process"),
            WorkPoolCreate(name="medclf-gpu", type="kubernetes", base_job_template=template),
        ):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(pool)
    run_cmd(
        ROOT,
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--all",
        env={"PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    with get_client(sync_client=True) as client:
        return {name: client.read_deployment_by_name(name) for name in ("medclf-retrain/weekly", "medclf-train/gpu")}


def test_prefect_yaml_deploys_with_schedule_and_pools(prefect_api):
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect.yaml").read_text()))
    assert {d.name for d in model.deployments} == {"weekly", "gpu"}
    deps = deploy_all()
    weekly, gpu = deps["medclf-retrain/weekly"], deps["medclf-train/gpu"]
    (sched,) = weekly.schedules
    assert sched.schedule.cron == "0 3 * * 1" and sched.schedule.timezone == "UTC" and sched.active
    assert weekly.work_pool_name == "medclf-cpu" and weekly.entrypoint == "flows/retrain.py:retrain"
    assert weekly.parameters["gpu_deployment"] == "medclf-train/gpu"
    assert weekly.global_concurrency_limit.limit == 1 == gpu.global_concurrency_limit.limit  # one run at a time
    assert gpu.work_pool_name == "medclf-gpu" and not gpu.schedules
    assert gpu.job_variables["gpu_count"] == 1
    # the GPU pool's template, rendered by Prefect's own templating, asks Kubernetes for a GPU
    from prefect.utilities.templating import apply_values

    template = json.loads((ROOT / "deploy/k8s/gpu-job-template.json").read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values |= {**gpu.job_variables, "command": "prefect flow-run execute", "env": {}, "name": "t", "labels": {}}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in job["spec"]["template"]["spec"]["tolerations"])


def test_gpu_dispatch_without_a_worker_fails_clearly(project, monkeypatch):
    """Training routed to the GPU deployment: inputs pushed, run created, cancelled when no worker comes."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deploy_all()
    checkout = project["checkout"]
    set_params(checkout, {"train": {"seed": 99}})  # make `train` stale, nothing upstream
    monkeypatch.setenv("MEDCLF_GPU_START_TIMEOUT_S", "3")
    try:
        state = run_flow(checkout, until="train", gpu_deployment="medclf-train/gpu")
    finally:
        set_params(checkout, {"train": {"seed": TINY_SEED}})
    assert state.is_failed()
    assert "NoGpuWorker" in state.message and "prefect worker start --pool medclf-gpu" in state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["train-on-gpu"].run_count == 1  # not retried: a missing worker is not transient
    with get_client(sync_client=True) as client:
        remote = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["gpu"])))
    assert remote and remote[-1].state.is_cancelled()
    assert remote[-1].parameters["params_yaml"].count("seed: 99") == 1


# --------------------------------------------------------------------------- pure pieces (fast)
def test_stage_failure_classification():
    """From the stage's real exception, through the structured error `medclf <stage>` writes
    (`medclf.cli.error_record`), to the StageFailed the flow raises (`StageFailed.from_run`)."""
    from tasks.common import StageFailed
    from tests.test_retry import _check, _gate, _s3_throttled, failed_stage

    died = "ERROR: failed to reproduce 'train': failed to run: medclf train, exited with -9"
    assert failed_stage("train", None, [died]).transient  # SIGKILL / OOM: resume is worth it
    gate = failed_stage("evaluate", _gate())
    assert not gate.transient
    assert gate.error_type == "GateFailed" and gate.exit_code == 3
    assert "stage 'evaluate' failed: medclf evaluate: GateFailed: release gates failed" in str(gate)
    assert not failed_stage("validate", _check()).transient
    s3 = failed_stage("ingest", _s3_throttled())
    assert s3.transient and s3.error_type == "SourceError" and s3.exit_code == 75
    # DVC refused before the stage command ran (no result file of this run): deterministic
    missing = "ERROR: failed to reproduce 'augment': dependency 'src/medclf/imaging/augmentation.py' does not exist"
    refused = StageFailed.from_run("augment", None, [missing])
    assert not refused.transient and refused.error_type == "DvcError" and missing in refused.error


def test_status_reasons_and_summary_wording():
    from flows.summary import NO_CHANGE, headline, metric_rows
    from tasks.common import describe_status

    entries = [
        {"changed deps": {"src/medclf/stages/train.py": "modified", "params.yaml": {"train": "modified"}}},
        {"changed outs": {"models": "deleted"}},
    ]
    assert describe_status(entries) == (
        "deps modified: src/medclf/stages/train.py; params modified: train; outs deleted: models"
    )
    skipped = [{"stage": s, "status": "skipped"} for s in ("ingest", "train")]
    assert headline(skipped, {"version": 3}) == NO_CHANGE == "no change, nothing retrained"
    rows = metric_rows({"threshold": 0.4, "test": {"f1": 0.8, "f1_ci_low": 0.7, "f1_ci_high": 0.9, "tp": 3}})
    assert {"metric": "test.f1", "value": 0.8, "ci_low": 0.7, "ci_high": 0.9} in rows
    assert not any(r["metric"].endswith("_ci_low") for r in rows)


def test_servers_script_starts_and_stops_mlflow_and_prefect(tmp_path):
    """`make servers` (deploy/servers.sh): both servers up in the background, found by `prefect-url`, stopped."""
    import urllib.request

    from tests.conftest import free_port

    mlflow_port, prefect_port = free_port(), free_port()
    env = {
        "MLFLOW_PORT": str(mlflow_port),
        "MLFLOW_STORE_DIR": str(tmp_path / "mlflow"),
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "PREFECT_PORT": str(prefect_port),
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    script = str(ROOT / "deploy/servers.sh")
    api = f"http://127.0.0.1:{prefect_port}/api"

    def healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        out = run_cmd(ROOT, "bash", script, "start", env=env)
        assert f"http://127.0.0.1:{prefect_port}" in out and f"http://127.0.0.1:{mlflow_port}" in out, out
        assert healthy(f"http://127.0.0.1:{mlflow_port}/health") and healthy(f"{api}/health")
        assert (tmp_path / "mlflow" / "mlflow.db").exists() and (tmp_path / "prefect" / "server.pid").exists()
        assert run_cmd(ROOT, "bash", script, "prefect-url", env=env).strip() == api
        assert "Prefect: up" in run_cmd(ROOT, "bash", script, "status", env=env)
        assert "already running" in run_cmd(ROOT, "bash", script, "start", env=env)
    finally:
        subprocess.run(
            ["bash", script, "stop"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, timeout=60, check=False
        )
    deadline = time.time() + 30
    while time.time() < deadline and (healthy(f"{api}/health") or healthy(f"http://127.0.0.1:{mlflow_port}/health")):
        time.sleep(0.5)
    assert not healthy(f"{api}/health") and not healthy(f"http://127.0.0.1:{mlflow_port}/health")
    assert run_cmd(ROOT, "bash", script, "prefect-url", env=env).strip() == ""


def test_flow_serve_with_cron_registers_schedule_and_runs(tmp_path, prefect_api):
    """`python -m flows.retrain --serve --cron ...` (flow.serve on one machine): scheduled deployment, runs work."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    checkout = make_checkout(tmp_path / "co")
    name = f"served-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(tmp_path / "serve.log", "w") as log:
        served = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.retrain",
                "--serve",
                "--cron",
                "15 2 * * *",
                "--name",
                name,
                "--project-dir",
                str(checkout),
                "--no-push",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deployment = None
        deadline = time.time() + 120
        with get_client(sync_client=True) as client:
            while deployment is None and time.time() < deadline and served.poll() is None:
                try:
                    deployment = client.read_deployment_by_name(f"medclf-retrain/{name}")
                except ObjectNotFound:  # until the served process has registered it
                    time.sleep(1)
        assert deployment is not None, (tmp_path / "serve.log").read_text()[-3000:]
        (sched,) = deployment.schedules
        assert sched.schedule.cron == "15 2 * * *" and sched.active
        assert deployment.parameters["project_dir"] == str(checkout) and deployment.parameters["push"] is False
        assert deployment.global_concurrency_limit.limit == 1  # one run at a time (plus the project lock)
        # a run of the served deployment (as the scheduler would create) is picked up and executed
        run = run_deployment(f"medclf-retrain/{name}", parameters={"until": "ingest"}, timeout=240)
        assert run.state.is_completed(), f"{run.state}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        assert (checkout / "data/ingest/manifest.parquet").exists()
        assert "ingest" in yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]
    finally:
        stop_process(served)


# --------------------------------------------------------------------------- new data on S3 (last: it changes the
# shared project's raw data, so every test above sees the original bucket)
def test_s3_source_change_reingests_and_same_bytes_do_not(project):
    """New data in the bucket is seen by ETag, without downloading; a re-upload of the same bytes is not new."""
    from tasks.common import dvc_status

    checkout, client, bucket = project["checkout"], project["client"], project["bucket"]
    state = run_flow(checkout, until="ingest", push=False)
    assert state.is_completed() and state.result()["stages"][0]["status"] == "skipped", state.result()
    key = min(k for k in s3_keys(client, bucket, "raw/") if k.endswith(".png"))
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body)  # same bytes, new object (new mtime, same ETag)
    assert dvc_status("ingest", checkout) == []
    label = key.split("/")[1]
    client.put_object(Bucket=bucket, Key=f"raw/{label}/arrived-later.png", Body=_new_phantom_png())
    state = run_flow(checkout, until="ingest", push=False)
    assert state.is_completed(), state.message
    result = state.result()
    (ingest,) = result["stages"]
    assert ingest["status"] == "ran" and f"s3://{bucket}/raw" in ingest["reason"], ingest
    assert result["dataset"]["changes"]["added"] == 1 and "+1 image" in result["headline"], result["headline"]
    assert "data/ingest" in json.dumps(dvc_status("train", checkout))


def _new_phantom_png() -> bytes:
    """A new patient's image (another phantom seed): not a near-duplicate of anything in the bucket."""
    import io

    import numpy as np
    from PIL import Image

    from medclf.config import SyntheticSource
    from medclf.sources.synthetic import scan_synthetic

    rec = scan_synthetic(SyntheticSource(n_patients=4, native_size=48, seed=99)).records[0]
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rec.fetch())[..., 0]).save(buf, format="PNG")
    return buf.getvalue()
