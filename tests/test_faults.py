"""Issue 12: the fault matrix, end to end, and the inverted-image input (row 8).

Every case uses real components: a real `mlflow server`, moto's S3 server, a real `prefect server start`, real
`dvc repro`/`dvc push`, the `medclf` CLI in a subprocess that the kernel kills (SIGKILL) or refuses a write
(RLIMIT_FSIZE). Tiny images and the small from-scratch net keep it cheap; the pipeline faults share one
checkout (`pipeline`). Not covered (docs/RELIABILITY.md): a Prefect API down for longer than its client retries.
"""

from __future__ import annotations

import glob
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medclf.imaging.images import fit_square
from medclf.stages import validate
from tests.conftest import ROOT, stop_process

# --------------------------------------------------------------------------- row 8: an inverted chest X-ray


def test_inverted_chest_xray_is_flagged_and_real_ones_are_not(tmp_path):
    """Issue 12, row 8: an inverted CXR (border mean 194 < the 200 bound) passed. The centre−border contrast
    flags it; the ~100 real demo X-rays it sits among raise no `inverted` warning (false-flag rate 0/100)."""
    from tests.test_validate import settings_for, write_ingest

    files = sorted(glob.glob(str(ROOT / "data/demo/batch1/*/*.jpeg")))[::7][:100]
    assert len(files) == 100
    specs = []
    for k, f in enumerate(files):
        img = np.asarray(Image.open(f).convert("L"))
        label = "opacity" if "/PNEUMONIA/" in f else "normal"
        specs.append(
            {
                "name": Path(f).name,
                "label": label,
                "patient": f"p-{k:016x}",
                "split": ("train", "train", "train", "val", "test")[k % 5],
                "img": fit_square(img[..., None], 32, "pad"),
            }
        )
    # the original of the inverted one stays in the set, as a normal image that must not be flagged
    source = np.asarray(Image.open(files[0]).convert("L"))
    inverted = fit_square((255 - source)[..., None], 32, "pad")
    specs.append(
        {
            "name": "inverted.jpeg",
            "label": specs[0]["label"],
            "patient": "p-inverted",
            "split": "train",
            "img": inverted,
        }
    )
    settings = settings_for(tmp_path)
    write_ingest(settings.paths.ingest_dir, specs)
    try:
        result = validate.run(settings)
    except validate.ValidationFailed as err:  # a prevalence check may fail on this ad-hoc split: not the point
        result = err.result
    check = result["checks"]["inverted"]
    assert check["status"] == "warn", check
    assert check["count"] == 1, check  # the inversion only: 0 of the 100 real X-rays
    assert "inverted.jpeg" in "\n".join(check["examples"])
    # the old rule alone missed it: its border is darker than validate.inverted_border_mean_min
    from medclf.validation.tables import chunk_stats

    stats = chunk_stats(np.stack([s["img"] for s in specs]))
    assert stats[-1, 4] < settings.validate_.inverted_border_mean_min
    assert (stats[:-1, 5] >= settings.validate_.inverted_center_contrast_min).all()


# --------------------------------------------------------------------------- S3: an object changes under ingest


