"""Cost of the scheduled flow's "did the raw data change?" check, and of ingest at scale, through DVC.

    .venv/bin/python bench/change_bench.py [--folder ../shared/data/chest_xray] [--skip-folder] [--skip-s3]
                                           [--generated 50000] [--out change.json] [--keep]

The ingest stage depends on `${paths.raw_data}` (dvc.yaml), so before every scheduled run the flow asks
DVC, in process, whether ingest is stale (`tasks.common.dvc_status`). Three sources, each in its own
temporary git + DVC checkout of this pipeline (dvc.yaml, src/, params.yaml from tests/conftest.py):

1. `--folder`: the real chest X-rays (read-only, outside the checkout). Ingest once with `dvc repro
   --single-item ingest`, then time `dvc_status("ingest")`: first call in a fresh Python process (DVC's
   hash state already filled by the repro), the same with DVC's state cleared ("cold": every file
   re-read and hashed), warm no-change checks in process, and the `dvc status ingest` CLI.
2. `--s3` (on unless `--skip-s3`): the same files in a moto S3 server; DVC lists ETags, it keeps no
   state for S3, so every check is one full listing. Timed: warm no-change check, and the check after
   one object is added (must be stale).
3. `--generated N`: N small noise PNGs written here (write time reported apart), then the full ingest
   through DVC, a no-change check (warm, then cold), a `touch`ed file (same bytes: must NOT be stale), one
   added file (must be stale) and the re-ingest, whose summary must report `added: 1`.

Where DVC keeps its hash state: not in `.dvc/tmp` (that holds the repo lock and `btime`) but in the
*site cache dir*, `<site_cache_dir>/repo/<token>/{hashes,links,index}`, `/var/tmp/dvc` by default.
This script points `DVC_SITE_CACHE_DIR` at its own temporary folder (so it never touches other
checkouts' state) and a cold check deletes the checkout's `<token>` folder (`Repo.site_cache_dir`).
The OS page cache is not dropped (that would hurt everyone else on the machine), so "cold" means
DVC re-reads and re-hashes every byte, from RAM rather than disk for data sets that fit in memory.

The machine is shared: every row carries the 1-minute load average when it was measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medclf.config import deep_merge
from tasks.common import dvc_status, source_env, venv_env
from tests.conftest import KERMANY_REGEX, free_port, write_params

BIN = Path(sys.executable).parent
RELATIVE_PATHS = {
    "ingest_dir": "data/ingest",
    "augment_dir": "data/augment",
    "model_dir": "models",
    "reports_dir": "reports",
    "cache_dir": ".cache",
}
GEN_CLASSES = ("NEGATIVE", "POSITIVE")
GEN_REGEX = r"^(p\d+)_"
GEN_PER_PATIENT = 4
# `dvc_status` in a fresh interpreter: what the first check of a newly started worker/flow process costs.
PROBE = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from dvc.repo import Repo
from tasks.common import dvc_status
t1 = time.perf_counter()
entries = dvc_status("ingest", Path(sys.argv[1]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "status_s": t2 - t1, "entries": entries}, default=str))
"""


@dataclass
class Row:
    part: str
    what: str
    seconds: float
    note: str
    load1: float


ROWS: list[Row] = []


def record(part: str, what: str, seconds: float, note: str = "") -> float:
    row = Row(part, what, round(seconds, 3), note, round(os.getloadavg()[0], 2))
    ROWS.append(row)
    print(f"  [{part}] {what}: {row.seconds:.3f} s  {note}  (load {row.load1})", flush=True)
    return seconds


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return venv_env({"TF_CPP_MIN_LOG_LEVEL": "2", **(extra or {})})


