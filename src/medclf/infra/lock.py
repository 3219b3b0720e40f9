"""The project lock: one run at a time on a checkout (issue 14, docs/ORCHESTRATION.md "Concurrent runs").

Two `fcntl.flock`ed files under `paths.cache_dir`, each holding a small JSON record of its holder
(pid, host, what, since):

- `catalog.PROJECT_LOCK`: who owns the project: a retrain flow for its whole run, or a `medclf <stage>`
  started by hand or by a plain `dvc repro`. Its record also holds a token that the holder passes to its
  own stage processes in the environment (`MEDCLF_PROJECT_LOCK`): a `medclf <stage>` whose token is the
  current holder's does not take the project lock (the flow would otherwise deadlock on its children).
- `catalog.STAGE_LOCK`: the stage process now running. Every `medclf <stage>` holds it, the flow's
  children included, so a stage that outlives its flow (the flow process was SIGKILLed, the stage was
  not) still keeps the next run out; a flow checks it is free when it starts.

The kernel drops a flock when the last descriptor of it closes, so a holder killed by SIGKILL, the OOM
killer or a power cut leaves no stale lock (the file and its old record stay; the record of a lock
nobody holds means nothing). Forked workers (ingest's decode pool) share the descriptor: the lock goes
when they have exited too. The files are never deleted or replaced: a lock on a deleted inode would
let two holders in. A busy lock is waited for up to `MEDCLF_LOCK_TIMEOUT` seconds (the caller's default
otherwise), then `LockBusy`, naming the holder and the lock file. `LockBusy` is transient (exit 75,
EX_TEMPFAIL): the project is busy, not broken, and the same command succeeds once the holder ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medclf.infra import catalog

if TYPE_CHECKING:
    from medclf.config import Paths

LOCK_ENV = "MEDCLF_PROJECT_LOCK"
"""The token of the project-lock holder, set by the holder in its stage processes' environment."""
TIMEOUT_ENV = "MEDCLF_LOCK_TIMEOUT"
"""Seconds to wait for a busy lock (wins over the caller's default; 0 = fail at once)."""
STAGE_TIMEOUT = 0.0
"""`medclf <stage>` by hand or under a plain `dvc repro`: fail fast, the person sees who holds it."""
FLOW_TIMEOUT = 300.0
"""The retrain flow: wait a few minutes (a manual stage or a short run ends), then fail."""
NESTED_GRACE = 10.0
"""A holder's child waits at least this long for the stage lock (forked workers of the previous stage
may still be exiting)."""
_POLL = 0.1
RECORD_GRACE = 2.0
"""A holder writes its record just after it takes the flock: a loser that finds the record still empty
re-reads it for up to this long, so its error names the holder."""
_HELD: dict[Path, str] = {}  # project-lock files this process holds -> their tokens


class LockError(RuntimeError):
    """The lock cannot be used at all (a bad MEDCLF_LOCK_TIMEOUT, an unwritable cache_dir)."""

    transient = False


class LockBusy(LockError):
    """Another run holds the project (or its stage lock) and did not release it in time."""

    transient = True

    def __init__(self, what: str, path: Path, holder: dict[str, Any], waited: float) -> None:
        self.path, self.holder, self.waited = Path(os.path.abspath(path)), holder, waited
        super().__init__(
            f"{what} cannot start: the project is locked by {describe(holder)}; lock file {self.path}. "
            f"Waited "
            f"{waited:.0f} s; set {TIMEOUT_ENV}=<seconds> to wait longer, or wait for it to finish."
        )


def describe(holder: dict[str, Any]) -> str:
    """A lock record in words: `flow run 1f… (medclf-retrain) (pid 4242 on host, since 2026-…)`."""
    if not holder:
        return "another process (no record yet)"
    return (
        f"{holder.get('what', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('since', '?')})"
    )