def test_s3_object_changed_between_listing_and_reading_fails_the_run_and_a_rerun_reads_it_consistently(
    s3_server, make_settings, monkeypatch, tmp_path
):
    """The listing's ETag is sent with every read (If-Match): a changed object fails the ingest run (no mix of
    versions, nothing written) with an error naming the object; the next run lists again and reads the new one."""
    import json
    import uuid

    import boto3
    import pandas as pd

    from medclf.sources import store as store_mod
    from medclf.sources.base import SourceChanged
    from medclf.stages import ingest
    from tests.conftest import KERMANY_REGEX
    from tests.test_ingest import _png, _texture

    client, bucket = boto3.client("s3", endpoint_url=s3_server), f"faults-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        for i in range(12):
            name = f"person{i:03d}_bacteria_{i}.png" if c else f"IM-{i:04d}-{i}.png"
            client.put_object(Bucket=bucket, Key=f"raw/{cls}/{name}", Body=_png(_texture(c * 100 + i, 24, bool(c))))
    victim, new_bytes = "raw/NORMAL/IM-0003-3.png", _png(_texture(999, 24))
    settings = make_settings(
        {
            "ingest": {
                "source": {
                    "kind": "folder",
                    "uri": f"s3://{bucket}/raw",
                    "s3_endpoint_url": s3_server,
                    "patient_id_regex": KERMANY_REGEX,
                },
                "workers": 0,
            }
        }
    )
    listed = store_mod.S3Store.list

    def list_then_change(self):  # a real overwrite on the real (moto) server, right after the listing
        keys = listed(self)
        if self.prefix.endswith("NORMAL") and not changed:
            client.put_object(Bucket=bucket, Key=victim, Body=new_bytes)
            changed.append(victim)
        return keys

    changed: list[str] = []
    monkeypatch.setattr(store_mod.S3Store, "list", list_then_change)
    try:
        ingest.run(settings)
        raise AssertionError("ingest read an object that changed after it was listed")
    except SourceChanged as err:
        assert f"s3://{bucket}/{victim}" in str(err) and "changed between listing and reading" in str(err)
    assert changed and not (settings.paths.ingest_dir / "manifest.parquet").exists()
    for parent in (settings.paths.ingest_dir.parent, settings.paths.reports_dir):
        assert not parent.exists() or not [p for p in parent.iterdir() if p.name.endswith(".staging")]
    monkeypatch.setattr(store_mod.S3Store, "list", listed)
    ingest.run(settings)  # the retry: a fresh listing, read consistently
    manifest = pd.read_parquet(settings.paths.ingest_dir / "manifest.parquet")
    import hashlib

    shas = set(manifest["sha256"])
    assert hashlib.sha256(new_bytes).hexdigest() in shas  # the new version, never the listed one
    assert hashlib.sha256(_png(_texture(3, 24))).hexdigest() not in shas
    assert json.loads((settings.paths.reports_dir / "ingest" / "summary.json").read_text())


# --------------------------------------------------------------------------- MLflow down at train, evaluate, register


def test_mlflow_down_at_train_evaluate_and_register_is_retried_then_named_and_the_next_run_completes(
    make_settings, mlflow_server, monkeypatch, caplog
):
    """A dead tracking URI (nothing listens on the port): train and register retry with exponential backoff,
    then fail naming the server, before writing anything (no run, no model file, no version); evaluate works
    offline and says which server it could not reach. With the server back, the same stages complete."""
    import time
    import uuid

    import pytest

    from medclf.infra.tracking import TrackingUnavailable
    from medclf.stages import augment, evaluate, ingest, register, train
    from medclf.stages.register import RegisterRefused
    from tests.conftest import free_port
    from tests.test_flow import TINY, model_versions

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MEDCLF_MLFLOW_ATTEMPTS", "3")
    monkeypatch.setenv("MEDCLF_MLFLOW_RETRY_DELAY", "0.2")
    name = f"faults-{uuid.uuid4().hex[:8]}"
    s = make_settings(
        {
            **TINY,
            "register": {"model_name": name, "experiment": "medclf-fault-tests"},
            "ingest": {"source": {"synthetic": {"n_patients": 24, "images_per_patient": 2, "native_size": 32}}},
        }
    )
    ingest.run(s)
    augment.run(s)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"MLflow tracking server at {dead} is unreachable after 3 attempts"):
        train.run(s)
    assert time.monotonic() - t0 >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s
    assert sum("retrying in" in r.getMessage() for r in caplog.records) >= 2
    assert not (s.paths.model_dir / "model.keras").exists() and not (s.paths.model_dir / "train_run.json").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the server is back: the next run completes
    train.run(s)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    offline = evaluate.run(s)  # the champion lookup cannot happen: said, and register re-checks it
    assert f"MLflow server at {dead} unreachable" in json.dumps(offline, default=str)
    with pytest.raises((TrackingUnavailable, RegisterRefused), match=dead):
        register.run(s)
    assert not (s.paths.reports_dir / "register.json").exists()
    assert model_versions(mlflow_server, name) == []  # nothing (half-)registered

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    evaluate.run(s)
    out = register.run(s)
    assert out["created"] and [int(v.version) for v in model_versions(mlflow_server, name)] == [out["version"]]