def sh(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 3600) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(
        list(args), cwd=cwd, env=_env(env), capture_output=True, text=True, check=False, timeout=timeout
    )
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed in {cwd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out.stdout


def checkout(dst: Path, ingest: dict[str, Any], raw_data: str) -> Path:
    """A fresh git + DVC project holding this repository's pipeline (as tests/test_flow.py::make_checkout)."""
    dst.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_params(dst, deep_merge({"paths": {**RELATIVE_PATHS, "raw_data": raw_data}}, {"ingest": ingest}))
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "bench@example.invalid"],
        ["git", "config", "user.name", "bench"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "bench checkout"],
    ):
        sh(dst, *cmd)
    return dst


def repro_ingest(root: Path) -> tuple[float, dict[str, Any]]:
    """`dvc repro --single-item ingest` as the flow runs it; returns its wall time and ingest's summary."""
    wall, _ = sh(root, "dvc", "repro", "--single-item", "ingest", env=source_env(root))
    return wall, json.loads((root / "reports/ingest/summary.json").read_text())


def raw_lock_entry(root: Path, raw_data: str) -> dict[str, Any]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]["deps"]
    (entry,) = [d for d in lock if d["path"] == raw_data]
    return dict(entry)


def timed_status(root: Path) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    entries = dvc_status("ingest", root)
    return time.perf_counter() - t0, entries


def median_status(root: Path, n: int, part: str) -> tuple[float, list[float], bool]:
    """Median of `n` in-process checks after a first one (reported on its own row: it pays DVC's lazy
    imports, as the first check of a newly started flow process would); also whether any said stale."""
    t, entries = timed_status(root)
    record(part, "dvc_status, in process, first call (DVC's lazy imports)", t, stale_word(entries))
    times, stale = [], bool(entries)
    for _ in range(n):
        t, entries = timed_status(root)
        times.append(t)
        stale = stale or bool(entries)
    return statistics.median(times), [round(t, 3) for t in times], stale


