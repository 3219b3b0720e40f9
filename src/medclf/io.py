"""Atomic output helpers: a killed stage never leaves half-written outputs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> Path:
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
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
    except BaseException:
        if not journaled:  # after the journal the commit is decided: the next run's recover_dir completes it
            for staging in stagings:
                shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _OWN_STAGING.difference_update(stagings)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces `final` as a whole (see `atomic_dirs`)."""
    with atomic_dirs(final) as (staging,):
        yield staging