# --------------------------------------------------------------------------- disk full


def test_disk_full_during_ingest_keeps_the_previous_dataset_names_the_error_and_leaves_no_staging(tmp_path):
    """RLIMIT_FSIZE (the kernel's per-file size limit: writes past it fail with EFBIG, as a full disk fails
    with ENOSPC) on a real `medclf ingest` after a good one: the error names it, the previous dataset and
    reports are byte-identical, and no staging directory is left."""
    import os
    import resource
    import subprocess
    import sys

    from tests.conftest import write_params
    from tests.test_kill import _ingest

    params = write_params(tmp_path, {"ingest": {"source": {"synthetic": {"seed": 1}}}})
    _ingest(params)
    before = {
        p: p.read_bytes() for d in ("data/ingest", "reports/ingest") for p in (tmp_path / d).rglob("*") if p.is_file()
    }
    params = write_params(tmp_path, {"ingest": {"source": {"synthetic": {"seed": 2}}}})  # a new release

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    medclf = str(Path(sys.executable).with_name("medclf"))
    out = subprocess.run(
        [medclf, "--params", str(params), "ingest"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=small_files,
    )
    assert out.returncode != 0
    assert "File too large" in out.stderr or "EFBIG" in out.stderr or "No space" in out.stderr, out.stderr[-2000:]
    after = {
        p: p.read_bytes() for d in ("data/ingest", "reports/ingest") for p in (tmp_path / d).rglob("*") if p.is_file()
    }
    assert after == before
    debris = [p for d in ("data", "reports") for p in (tmp_path / d).iterdir() if p.name.endswith(".staging")]
    assert debris == []


# --------------------------------------------------------------------------- one pipeline checkout, many faults

# Loaded into every `medclf` process the tests below start (via PYTHONPATH; Python imports `sitecustomize` at
# start-up). It only picks the moment of a real fault; the fault itself is the kernel's:
# * MEDCLF_FAULT_KILL=<stage>: the stage process SIGKILLs itself at a fixed point of that stage, its worst
#   moment (an external kill polled against the stage's files missed short windows on a loaded machine);
# * MEDCLF_FAULT_FSIZE=<output dir name>:<bytes>: RLIMIT_FSIZE is set when the stage starts writing that
#   output (a limit from the start would fail training's own, larger, backup files first).
_FAULT_HOOK = """
import os, signal, sys

_KILL = os.environ.get("MEDCLF_FAULT_KILL")
_FSIZE = os.environ.get("MEDCLF_FAULT_FSIZE")


def _die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)


def _validate(m):  # while Great Expectations runs: the Data Docs staging dir exists, nothing is committed
    m.run_suites = _die


def _augment(m):  # the commit is journaled, nothing swapped in yet
    m._swap_in = _die


def _evaluate(m):  # reports/evaluate committed and plots written; metrics.json and gates.json not yet
    write_json = m.write_json

    def dying(path, data):
        if os.path.basename(str(path)) == "metrics.json":
            _die()
        return write_json(path, data)
    m.write_json = dying


def _register(m):  # the version exists, READY and tagged; the alias is not set yet
    m.MlflowClient.set_registered_model_alias = _die


def _limit(m):
    import resource

    name, size = _FSIZE.split(":")
    new_staging = m._new_staging

    def limited(final):
        if final.name == name:
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(size), int(size)))
        return new_staging(final)
    m._new_staging = limited


def _after_import(target, patch):
    import importlib.abc

    class PostImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target_=None):
            if name != target:
                return None
            for finder in sys.meta_path:
                spec = None if finder is self else finder.find_spec(name, path, target_)
                if spec is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def patched(module):
                exec_module(module)
                patch(module)
            spec.loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, PostImport())


_PATCHES = {"validate": ("medclf.validation.gx_suite", _validate), "augment": ("medclf.infra.io", _augment),
            "evaluate": ("medclf.infra.io", _evaluate), "register": ("mlflow.tracking.client", _register)}

if os.path.basename(sys.argv[0]) == "medclf":
    if _KILL == "train":  # MEDCLF_TEST_KILL_AFTER_EPOCH exits right after an epoch's backup: make it a SIGKILL
        os._exit = _die
    elif _KILL in _PATCHES:
        _after_import(*_PATCHES[_KILL])
    if _FSIZE:
        _after_import("medclf.infra.io", _limit)
"""

STAGES = ("ingest", "validate", "augment", "train", "evaluate", "register")


class Pipeline:
    """A git + DVC checkout of this pipeline (tiny synthetic data) shared by the tests below, with `medclf`
    processes carrying `_FAULT_HOOK`."""

    def __init__(self, root: Path, mlflow_uri: str) -> None:
        import os
        import uuid

        from tests.test_flow import BIN, make_checkout

        self.name, self.mlflow = f"faults-{uuid.uuid4().hex[:8]}", mlflow_uri
        self.co = make_checkout(
            root / "co",
            {
                "paths": {"raw_data": "data/raw"},
                "register": {"model_name": self.name, "experiment": "medclf-fault-tests"},
                "ingest": {"source": {"synthetic": {"n_patients": 24, "images_per_patient": 2, "native_size": 32}}},
            },
        )
        hook = root / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_FAULT_HOOK)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
        }

    def run(self, *cmd: str, env: dict[str, str] | None = None, preexec_fn=None):
        """Run `cmd` in the checkout in its own process group; (returncode, output, pgid)."""
        import subprocess

        proc = subprocess.Popen(
            list(cmd),
            cwd=self.co,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )  # noqa: PLW1509 - setrlimit only, before exec
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            stop_process(proc)
        return proc.returncode, out, proc.pid

    def repro(self, stage: str | None = None) -> str:
        rc, out, _ = self.run("dvc", "repro", *(["--single-item", stage] if stage else []))
        assert rc == 0, out[-3000:]
        return out

    def status(self, stage: str) -> list:
        from tasks.common import dvc_status

        return dvc_status(stage, self.co)

    def versions(self) -> list:
        from tests.test_flow import model_versions

        return model_versions(self.mlflow, self.name)

    def aliases(self) -> dict[str, str]:
        """alias -> version (search results do not carry aliases in MLflow 3.17; the registered model does)."""
        from mlflow import MlflowClient

        return {
            k: str(v) for k, v in MlflowClient(tracking_uri=self.mlflow).get_registered_model(self.name).aliases.items()
        }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mlflow_server) -> Pipeline:
    return Pipeline(tmp_path_factory.mktemp("faults-pipeline"), mlflow_server)