def timeout(default: float) -> float:
    """MEDCLF_LOCK_TIMEOUT if set, else `default`."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise LockError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds >= 0")
    return value


def read_record(path: Path) -> dict[str, Any]:
    """The JSON record in a lock file ({} when empty, absent or being written)."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder(path: Path) -> dict[str, Any]:
    """The holder's record, waiting up to RECORD_GRACE s for one that is still being written."""
    end = time.monotonic() + RECORD_GRACE
    record = read_record(path)
    while not record and time.monotonic() < end:
        time.sleep(0.02)
        record = read_record(path)
    return record


def held_env() -> dict[str, str]:
    """{MEDCLF_PROJECT_LOCK: token} while this process holds a project lock (for its stage processes)."""
    return {LOCK_ENV: next(iter(_HELD.values()))} if _HELD else {}


@dataclass
class _Flock:
    path: Path
    fd: int

    @classmethod
    def open(cls, path: Path) -> _Flock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return cls(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        except OSError as err:
            raise LockError(f"cannot open the lock file {path}: {err}") from err

    def take(
        self,
        deadline: float,
        what: str,
        log: logging.Logger | logging.LoggerAdapter[Any] | None,
        since: float | None = None,
    ) -> None:
        """Wait until `deadline` (time.monotonic) for the lock, else close and raise LockBusy saying how long the
        caller waited, counted from `since` (when it started waiting; default now)."""
        t0, told = (time.monotonic() if since is None else since), False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= deadline:
                holder = _holder(self.path)
                self.close()
                raise LockBusy(what, self.path, holder, now - t0) from None
            if not told and log is not None:
                told = True
                log.warning(
                    "%s: waiting up to %.0f s for the project lock %s, held by %s",
                    what,
                    deadline - now,
                    self.path,
                    describe(read_record(self.path)),
                )
            time.sleep(min(_POLL, max(0.0, deadline - now)))

    def write(self, record: dict[str, Any]) -> None:
        """Replace the record in place (never by rename: the flock is on this inode)."""
        data = json.dumps(record).encode() if record else b""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def close(self, *, clear: bool = False) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if clear:
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def _record(what: str, **extra: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "what": what,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


@contextlib.contextmanager
def project_lock(
    paths: Paths,
    what: str,
    *,
    wait: float,
    root: Path | None = None,
    hold_stage: bool = True,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> Iterator[str | None]:
    """Hold the project for `what` ("medclf train", "flow run <id>"); yields the token to pass to children,
    or None when a holder above us (its token in MEDCLF_PROJECT_LOCK) already holds the project.

    `hold_stage`: also hold the stage lock for the whole block (a stage process); a flow only checks it is
    free (no stage of a killed run still runs) and leaves it to its stage processes. `wait`: seconds."""

    def where(artifact: catalog.Artifact) -> Path:
        path = artifact.path(paths)
        return path if path.is_absolute() or root is None else root / path

    started = time.monotonic()
    deadline = started + wait
    project = _Flock.open(where(catalog.PROJECT_LOCK))
    inherited = os.environ.get(LOCK_ENV)
    token: str | None = None
    try:
        fcntl.flock(project.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        got = True
    except BlockingIOError:
        got = False
    if not got and inherited and read_record(project.path).get("token") == inherited:
        project.close()  # our ancestor holds it: do not take it, but do hold the stage lock
        deadline = max(deadline, time.monotonic() + NESTED_GRACE)
    else:
        if not got:
            project.take(deadline, what, log, since=started)
        token = uuid.uuid4().hex
    stage: _Flock | None = None
    try:
        if token is not None:
            project.write(_record(what, token=token))
        stage = _Flock.open(where(catalog.STAGE_LOCK))
        stage.take(deadline, what, log, since=started)
        if hold_stage:
            stage.write(_record(what))
        else:
            stage.close()
            stage = None
        if token is not None:
            _HELD[project.path] = token
        yield token
    finally:
        _HELD.pop(project.path, None)
        if stage is not None:
            stage.close(clear=True)
        project.close(clear=True)
