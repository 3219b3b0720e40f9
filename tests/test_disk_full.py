"""Issue 22, row 6: a full disk ends in a clear error naming the path and the free space, never a SIGBUS.

Ingest wrote its image arrays through a memory map: on a full filesystem the kernel cannot back a page it
faults in, and the process died with SIGBUS (exit 135 from a shell, an empty log), leaving its staging on the
full disk. These tests use a real small full filesystem (a tmpfs of a few MiB, mounted for the test; root and
Linux only, skipped elsewhere: tests/test_faults.py covers disk full with RLIMIT_FSIZE everywhere).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_params
from tests.test_ingest import tree_digest
from tests.test_source_snapshot import DEMO_REGEX, demo_folder

MEDCLF = str(Path(sys.executable).with_name("medclf"))


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "4m"):
    """A real tmpfs of `size` mounted at `where` (skips the test where mounting is not allowed)."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"medclf-test-{uuid.uuid4().hex[:6]}", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(fs: Path, leave: int) -> Path:
    """Fill `fs` with one file until only about `leave` bytes are free."""
    filler = fs / "filler.bin"
    free = shutil.disk_usage(fs).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def test_disk_full_during_ingest_names_the_path_and_free_space_and_leaves_no_staging(tmp_path):
    raw = demo_folder(tmp_path / "raw", per_class=12)
    with small_filesystem(tmp_path / "fs") as fs:
        ingest = {
            "source": {"kind": "folder", "uri": str(raw), "patient_id_regex": DEMO_REGEX},
            "image_size": 64,
            "workers": 1,
        }
        params = write_params(fs, {"ingest": ingest})
        subprocess.run(
            [MEDCLF, "--params", str(params), "ingest"], check=True, capture_output=True, env=_env(), timeout=300
        )
        before = {d: tree_digest(fs / d) for d in ("data/ingest", "reports/ingest")}
        demo_folder(raw, per_class=150)  # a new release: 300 images, 1.2 MB of 64x64 arrays
        filler = fill(fs, leave=256 * 1024)
        free_before = shutil.disk_usage(fs).free
        out = subprocess.run(
            [MEDCLF, "--params", str(params), "ingest"],
            check=False,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert out.returncode > 0, (out.returncode, out.stderr[-3000:])  # an error exit, not a signal (SIGBUS: -7)
        err = out.stderr
        assert "No space left on device" in err, err[-3000:]
        assert str(fs / "data") in err and "train_images.npy" in err, err[-3000:]  # the file it could not write
        assert " free on " in err and "KiB" in err, err[-3000:]
        assert {d: tree_digest(fs / d) for d in ("data/ingest", "reports/ingest")} == before
        debris = [
            p.name
            for d in (fs / "data", fs / "reports")
            for p in d.iterdir()
            if p.name.endswith((".staging", ".old", ".tmp")) or ".commit" in p.name
        ]
        assert debris == []
        assert shutil.disk_usage(fs).free >= free_before - 64 * 1024  # the failed run's bytes were given back
        filler.unlink()  # space again: the same command completes
        subprocess.run(
            [MEDCLF, "--params", str(params), "ingest"], check=True, capture_output=True, env=_env(), timeout=300
        )
        import numpy as np

        n = sum(len(np.load(fs / f"data/ingest/{s}_labels.npy")) for s in ("train", "val", "test"))
        assert n == 300


def test_memory_mapped_and_plain_writes_on_a_full_disk_raise_disk_full_naming_the_path(tmp_path):
    """The helpers every stage writes through: a memory-mapped .npy is preallocated (ENOSPC up front, not
    SIGBUS at the first page the kernel cannot back) and an atomic file that cannot be written both raise
    `DiskFull` naming the file and the free space, and leave no partial file. Run in a child process: before
    the fix, the memmap killed its process with SIGBUS."""
    with small_filesystem(tmp_path / "fs", size="1m") as fs:
        fill(fs, leave=64 * 1024)
        script = f"""
import numpy as np, os, sys
from pathlib import Path
from medclf.infra.io import DiskFull, atomic_file, npy_memmap
fs = Path({str(fs)!r})
try:
    arr = npy_memmap(fs / "big.npy", (200, 64, 64, 1), np.uint8)  # 800 KiB
    arr[:] = 7
    arr.flush()
    print("NO ERROR (memmap)")
except DiskFull as err:
    print("MEMMAP:", err)
try:
    with atomic_file(fs / "plain.bin", "wb") as fh:
        fh.write(b"x" * 500_000)
    print("NO ERROR (plain)")
except DiskFull as err:
    print("PLAIN:", err)
print("LEFT:", sorted(p.name for p in fs.iterdir()))
"""
        out = subprocess.run(
            [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=_env(), timeout=120
        )
        assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
        lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
        for kind, name in (("MEMMAP", "big.npy"), ("PLAIN", "plain.bin")):
            assert kind in lines, out.stdout
            assert str(fs) in lines[kind] and name in lines[kind], lines[kind]
            assert "No space left on device" in lines[kind] and " free on " in lines[kind], lines[kind]
        assert lines["LEFT"] == "['filler.bin']", out.stdout  # no partial file