def _group_gone(pgid: int, timeout: float = 10) -> bool:
    import os
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _debris(root: Path) -> list[str]:
    """Leftovers of an interrupted commit anywhere in the checkout (DVC's and git's own folders aside)."""
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts[0] in (".git", ".dvc"):
            continue
        if (
            p.name.endswith((".staging", ".old"))
            or ".commit" in p.name
            or (p.name.endswith(".tmp") and p.name.startswith("."))
        ):
            found.append(str(rel))
    return sorted(found)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- SIGKILL at every stage


@pytest.mark.skipif(sys.platform != "linux", reason="real process kills, Linux only")
def test_sigkill_of_each_stage_under_dvc_leaves_no_orphan_or_debris_and_the_rerun_agrees_with_dvc_lock(pipeline):
    """SIGKILL of the real `medclf <stage>` that `dvc repro --single-item <stage>` runs (as the flow does), for
    validate, augment, train, evaluate and register, each at its worst moment (see `_FAULT_HOOK`); ingest:
    tests/test_kill.py. After each kill: DVC fails naming the signal, nothing of its process group is left,
    dvc.lock records nothing for the stage and the stages before it are still up to date (their outputs
    intact). After a plain rerun: the stage is up to date in `dvc status`, no staging debris anywhere, train
    resumed from its backup, and register adopted the version the kill left (one version, with its alias)."""
    import yaml

    co = pipeline.co
    pipeline.repro("ingest")
    for k, stage in enumerate(STAGES[1:], start=1):
        rc, out, pgid = pipeline.run(
            "dvc",
            "repro",
            "--single-item",
            stage,
            env={"MEDCLF_FAULT_KILL": stage, "MEDCLF_TEST_KILL_AFTER_EPOCH": "0"},
        )
        # -9 when DVC's shell execs the command (bash), 137 when it forks it (dash, the /bin/sh DVC uses
        # when SHELL is unset, as in CI)
        assert rc != 0 and re.search(f"failed to run: medclf {stage}, exited with (-9|137)", out), out[-3000:]
        assert _group_gone(pgid), f"processes of the killed `dvc repro {stage}` are still running"
        locked = (yaml.safe_load((co / "dvc.lock").read_text()) or {}).get("stages") or {}
        assert stage not in locked, f"dvc.lock records the killed {stage}"
        for before in STAGES[:k]:  # the earlier stages' outputs still match dvc.lock
            assert pipeline.status(before) == [], (stage, before, pipeline.status(before))
        if stage == "register":  # killed after the version, before the alias
            versions = pipeline.versions()
            assert len(versions) == 1 and versions[0].status == "READY", versions
            assert versions[0].tags.get("model_sha256") and pipeline.aliases() == {}, versions[0]
        pipeline.repro(stage)
        assert pipeline.status(stage) == [], (stage, pipeline.status(stage))
        assert _debris(co) == [], (stage, _debris(co))
        if stage == "train":  # the retry resumed after the epoch the kill interrupted
            run = json.loads((co / "models" / "train_run.json").read_text())
            assert run["attempt"] == 2 and run["resumed_from_epoch"] is not None, run
            assert run["epochs_executed_this_attempt"] == [run["resumed_from_epoch"]], run
    versions = pipeline.versions()
    assert len(versions) == 1 and pipeline.aliases() == {"challenger": versions[0].version}, versions
    assert json.loads((co / "reports" / "register.json").read_text())["version"] == int(versions[0].version)
    assert all(pipeline.status(s) == [] for s in STAGES)


