"""Atomic output helpers: a killed stage never leaves half-written outputs; a full disk is named, not a crash.

A write that fails for want of space (ENOSPC, EDQUOT, or EFBIG past `RLIMIT_FSIZE`) or with an I/O error
(EIO), plain or through a memory map, raises `DiskFull` naming the file and the free space of its
filesystem, and the partial file or staging directory is removed at once. Memory-mapped arrays are
preallocated (`npy_memmap`), so a full disk fails up front instead of killing the process with SIGBUS at
the first page the kernel cannot back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large", "Input/output error")


class DiskFull(OSError):
    """A write failed for want of space (ENOSPC, EDQUOT, EFBIG) or with an I/O error (EIO).

    Its message names the file (or output) it could not write and the free space of that filesystem;
    `errno` is the original one, so it is still the OSError it was.
    """


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def free_space(path: str | Path) -> str:
    """ "12.0 KiB free on /mnt/data (of 4.0 MiB)" for the filesystem holding `path` (or its nearest parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"{_size(usage.free)} free on {mount} (of {_size(usage.total)})"


def is_disk_error(err: BaseException) -> bool:
    """An OSError of a full disk or a failing device (some libraries, pyarrow, give only the text)."""
    return (
        isinstance(err, OSError)
        and not isinstance(err, DiskFull)
        and (err.errno in DISK_ERRNOS or any(t in str(err) for t in _DISK_TEXTS))
    )


def disk_full(err: OSError, path: str | Path) -> DiskFull:
    """`err` as a DiskFull naming the file it could not write (its own filename if it has one, else `path`)."""
    where = err.filename or path
    reason = err.strerror or str(err)
    return DiskFull(err.errno or errno.ENOSPC, f"cannot write {where}: {reason}; {free_space(where)}")


@contextlib.contextmanager
def disk_writes(path: str | Path) -> Iterator[None]:
    """Writes to `path` inside: one that fails with a full disk or EIO raises `DiskFull` naming `path`."""
    try:
        yield
    except OSError as err:
        if is_disk_error(err):
            raise disk_full(err, path) from err
        raise


def _preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve the blocks of `[offset, offset+length)`: a full disk fails here (ENOSPC), not at a later write."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        os.pwrite(fd, b"\0", offset + length - 1)  # no fallocate here: at least size the file


def _npy_header(fh: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    import numpy as np

    np.lib.format.write_array_header_1_0(
        fh,
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(int(n) for n in shape)},
    )
    return int(fh.tell())


def npy_memmap(path: str | Path, shape: tuple[int, ...], dtype: Any) -> np.memmap[Any, Any]:
    """A new `.npy` file opened as a writable memory map, its blocks preallocated first.

    `np.lib.format.open_memmap(mode="w+")` makes a sparse file: on a full disk the first page the kernel
    cannot back kills the process with SIGBUS. Here a full disk raises `DiskFull` naming `path` up front,
    and no partial file is left. Call `flush()` inside `disk_writes(path)` (an EIO surfaces there).
    """
    import numpy as np

    path, dt = Path(path), np.dtype(dtype)
    try:
        with disk_writes(path):
            with open(path, "wb") as fh:
                offset = _npy_header(fh, shape, dt)
                fh.flush()
                _preallocate(fh.fileno(), offset, math.prod(shape) * dt.itemsize)
            return np.lib.format.open_memmap(path, mode="r+")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def write_npy(path: str | Path, shape: tuple[int, ...], dtype: Any, rows: Iterable[Any]) -> Path:
    """Write a `.npy` of `shape` from `rows` (each one `shape[1:]`), with plain writes: no memory map.

    The blocks are reserved first, so a full disk fails before the first row; any write that still fails
    raises `DiskFull` naming `path`, and the partial file is removed.
    """
    import numpy as np

    path, dt = Path(path), np.dtype(dtype)
    row_bytes = math.prod(shape[1:]) * dt.itemsize
    try:
        with disk_writes(path), open(path, "wb") as fh:
            offset = _npy_header(fh, shape, dt)
            fh.flush()
            _preallocate(fh.fileno(), offset, shape[0] * row_bytes)
            n = 0
            for row in rows:
                data = np.ascontiguousarray(row, dtype=dt)
                if data.nbytes != row_bytes:
                    raise ValueError(f"{path}: row {n} has shape {data.shape}, expected {shape[1:]}")
                fh.write(data.data.cast("B"))  # contiguous: no copy
                n += 1
            if n != shape[0]:
                raise ValueError(f"{path}: {n} rows written, expected {shape[0]}")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file beside `path`, then `os.replace` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        full = disk_full(err, path) if isinstance(err, OSError) and is_disk_error(err) else None  # space now
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from err
        raise


def json_safe(value: Any) -> Any:
    """`value` as strict JSON can hold it, recursively: NaN and infinities become null (strict readers, DVC's
    `metrics show` included, refuse `NaN`), numpy scalars and arrays become Python numbers and lists, tuples
    become lists. The one place this is done: every JSON report goes through `write_json`."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy scalar (np.float32, np.int64, np.bool_, 0-d array)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return json_safe(item())
    tolist = getattr(value, "tolist", None)  # numpy array
    if callable(tolist):
        return json_safe(tolist())
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as strict JSON (`json_safe`; `allow_nan=False` holds it to that), atomically."""
    with atomic_file(path) as fh:
        json.dump(json_safe(data), fh, indent=2, sort_keys=True, default=str, allow_nan=False)
        fh.write("\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def hash_update(h: Any, path: str | Path) -> Any:
    """Feed a file's bytes to a hashlib object in 1 MiB chunks; returns it."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h


def file_digest(*files: str | Path, algo: str = "sha256") -> str:
    """The one file hasher: hex digest of the files' bytes, concatenated in order (md5 for DVC's own hashes)."""
    import hashlib

    h = hashlib.new(algo, usedforsecurity=False) if algo == "md5" else hashlib.new(algo)
    for f in files:
        hash_update(h, f)
    return str(h.hexdigest())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_OWN_STAGING: set[Path] = set()  # staging dirs this process made (a previous life of our pid made the others)
_STARTED = time.time()


def _staging_name_re(final: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(final.name)}\.(?:(\d+)\.)?[A-Za-z0-9_]+\.staging$")


def clean_stale_staging(final: str | Path) -> list[Path]:
    """Remove `final`'s staging dirs left by runs that were killed (their owning process is gone).

    A staging dir is named `.<final>.<pid>.<random>.staging`. It is stale when that pid is no longer
    running, or is this process but the dir is not one this process made (a container restarts with
    the same pid). Unnamed (older) ones are stale when older than this process. A concurrent live run's
    staging dirs are left alone.
    """
    final = Path(final)
    pattern, removed = _staging_name_re(final), []
    with contextlib.suppress(FileNotFoundError):
        for p in final.parent.iterdir():
            m = pattern.match(p.name)
            if not m or not p.is_dir() or p in _OWN_STAGING:
                continue
            stale = False
            if m.group(1) is not None:
                pid = int(m.group(1))
                stale = pid == os.getpid() or not _pid_alive(pid)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale = p.stat().st_mtime < _STARTED
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _journal(final: Path) -> Path:
    return final.with_name(f".{final.name}.commit.json")


def _swap_in(staging: Path, final: Path) -> None:
    backup = final.with_name(final.name + ".old")
    if staging.exists():
        if final.exists():
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(final, backup)
        os.replace(staging, final)
    shutil.rmtree(backup, ignore_errors=True)


def _roll_forward(journal: Path) -> None:
    """Finish a commit whose journal was written: every staging dir it names was complete."""
    try:
        pairs = [(Path(s), Path(f)) for s, f in json.loads(journal.read_text())["pairs"]]
    except (OSError, ValueError, KeyError):  # a torn journal: written atomically, so this is not a commit
        journal.unlink(missing_ok=True)
        return
    for staging, final in pairs:
        _swap_in(staging, final)
    _fsync_dir(pairs[0][1].parent)
    for _, final in pairs:
        _journal(final).unlink(missing_ok=True)


def recover_dir(final: Path) -> None:
    """Finish an interrupted commit (roll it forward), else restore a lone backup; drop dead runs' staging."""
    final = Path(final)
    journal = _journal(final)
    if journal.exists():
        _roll_forward(journal)
    backup = final.with_name(final.name + ".old")
    if backup.exists() and not final.exists():
        os.replace(backup, final)
    elif backup.exists():
        shutil.rmtree(backup, ignore_errors=True)
    clean_stale_staging(final)


def _new_staging(final: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".staging", dir=final.parent))
    _OWN_STAGING.add(staging)
    os.chmod(staging, 0o755)
    return staging


