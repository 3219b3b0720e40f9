"""Real SIGKILLs of `medclf ingest` (issue 12, rows 12-14): no orphans, no debris, data and reports agree."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from tests.conftest import KERMANY_REGEX, ROOT, write_params
from tests.test_ingest import _png, _texture

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="real process kills, Linux only")

MEDCLF = str(Path(sys.executable).with_name("medclf"))


def _folder(root: Path, per_class: int = 140) -> Path:
    """Enough small PNGs (>= 256) that ingest decodes them in its process pool."""
    for c, cls in enumerate(["NORMAL", "PNEUMONIA"]):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            name = f"person{i // 2:03d}_bacteria_{i}.png" if c else f"IM-{i // 2:04d}-{i}.png"
            (d / name).write_bytes(_png(_texture(c * 1000 + i, size=24, bright=bool(c))))
    return root


def _params(tmp: Path, root: Path, **ingest: object) -> Path:
    ing = {"source": {"kind": "folder", "uri": str(root), "patient_id_regex": KERMANY_REGEX}, "workers": 2}
    ing.update(ingest)
    return write_params(tmp, {"ingest": ing})


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def _ingest(params: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MEDCLF, "--params", str(params), "ingest"],
        capture_output=True,
        text=True,
        env=_env(),
        check=check,
        timeout=300,
    )


def _killed_at(params: Path, tmp: Path, patch: str) -> None:
    """Run ingest in a child that SIGKILLs itself where `patch` says (a deterministic point of a real kill)."""
    script = tmp / "killer.py"
    script.write_text(
        textwrap.dedent("""
        import os, signal, sys
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        + textwrap.dedent(patch)
        + textwrap.dedent(f"""
        from medclf.cli import main
        sys.exit(main(["--params", {str(params)!r}, "ingest"]))
        """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _debris(tmp: Path) -> list[str]:
    return sorted(
        p.name
        for d in (tmp / "data", tmp / "reports")
        if d.exists()
        for p in d.iterdir()
        if p.name.endswith((".staging", ".old")) or ".commit" in p.name
    )


def test_sigkill_of_ingest_takes_its_decode_workers_with_it(tmp_path):
    """Row 12: after a SIGKILL of ingest, its pool workers used to stay alive (orphaned) for minutes."""
    root = _folder(tmp_path / "raw")
    os.mkfifo(root / "NORMAL" / "IM-0000-0a.png")  # a worker blocks reading it: the pool is alive at the kill
    proc = subprocess.Popen(
        [MEDCLF, "--params", str(_params(tmp_path, root)), "ingest"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    children: list[psutil.Process] = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 120
        while len(children) < 2 and time.time() < deadline and proc.poll() is None:
            children = parent.children(recursive=True)
            time.sleep(0.05)
        assert len(children) >= 2, "the decode pool never started"
        time.sleep(1.0)  # workers initialised and busy (one blocked on the FIFO)
        children = parent.children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphaned decode workers: {[p.pid for p in alive]}"
    finally:
        for p in children:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_kill_while_writing_data_keeps_reports_of_the_good_run_and_next_start_cleans_debris(tmp_path):
    """Row 13: a kill mid-write left `.ingest.*.staging` dirs forever and `summary.json` missing."""
    root = _folder(tmp_path / "raw")
    params = _params(tmp_path, root)
    _ingest(params)
    good = json.loads((tmp_path / "reports/ingest/summary.json").read_text())
    data_before = {p.name: p.read_bytes() for p in (tmp_path / "data/ingest").iterdir()}
    # killed while the new dataset is being written (its staging dirs exist)
    _killed_at(
        params,
        tmp_path,
        """
        import numpy as np
        np.save = lambda *a, **k: die()
        """,
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/ingest").iterdir()} == data_before
    assert json.loads((tmp_path / "reports/ingest/summary.json").read_text()) == good
    assert (tmp_path / "reports/ingest/quarantine.csv").exists()
    # the next run starts by removing the dead run's staging dirs; a live run's are left alone
    (root / "NORMAL" / "IM-0999-1.png").write_bytes(_png(_texture(999, size=24)))
    _ingest(params)
    assert _debris(tmp_path) == []
    summary = json.loads((tmp_path / "reports/ingest/summary.json").read_text())
    assert summary["images"] == good["images"] + 1


def test_kill_between_the_data_and_the_reports_swap_is_rolled_forward(tmp_path):
    """Rows 13/14: data and reports are committed together; a kill between the two renames is completed."""
    from medclf.infra.io import recover_dir

    root = _folder(tmp_path / "raw")
    params = _params(tmp_path, root)
    _ingest(params)
    (root / "NORMAL" / "IM-0999-1.png").write_bytes(_png(_texture(999, size=24)))
    _killed_at(
        params,
        tmp_path,
        """
        import os
        _replace, _n = os.replace, [0]
        def replace(src, dst):
            _replace(src, dst)
            if str(src).endswith(".staging"):
                _n[0] += 1
                if _n[0] == 1:
                    die()
        os.replace = replace
        """,
    )
    recover_dir(tmp_path / "data/ingest")
    recover_dir(tmp_path / "reports/ingest")
    assert _debris(tmp_path) == []
    m = pd.read_parquet(tmp_path / "data/ingest/manifest.parquet")
    summary = json.loads((tmp_path / "reports/ingest/summary.json").read_text())
    assert summary["images"] == int((m.status == "ok").sum()) == 281


def test_failed_ingest_after_a_good_one_keeps_reports_consistent_with_data(tmp_path):
    """Row 14: a failed run used to replace the good run's quarantine.csv (and leave its summary beside it)."""
    root = _folder(tmp_path / "raw")
    params = _params(tmp_path, root)
    _ingest(params)
    reports = tmp_path / "reports/ingest"
    good = {p.name: p.read_bytes() for p in reports.iterdir()}
    for i in range(40):
        (root / "NORMAL" / f"IM-0{i:03d}-broken.png").write_bytes(b"not a png")
    failed = _ingest(params, check=False)
    assert failed.returncode != 0 and "failed_quarantine.csv" in failed.stderr
    assert {n: (reports / n).read_bytes() for n in good} == good  # the good run's reports, untouched
    run = json.loads((reports / "failed_run.json").read_text())
    assert run["status"] == "failed" and "max_quarantine_fraction" in run["error"]
    q = pd.read_csv(reports / "failed_quarantine.csv")
    assert q.uri.str.endswith("-broken.png").sum() == 40
    m = pd.read_parquet(tmp_path / "data/ingest/manifest.parquet")
    assert json.loads(good["summary.json"])["images"] == int((m.status == "ok").sum())
    # the next good run supersedes the failure record
    for p in (root / "NORMAL").glob("*-broken.png"):
        p.unlink()
    _ingest(params)
    assert not (reports / "failed_run.json").exists() and not (reports / "failed_quarantine.csv").exists()
    assert _debris(tmp_path) == []


def test_stale_staging_of_a_live_process_is_kept(tmp_path):
    """Cleanup removes only staging dirs whose owning process is gone (or an earlier life of this pid)."""
    from medclf.infra.io import clean_stale_staging

    final = tmp_path / "ingest"
    live = tmp_path / f".ingest.{os.getppid()}.abcd1234.staging"  # our parent: alive
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dead = tmp_path / f".ingest.{dead_pid}.abcd1234.staging"
    other = tmp_path / f".ingest_v2.{dead_pid}.abcd1234.staging"  # another target's
    for d in (live, dead, other):
        d.mkdir()
        (d / "x.npy").write_bytes(np.zeros(3).tobytes())
    clean_stale_staging(final)
    assert live.exists() and other.exists() and not dead.exists()