# --------------------------------------------------------------------------- disk full: the model save, a DVC push


def test_disk_full_during_the_model_save_keeps_the_previous_model_and_names_the_error(pipeline):
    """RLIMIT_FSIZE (1 MB) from the moment `medclf train` starts writing models/ (the model file is 2.2 MB):
    the run fails naming "File too large", models/ is byte-identical to the previous (DVC-tracked) model, no
    partial model.keras or staging directory is left, and dvc.lock still agrees with models/."""
    co = pipeline.co
    pipeline.repro()
    before = _tree(co / "models")
    rc, out, _ = pipeline.run("medclf", "train", env={"MEDCLF_FAULT_FSIZE": "models:1000000"})
    assert rc != 0 and "medclf train:" in out, out[-3000:]
    assert "File too large" in out or "errno = 27" in out, out[-3000:]
    assert _tree(co / "models") == before
    assert _debris(co) == [] and sorted(p.name for p in co.rglob("model.keras")) == ["model.keras"]
    assert pipeline.status("train") == []


def test_disk_full_during_dvc_push_fails_clearly_and_leaves_no_object_a_later_push_trusts(pipeline, tmp_path):
    """`dvc push` to a local-folder remote under RLIMIT_FSIZE (1 MB; the model object is 2.2 MB) fails naming
    "File too large". DVC uploads to a hidden temporary name and renames: every object under a hash name
    hashes to it, and the listing of models/ is not pushed while its file is missing. With the limit lifted,
    the next push uploads what is missing and `dvc status -c` finds the remote complete. (DVC leaves the
    failed upload's `.<random>.tmp` in the remote; no DVC command reads it.)"""
    import hashlib
    import resource

    import yaml

    def objects(remote: Path) -> dict[str, Path]:
        """hash -> file, for the files DVC would read (hash names); hidden temporary uploads left out."""
        return {
            p.parent.name + p.name.removesuffix(".dir"): p
            for p in remote.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        }

    pipeline.repro()
    remote = tmp_path / "remote"
    rc, out, _ = pipeline.run("dvc", "remote", "add", "-f", "-d", "faults", str(remote))
    assert rc == 0, out
    models = next(
        o
        for o in yaml.safe_load((pipeline.co / "dvc.lock").read_text())["stages"]["train"]["outs"]
        if o["path"] == "models"
    )["md5"]

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    rc, out, _ = pipeline.run("dvc", "push", preexec_fn=small_files)
    assert rc != 0 and "failed to push data to the cloud" in out and "File too large" in out, out[-3000:]
    partial = objects(remote)
    for md5, p in partial.items():  # a partial upload never sits under a hash name
        assert hashlib.md5(p.read_bytes()).hexdigest() == md5, p
    assert models.removesuffix(".dir") not in partial  # models/ is not listed while its model file is missing
    rc, out, _ = pipeline.run("dvc", "status", "-c")
    assert rc == 0 and "models" in out, out  # the remote is known to be incomplete
    rc, out, _ = pipeline.run("dvc", "push")
    assert rc == 0, out[-3000:]
    rc, out, _ = pipeline.run("dvc", "status", "-c")
    assert rc == 0 and "in sync" in out, out
    complete = objects(remote)
    assert models.removesuffix(".dir") in complete and len(complete) > len(partial)
    for md5, p in complete.items():
        assert hashlib.md5(p.read_bytes()).hexdigest() == md5, p