@contextlib.contextmanager
def atomic_dirs(*finals: str | Path) -> Iterator[list[Path]]:
    """Yield one fresh staging directory per `final`; on success all replace their finals together.

    The commit writes a journal naming every (staging, final) pair beside each final, then renames
    each final to `<final>.old` and its staging dir into place, then removes the journals and backups.
    If the process dies before the journal exists, nothing changed (the staging dirs are removed by
    the next run); once it exists, `recover_dir` (called by the next run) completes the commit. So
    the finals are always all the old or all the new complete set: data and its reports never disagree.
    """
    paths = [Path(f) for f in finals]
    for final in paths:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(final)
    stagings: list[Path] = []
    journaled = False
    try:
        stagings = [_new_staging(final) for final in paths]
        yield stagings
        record = {"pairs": [[str(s.resolve()), str(f.resolve())] for s, f in zip(stagings, paths, strict=True)]}
        for final in paths:
            write_json(_journal(final), record)
        journaled = True
        for staging, final in zip(stagings, paths, strict=True):
            _swap_in(staging, final)
        for final in paths:
            _fsync_dir(final.parent)
        for final in paths:
            _journal(final).unlink(missing_ok=True)
    except BaseException as err:
        full = None
        if isinstance(err, OSError) and is_disk_error(err):  # named before the cleanup frees the space
            full = disk_full(err, err.filename or (", ".join(str(f) for f in paths) + " (staging)"))
        if not journaled:  # after the journal the commit is decided: the next run's recover_dir completes it
            for staging in stagings:  # debris of a full disk too: removed at once, not by the next run
                shutil.rmtree(staging, ignore_errors=True)
        if full is not None:
            raise full from err
        raise
    finally:
        _OWN_STAGING.difference_update(stagings)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces `final` as a whole (see `atomic_dirs`)."""
    with atomic_dirs(final) as (staging,):
        yield staging