def probe_status(root: Path) -> dict[str, Any]:
    """`dvc_status` in a new interpreter: import time and the call itself, measured inside it."""
    t0 = time.perf_counter()
    _, out = sh(
        ROOT,
        sys.executable,
        "-c",
        PROBE,
        str(root),
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def clear_dvc_state(root: Path) -> Path:
    """Delete the checkout's DVC hash state (`<site_cache_dir>/repo/<token>`: hashes, links, index).

    `.dvc/tmp` is not where DVC 3 keeps file hashes: it holds the repo lock and `btime`, whose mtime
    is part of the token, so deleting `.dvc/tmp` would *also* orphan the state, just indirectly.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        site = Path(repo.site_cache_dir)
    shutil.rmtree(site)
    return site


def stale_word(entries: list[Any] | bool) -> str:
    return "STALE" if entries else "up to date"


def probe_note(p: dict[str, Any]) -> str:
    return (
        f"{stale_word(p['entries'])}; imports (tasks pkg: Prefect, medclf, DVC) {p['import_s']:.2f} s, "
        f"whole process {p['process_s']:.2f} s"
    )


def rounded(p: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in p.items()}


# --------------------------------------------------------------------------- 1. real folder
def bench_folder(tmp: Path, folder: Path, repeats: int) -> dict[str, Any]:
    part = "folder"
    files = sum(1 for f in folder.rglob("*") if f.is_file())
    size_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    print(f"[{part}] {folder}: {files} files, {size_mb:.1f} MB", flush=True)
    root = checkout(
        tmp / "folder-checkout",
        {"source": {"kind": "folder", "uri": str(folder), "patient_id_regex": KERMANY_REGEX}, "image_size": 64},
        str(folder),
    )
    wall, summary = repro_ingest(root)
    record(
        part,
        "dvc repro --single-item ingest (first run)",
        wall,
        f"stage {summary['seconds']} s, decode {summary['decode_images_per_second']} img/s",
    )
    lock = raw_lock_entry(root, str(folder))
    out: dict[str, Any] = {
        "files": files,
        "mb": round(size_mb, 1),
        "repro_s": round(wall, 2),
        "ingest_summary_s": summary["seconds"],
        "decode_images_per_second": summary["decode_images_per_second"],
        "lock_nfiles": lock.get("nfiles"),
        "lock_md5": lock.get("md5"),
    }
    p = probe_status(root)
    record(part, "dvc_status, fresh process, state warm from the repro", p["status_s"], probe_note(p))
    out["fresh_process_warm"] = rounded(p)
    med, times, stale = median_status(root, repeats, part)
    record(part, f"dvc_status, in process, no change (median of {repeats})", med, f"{stale_word(stale)}; {times}")
    out["warm_median_s"], out["warm_times_s"], out["warm_stale"] = round(med, 3), times, stale
    site = clear_dvc_state(root)
    p = probe_status(root)
    record(
        part,
        "dvc_status, fresh process, DVC state cleared (cold)",
        p["status_s"],
        f"{probe_note(p)}; cleared <site cache>/repo/{site.name[:8]}..",
    )
    out["fresh_process_cold"] = rounded(p)
    cold = []
    for _ in range(2):
        clear_dvc_state(root)
        t, entries = timed_status(root)
        cold.append(round(t, 3))
        assert not entries, entries
    record(
        part,
        "dvc_status, in process, DVC state cleared (cold, median of 2)",
        statistics.median(cold),
        f"up to date; {cold}",
    )
    out["cold_in_process_s"] = cold
    t, stdout = sh(root, "dvc", "status", "ingest")
    record(part, "`dvc status ingest` CLI process, warm", t, stdout.strip().splitlines()[-1][:60])
    out["cli_warm_s"] = round(t, 3)
    return out


# --------------------------------------------------------------------------- 2. S3 (moto)
def start_moto(tmp: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """moto's ThreadedMotoServer in its own process: its request handling does not share this
    process's GIL with the DVC calls being timed (the two still share the machine's cores)."""
    port = free_port()
    code = (
        "import time\nfrom moto.server import ThreadedMotoServer\n"
        f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False)\n"
        "s.start()\nwhile True:\n    time.sleep(3600)\n"
    )
    log = open(tmp / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return endpoint, proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"moto server exited; see {tmp / 'moto.log'}") from None
            time.sleep(0.25)
    raise SystemExit("moto server did not start")


def bench_s3(tmp: Path, folder: Path, repeats: int) -> dict[str, Any]:
    import boto3

    part = "s3"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    endpoint, server = start_moto(tmp)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        bucket = f"medclf-bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        files = sorted(f for f in folder.rglob("*") if f.is_file())

        def put(f: Path) -> None:
            client.put_object(Bucket=bucket, Key=f"chest_xray/{f.relative_to(folder).as_posix()}", Body=f.read_bytes())

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, files))
        record(part, f"upload {len(files)} objects to moto (setup, not a check)", time.perf_counter() - t0)
        uri = f"s3://{bucket}/chest_xray"
        root = checkout(
            tmp / "s3-checkout",
            {
                "source": {
                    "kind": "folder",
                    "uri": uri,
                    "patient_id_regex": KERMANY_REGEX,
                    "s3_endpoint_url": endpoint,
                },
                "image_size": 64,
            },
            uri,
        )
        wall, summary = repro_ingest(root)
        record(
            part,
            "dvc repro --single-item ingest (first run)",
            wall,
            f"stage {summary['seconds']} s, decode {summary['decode_images_per_second']} img/s",
        )
        lock = raw_lock_entry(root, uri)
        out: dict[str, Any] = {
            "objects": len(files),
            "repro_s": round(wall, 2),
            "ingest_summary_s": summary["seconds"],
            "decode_images_per_second": summary["decode_images_per_second"],
            "lock_nfiles": lock.get("nfiles"),
            "lock_md5": lock.get("md5"),
        }
        p = probe_status(root)
        record(part, "dvc_status, fresh process, no change", p["status_s"], probe_note(p))
        out["fresh_process_warm"] = rounded(p)
        med, times, stale = median_status(root, repeats, part)
        record(part, f"dvc_status, in process, no change (median of {repeats})", med, f"{stale_word(stale)}; {times}")
        out["warm_median_s"], out["warm_times_s"], out["warm_stale"] = round(med, 3), times, stale
        new_key = "chest_xray/train/NORMAL/IM-9999-0001.jpeg"  # a new patient's image
        client.put_object(Bucket=bucket, Key=new_key, Body=files[0].read_bytes())
        t, entries = timed_status(root)
        record(part, "dvc_status, in process, after adding 1 object", t, stale_word(entries))
        out["added_in_process_s"], out["added_stale_in_process"] = round(t, 3), bool(entries)
        out["added_entries"] = entries
        p = probe_status(root)
        record(part, "dvc_status, fresh process, after adding 1 object", p["status_s"], stale_word(p["entries"]))
        out["added_fresh_process_s"] = round(p["status_s"], 3)
        out["added_stale_fresh_process"] = bool(p["entries"])
        return out
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


# --------------------------------------------------------------------------- 3. generated PNGs
def _write_pngs(job: tuple[str, int, int]) -> int:
    """Images start..stop-1: 32x32 grayscale noise (unique bytes, so no duplicates), 4 per patient."""
    import numpy as np
    from PIL import Image

    root, start, stop = job
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        patient = i // GEN_PER_PATIENT
        cls = GEN_CLASSES[patient % 2]
        img = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
        img.save(Path(root, cls, f"p{patient}_{i}.png"), compress_level=1)
    return stop - start


def write_generated(dst: Path, n: int) -> float:
    for cls in GEN_CLASSES:
        (dst / cls).mkdir(parents=True)
    step = max(1, n // ((os.cpu_count() or 1) * 16))
    jobs = [(str(dst), s, min(n, s + step)) for s in range(0, n, step)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool() as pool:
        written = sum(pool.imap_unordered(_write_pngs, jobs))
    assert written == n, (written, n)
    return time.perf_counter() - t0


def bench_generated(tmp: Path, n: int, repeats: int) -> dict[str, Any]:
    part = f"generated {n}"
    data = tmp / "generated"
    t = write_generated(data, n)
    mb = sum(f.stat().st_size for f in data.rglob("*.png")) / 1e6
    record(part, f"write {n} PNGs, {mb:.0f} MB (setup, not a check)", t, f"{os.cpu_count()} processes")
    root = checkout(
        tmp / "gen-checkout",
        {"source": {"kind": "folder", "uri": str(data), "patient_id_regex": GEN_REGEX}, "image_size": 32},
        str(data),
    )
    out: dict[str, Any] = {"files": n, "mb": round(mb, 1), "write_s": round(t, 2)}
    wall, summary = repro_ingest(root)
    record(
        part,
        "dvc repro --single-item ingest (first run: DVC hashes + ingest)",
        wall,
        f"stage {summary['seconds']} s, decode {summary['decode_images_per_second']} img/s",
    )
    out.update(
        repro_s=round(wall, 2),
        ingest_summary_s=summary["seconds"],
        decode_images_per_second=summary["decode_images_per_second"],
        images=summary["images"],
    )
    lock = raw_lock_entry(root, str(data))
    out["lock_nfiles"], out["lock_md5"] = lock.get("nfiles"), lock.get("md5")
    p = probe_status(root)
    record(part, "dvc_status, fresh process, no change", p["status_s"], probe_note(p))
    out["fresh_process_warm_s"] = round(p["status_s"], 3)
    med, times, stale = median_status(root, repeats, part)
    record(part, f"dvc_status, in process, no change (median of {repeats})", med, f"{stale_word(stale)}; {times}")
    out["warm_median_s"], out["warm_times_s"], out["warm_stale"] = round(med, 3), times, stale
    clear_dvc_state(root)
    t, entries = timed_status(root)
    record(part, "dvc_status, in process, DVC state cleared (cold: re-hashes every file)", t, stale_word(entries))
    out["cold_in_process_s"], out["cold_stale"] = round(t, 3), bool(entries)

    victim = next((data / GEN_CLASSES[0]).glob("*.png"))
    before = victim.read_bytes()
    time.sleep(0.05)
    os.utime(victim)  # `touch`: new mtime, same bytes
    assert victim.read_bytes() == before
    t, entries = timed_status(root)
    record(part, "dvc_status after `touch` of 1 file (same bytes)", t, stale_word(entries) + " (expected: up to date)")
    out["touch_s"], out["touch_stale"], out["touch_entries"] = round(t, 3), bool(entries), entries

    extra = data / GEN_CLASSES[0] / f"p{n // GEN_PER_PATIENT + 10}_{n}.png"  # a new patient's image
    _write_pngs_one(extra, seed=n + 1)
    t, entries = timed_status(root)
    record(part, "dvc_status after adding 1 file", t, stale_word(entries) + " (expected: STALE)")
    out["added_s"], out["added_stale"], out["added_entries"] = round(t, 3), bool(entries), entries

    wall, summary = repro_ingest(root)
    ch = summary.get("changes") or {}
    brief = {k: ch.get(k) for k in ("added", "removed", "changed", "relabelled", "moved", "unchanged")}
    record(part, "dvc repro --single-item ingest after adding 1 file", wall, f"stage {summary['seconds']} s; {brief}")
    out.update(reingest_s=round(wall, 2), reingest_summary_s=summary["seconds"], reingest_changes=brief)
    t, entries = timed_status(root)
    record(part, "dvc_status right after the re-ingest", t, stale_word(entries))
    out["after_reingest_s"], out["after_reingest_stale"] = round(t, 3), bool(entries)
    return out


def _write_pngs_one(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(path)


# --------------------------------------------------------------------------- report
def table(rows: list[Row]) -> str:
    lines = ["| part | measurement | seconds | result / note | load (1 min) |", "|---|---|---|---|---|"]
    lines += [f"| {r.part} | {r.what} | {r.seconds:.3f} | {r.note} | {r.load1} |" for r in rows]
    return "\n".join(lines)


def section(name: str, fn: Callable[[], dict[str, Any]], result: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    result[name] = fn()
    result[name]["section_wall_s"] = round(time.perf_counter() - t0, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--folder",
        type=Path,
        default=ROOT.parent / "shared/data/chest_xray",
        help="real image folder (read-only; also the files uploaded to S3)",
    )
    p.add_argument("--skip-folder", action="store_true", help="skip part 1 (local folder)")
    p.add_argument("--skip-s3", action="store_true", help="skip part 2 (moto S3)")
    p.add_argument("--generated", type=int, default=50000, help="part 3: number of generated PNGs (0: skip)")
    p.add_argument("--repeats", type=int, default=5, help="no-change checks per median (folder, S3)")
    p.add_argument("--gen-repeats", type=int, default=3, help="no-change checks per median (generated)")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary checkouts and data")
    args = p.parse_args()
    folder = args.folder.resolve()
    if not (args.skip_folder and args.skip_s3) and not folder.is_dir():
        raise SystemExit(f"--folder {folder}: not a folder")
    tmp = Path(tempfile.mkdtemp(prefix="medclf-change-bench-"))
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp / "dvc-site-cache")  # DVC's hash state, ours alone
    os.environ.setdefault("MEDCLF_PATIENT_SALT", "bench-salt-not-secret")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    result: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    import dvc.repo  # noqa: F401 - imported once before timing, as in a running flow process

    record("setup", "import dvc.repo in this process (once)", time.perf_counter() - t0)
    try:
        if not args.skip_folder:
            section("folder", lambda: bench_folder(tmp, folder, args.repeats), result)
        if not args.skip_s3:
            section("s3", lambda: bench_s3(tmp, folder, args.repeats), result)
        if args.generated > 0:
            section("generated", lambda: bench_generated(tmp, args.generated, args.gen_repeats), result)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["rows"] = [asdict(r) for r in ROWS]
    print()
    print(table(ROWS))
    print(
        f"\n- machine: {os.cpu_count()} CPUs, load average at start {result['loadavg_start']}, "
        f"at end {result['loadavg_end']}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