# --------------------------------------------------------------------------- a corrupted DVC cache entry


def test_corrupted_dvc_cache_entry_is_detected_on_restore_and_never_served_as_data(pipeline):
    """A cache object of data/augment flipped in place with its mtime kept (bit rot): DVC's state database
    trusts it, and `dvc repro` restores it from the run-cache as 'cached'. The flow's stage runner hashes
    restored outputs against dvc.lock: the corrupted file is named, its cache entry removed, the stage
    recomputed; the data on disk then matches dvc.lock byte for byte."""
    import logging
    import os
    import shutil

    import yaml

    from tasks.common import corrupted_outputs, run_stage_via_dvc

    co = pipeline.co
    pipeline.repro()
    good = _tree(co / "data" / "augment")
    out = next(o for o in yaml.safe_load((co / "dvc.lock").read_text())["stages"]["augment"]["outs"])
    cache = co / ".dvc" / "cache" / "files" / "md5"
    files = json.loads((cache / out["md5"][:2] / out["md5"][2:]).read_text())
    victim = next(f for f in files if f["relpath"] == "train_images.npy")
    obj = cache / victim["md5"][:2] / victim["md5"][2:]
    st = obj.stat()
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0xFF
    obj.write_bytes(bytes(data))
    obj.chmod(0o444)
    os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.rmtree(co / "data" / "augment")  # a fresh workspace: the outputs come from the cache

    outcome = run_stage_via_dvc("augment", co, logger=logging.getLogger("test"))
    assert outcome.status == "ran" and "corrupted" in outcome.reason, outcome
    assert "data/augment/train_images.npy" in outcome.reason
    assert corrupted_outputs("augment", co) == []
    assert pipeline.status("augment") == []
    assert _tree(co / "data" / "augment") == good  # the stage is deterministic: the same bytes again


# --------------------------------------------------------------------------- the Prefect API restarted mid-flow

_FLOW = """
import json
import re
import sys
from flows.retrain import retrain

state = retrain(project_dir=sys.argv[1], push=False, retry_delay_seconds=0.2, return_state=True)
result = state.result(raise_on_failure=False) if state.is_completed() else {"stages": []}
stages = {o["stage"]: o["status"] for o in result["stages"]}
print("FLOW_RUN", state.state_details.flow_run_id, state.type.value, json.dumps(stages), flush=True)
sys.exit(0 if state.is_completed() else 1)
"""


def test_prefect_api_restarted_while_a_stage_runs_the_flow_run_still_completes(pipeline, tmp_path):
    """A real `prefect server start` (own PREFECT_HOME, SQLite, free port) is stopped while the flow's evaluate
    stage runs in another process, and started again on the same port and database only after evaluate ended,
    so the flow's next API call (its progress update) meets the outage. The Prefect client retries it
    (exponential backoff, 2 + 4 + 8 + ... s; its debug log says so): the flow run completes (evaluate and
    register ran, the rest skipped), the restarted server has it COMPLETED, every stage agrees with dvc.lock,
    and nothing of the flow's process group is left running. (`--no-services`: no task-run recorder, so the
    stages' outcomes are read from the flow's result, not from the server.)"""
    import contextlib
    import os
    import subprocess
    import time

    import psutil

    from tests.conftest import _wait_http, free_port
    from tests.test_flow import set_params

    pipeline.repro()
    set_params(pipeline.co, {"evaluate": {"seed": 11}})  # evaluate (then register) must run again
    port, home = free_port(), tmp_path / "prefect"
    api, log, flow_log = f"http://127.0.0.1:{port}/api", tmp_path / "server.log", tmp_path / "flow.log"
    server_env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
    }
    prefect = str(Path(sys.executable).with_name("prefect"))

    def start() -> subprocess.Popen:
        with open(log, "a") as fh:
            proc = subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--no-services"],
                env=server_env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_http(api + "/health", proc, 300, log)
        return proc

    server, flow = start(), None
    try:
        with open(flow_log, "w") as fh:
            flow = subprocess.Popen(
                [sys.executable, "-c", _FLOW, str(pipeline.co)],
                cwd=tmp_path,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={
                    **pipeline.env,
                    "PREFECT_API_URL": api,
                    "PREFECT_HOME": str(tmp_path / "client"),
                    "PREFECT_LOGGING_LEVEL": "DEBUG",
                },
            )
        deadline, stage = time.time() + 300, None
        while stage is None and time.time() < deadline and flow.poll() is None:
            for child in psutil.Process(flow.pid).children(recursive=True):
                try:
                    if child.cmdline()[-1:] == ["evaluate"] and "medclf" in " ".join(child.cmdline()):
                        stage = child
                except psutil.Error:
                    pass
            time.sleep(0.2)
        assert stage is not None, "the flow never started evaluate"
        stop_process(server)  # the API goes away while evaluate runs ...
        assert flow.poll() is None, "the flow ended before the API was stopped"
        with contextlib.suppress(psutil.NoSuchProcess):
            stage.wait(300)
        time.sleep(1.0)  # the flow is past evaluate: its progress update is being retried
        server = start()  # ... and comes back on the same port and database
        flow.wait(600)
        out = flow_log.read_text()
        assert flow.returncode == 0, out[-4000:]
        assert "Another attempt will be made" in out, out[-4000:]  # a call met the outage and was retried
        assert _group_gone(flow.pid), "processes of the flow run are still running"
        _, run_id, _, stages = next(line for line in out.splitlines() if line.startswith("FLOW_RUN")).split(" ", 3)
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            assert client.read_flow_run(run_id).state_type.value == "COMPLETED"  # recorded by the new server
        assert json.loads(stages) == {
            "ingest": "skipped",
            "validate": "skipped",
            "augment": "skipped",
            "train": "skipped",
            "evaluate": "ran",
            "register": "ran",
        }, stages
        assert all(pipeline.status(s) == [] for s in STAGES)
    finally:
        if flow is not None:
            stop_process(flow)
        stop_process(server)
