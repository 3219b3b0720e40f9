"""The one edge between Prefect and the stages: run a stage *through DVC*.

Why through DVC and not by calling `medclf.stages.<stage>.run` directly: DVC
already knows whether a stage's code, params and inputs changed, skips it when
not, and records what ran in `dvc.lock`. Calling the stage ourselves would make
a second, disagreeing record. So a task here only

1. asks DVC (Python API, in process: ~0.2 s instead of ~2-5 s for a `dvc status`
   process) whether the stage is up to date and, if not, why;
2. if it is not, runs `dvc repro --single-item <stage>` as a child process, with
   this interpreter's bin directory first on PATH so `medclf` is the venv's.

The child process is deliberate: its output is streamed into the task log line by
line (progress in the UI), the stage's own error line can be lifted into the
exception, a killed stage kills only the child, and TensorFlow's memory is given
back when each stage ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TAIL_LINES = 15
# Colour codes (MLflow's warnings, tqdm): the Prefect UI shows them as "[33m" noise.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Start-up chatter relayed at DEBUG, not INFO: absl's pre-init notice and TF/XLA C++ INFO/WARNING lines
# (`I0000 00:00:17.. port.cc:153] oneDNN ...`: printed before TF_CPP_MIN_LOG_LEVEL is read) and tqdm
# progress steps short of 100 %. Errors (E/F lines) and everything else stay at INFO.
_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \d\d:\d\d:\d+\.\d+ "
                      r"+\d+ [\w./-]+:\d+\]|To enable the following instructions: |.*\b\d{1,2}%\|.*\| *\d+/\d+ \[)")
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
"""Defaults for stage processes (an explicit setting in the environment wins): no TensorFlow INFO/WARNING lines."""
# Errors a later attempt can fix: network, throttling, servers down, a killed process.
_TRANSIENT = re.compile(
    r"cannot (list|read)|unreachable|timed? ?out|connection|temporar|throttl|slowdown|"
    r"service ?unavailable|internal ?error|too many requests|\b50[0234]\b|"
    r"exited with -\d+|exited with 13[47]|killed|broken pipe|reset by peer|TrackingUnavailable",
    re.IGNORECASE)
# DVC's words for a stage command that ended without reporting an error itself.
_DIED = re.compile(r"failed to run: .*, exited with -?\d+")
# Errors that will fail identically on every attempt: retrying only wastes time.
_DETERMINISTIC = {"ValidationFailed", "GateFailed", "ConfigError", "IngestError", "ValidationError",
                  "NoGpuWorker", "RemoteMismatch"}


class StageFailed(RuntimeError):
    """A stage exited non-zero. The message leads with the stage's own error line."""

    def __init__(self, stage: str, returncode: int, error: str, tail: list[str]) -> None:
        self.stage, self.returncode, self.error, self.tail = stage, returncode, error, tail
        m = re.match(rf"medclf {stage}: (\w+):", error)
        self.error_type = m.group(1) if m else None
        body = "\n".join(f"    {line}" for line in tail)
        super().__init__(f"stage '{stage}' failed: {error}\n  last lines of its output:\n{body}")

    @property
    def transient(self) -> bool:
        """Worth another attempt? Killed/crashed processes and network trouble are; checks are not.

        A stage that raised reports `medclf <stage>: Type: message` (the CLI catches every
        exception). A process that ended without that line was killed or crashed (OOM killer,
        preemption, SIGKILL), which is exactly what resumable training is for.
        """
        if self.error_type in _DETERMINISTIC:
            return False
        if self.error_type is None and _DIED.search(self.error):
            return True
        return bool(_TRANSIENT.search(self.error) or _TRANSIENT.search("\n".join(self.tail[-5:])))


@dataclass
class StageOutcome:
    """What happened to one stage in one flow run (small and JSON-friendly)."""

    stage: str
    status: str  # "ran" | "skipped" | "restored" (outputs checked out from DVC's run-cache)
    reason: str
    seconds: float
    attempt: int = 1
    tail: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    """The stage's own JSON result, as printed by `medclf <stage>`."""
    command_seconds: float | None = None
    """Wall time of the `medclf <stage>` command itself, from DVC starting it to its result (last
    attempt); `seconds - command_seconds` is what DVC + Prefect added around it."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for stage processes: this interpreter's bin dir first on PATH.

    `sys.executable` is not resolved on purpose: a venv's `python` is a symlink to the
    base interpreter, and only the unresolved path points at the venv's bin dir.
    """
    env = {**QUIET_ENV, **os.environ}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def source_env(root: Path) -> dict[str, str]:
    """Environment DVC needs to see the raw source: the S3 endpoint of an `s3://` raw_data (MinIO, moto).

    DVC checks an external S3 dependency by listing ETags through its own client, which reads the
    endpoint from `AWS_ENDPOINT_URL_S3`; params.yaml names it once, in `ingest.source.s3_endpoint_url`.
    An endpoint already set in the environment wins.
    """
    from medclf.config import ConfigError, load_settings

    try:
        s = load_settings(root / "params.yaml")
    except ConfigError:
        return {}  # the stage itself reports the bad config, with its key
    endpoint = s.ingest.source.s3_endpoint_url
    if not (endpoint and s.paths.raw_data.startswith("s3://")):
        return {}
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return {}
    return {"AWS_ENDPOINT_URL_S3": endpoint}


@contextlib.contextmanager
def patched_env(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def describe_status(entries: list[Any]) -> str:
    """Turn `dvc status` entries into one human sentence ("params changed: ingest; ...")."""
    parts: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            parts.append(entry)
            continue
        for kind, changes in entry.items():
            what = kind.replace("changed ", "")
            if not isinstance(changes, dict):
                parts.append(f"{what}: {changes}")
                continue
            by_state: dict[str, list[str]] = {}
            for path, state in changes.items():
                if isinstance(state, dict):  # params: {"params.yaml": {"ingest": "modified"}}
                    for key, st in state.items():
                        by_state.setdefault(f"params {st}", []).append(key)
                else:
                    by_state.setdefault(f"{what} {state}", []).append(path)
            parts += [f"{label}: {', '.join(sorted(paths))}" for label, paths in by_state.items()]
    return "; ".join(parts) or "changed"


def stage_target(root: Path, stage: str) -> str:
    """`<root>/dvc.yaml:<stage>`: DVC resolves a bare stage name against the *current directory*'s
    dvc.yaml, even with `Repo(root)`; from another DVC project (a test run from the repository,
    a worker's cwd) a bare name silently means that project's stage."""
    return f"{Path(root).resolve() / 'dvc.yaml'}:{stage}"


def dvc_status(stage: str, root: Path) -> list[Any]:
    """DVC's reasons why `stage` is out of date; [] when deps, params and outs match dvc.lock."""
    from dvc.repo import Repo

    with patched_env(source_env(root)), Repo(str(root)) as repo:
        found = repo.status(targets=[stage_target(root, stage)])
    return next(iter(found.values()), [])


def in_lock(stage: str, root: Path) -> bool:
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return False
    return stage in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {})


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def corrupted_outputs(stage: str, root: Path) -> list[str]:
    """The files of `stage`'s cached outputs whose bytes do not hash to dvc.lock's md5, each named by its path;
    their cache objects are removed (so DVC cannot serve them again). [] when every byte matches.

    DVC trusts a cache object whose size and mtime are unchanged (its state database), so a corrupted
    object with its old mtime (bit rot, a bad copy that kept times) is copied out by `dvc checkout` and by
    `dvc repro`'s run-cache restore, and `dvc status` then agrees. Hashing the restored bytes is the check.
    """
    import yaml
    from dvc.repo import Repo

    entry = ((yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {}).get(stage) or {}
    with Repo(str(root)) as repo:
        cache = Path(repo.cache.local.path)
    bad: list[str] = []

    def obj(md5: str) -> Path:
        return cache / md5[:2] / md5[2:]

    def check(path: Path, md5: str, shown: str) -> None:
        if not path.is_file() or _md5(path) != md5:
            bad.append(shown)
            with contextlib.suppress(OSError):
                obj(md5).chmod(0o644)
                obj(md5).unlink()

    for out in entry.get("outs") or []:
        md5 = str(out.get("md5") or "")
        if not md5 or out.get("cache") is False:
            continue
        path = root / out["path"]
        if not md5.endswith(".dir"):
            check(path, md5, out["path"])
            continue
        listing = obj(md5)
        try:
            files = json.loads(listing.read_bytes()) if _md5(listing) == md5[:-4] else None
        except (OSError, ValueError):
            files = None
        if files is None:  # the directory's own listing object is corrupted
            bad.append(f"{out['path']} (listing {md5})")
            with contextlib.suppress(OSError):
                listing.chmod(0o644)
                listing.unlink()
            continue
        for item in files:
            check(path / item["relpath"], item["md5"], f"{out['path']}/{item['relpath']}")
    return bad


def _stage_error(stage: str, lines: list[str], returncode: int) -> str:
    """The most telling text: the stage's own `medclf <stage>: Type: message` (all its lines), else DVC's."""
    starts = [i for i, ln in enumerate(lines) if ln.startswith(f"medclf {stage}:")]
    if starts:
        own = []
        for ln in lines[starts[-1]:starts[-1] + 40]:
            if ln.startswith("ERROR: failed to reproduce"):
                break
            own.append(ln)
        return "\n".join(own)
    dvc_err = [ln for ln in lines if ln.startswith("ERROR")]
    return dvc_err[-1] if dvc_err else f"exited with {returncode}"


def run_stage_via_dvc(stage: str, project_dir: str | Path = ".", *, force: bool = False,
                      logger: logging.Logger | None = None, env: dict[str, str] | None = None,
                      attempt: int = 1) -> StageOutcome:
    """Skip `stage` if DVC says it is up to date, else `dvc repro --single-item` it."""
    log = logger or logging.getLogger(f"medclf.tasks.{stage}")
    root = Path(project_dir).resolve()
    t0 = time.perf_counter()
    entries = dvc_status(stage, root)
    if not entries and not force:
        reason = "unchanged: code, params and inputs match dvc.lock"
        log.info("%s: %s - skipped", stage, reason)
        return StageOutcome(stage, "skipped", reason, round(time.perf_counter() - t0, 2), attempt)
    if force:
        reason = "forced"
    elif not in_lock(stage, root):
        reason = "first run (not in dvc.lock yet)"
    else:
        reason = describe_status(entries)
    log.info("%s: running (%s)", stage, reason)
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    tail: deque[str] = deque(maxlen=200)
    result: dict[str, Any] | None = None
    block: list[str] | None = None  # the stage's JSON result (`medclf` prints it last), logged as one line
    proc = subprocess.Popen(cmd, cwd=root, env=venv_env({**source_env(root), **(env or {})}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
    assert proc.stdout is not None
    t_cmd: float | None = None  # DVC echoes "> medclf <stage>" as it starts the command
    t_end: float | None = None  # the stage's JSON result is the command's last output
    for raw in proc.stdout:
        line = _ANSI.sub("", raw).rstrip()
        if not line:
            continue
        tail.append(line)
        if t_cmd is None and line.startswith("> "):
            t_cmd = time.perf_counter()
        if line == "{" and block is None:
            block = [line]
        elif block is not None:
            block.append(line)
            if line == "}":
                result, block, t_end = _parse_result(block), None, time.perf_counter()
                log.info("%s | result: %s", stage, result_line(result))
        else:
            log.log(logging.DEBUG if _CHATTER.match(line) else logging.INFO, "%s | %s", stage, line)
    rc = proc.wait()
    lines = list(tail)
    if rc != 0:
        raise StageFailed(stage, rc, _stage_error(stage, lines, rc), lines[-TAIL_LINES:])
    cached = any("is cached - skipping run" in ln for ln in lines)
    status = "restored" if cached else "ran"
    if cached:
        bad = corrupted_outputs(stage, root)
        if bad:  # DVC copied a cache object whose bytes are not its hash: never hand that on as data
            log.warning("%s: %d restored file(s) do not match dvc.lock (corrupted DVC cache): %s; the corrupted "
                        "cache entries were removed, recomputing the stage", stage, len(bad), ", ".join(bad[:5]))
            again = run_stage_via_dvc(stage, root, force=True, logger=log, env=env, attempt=attempt)
            again.reason = f"{reason}; its run-cache outputs were corrupted ({', '.join(bad[:5])}): recomputed"
            return again
        reason += " (outputs restored from DVC's run-cache, not recomputed)"
    own = round(t_end - t_cmd, 2) if t_cmd is not None and t_end is not None else None
    return StageOutcome(stage, status, reason, round(time.perf_counter() - t0, 2), attempt, lines[-TAIL_LINES:],
                        result, own)


def result_line(result: dict[str, Any] | None, width: int = 240) -> str:
    """A stage's JSON result as one short log line: its scalar fields, floats at 3 decimals.

    The full result (kilobytes: per-check details, markdown) stays in the task's return value and
    the stage's report files; the log only says what happened.
    """
    if not result:
        return "(none)"
    parts, hidden = [], 0
    for k, v in result.items():
        if isinstance(v, bool) or v is None:
            parts.append(f"{k}={str(v).lower()}")
        elif isinstance(v, int):
            parts.append(f"{k}={v}")
        elif isinstance(v, float):
            parts.append(f"{k}={v:.3f}")
        elif isinstance(v, str) and len(v) <= 60 and "\n" not in v:
            parts.append(f"{k}={v}")
        else:
            hidden += 1
    text = ", ".join(parts)
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text + (f" (+{hidden} structured field(s) in the stage's report)" if hidden else "")


def _parse_result(block: list[str]) -> dict[str, Any] | None:
    try:
        out = json.loads("\n".join(block))
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry network/killed failures, never a failed check or gate."""
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:  # noqa: BLE001 - anything else (DVC lock, OS) is worth one more try
        return True
    return False


def dvc_push(project_dir: str | Path = ".", remote: str | None = None,
             logger: logging.Logger | None = None) -> dict[str, Any]:
    """Push every cached output in dvc.lock to the configured remote (no-op if none is set)."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    log = logger or logging.getLogger("medclf.tasks.push")
    t0 = time.perf_counter()
    with Repo(str(Path(project_dir).resolve())) as repo:
        name = remote or repo.config["core"].get("remote")
        if not name:
            log.warning("no DVC remote configured (`dvc remote add -d NAME URL`); outputs stay local")
            return {"remote": None, "pushed": 0, "seconds": 0.0}
        try:
            pushed = repo.push(remote=name)
        except NoRemoteError as err:
            raise RuntimeError(f"dvc push: {err}") from err
    out = {"remote": name, "pushed": int(pushed), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("dvc push to '%s': %d file(s) uploaded", name, out["pushed"])
    return out


def stage_task(stage: str, description: str) -> Any:
    """Build the Prefect task for one stage: a thin wrapper around `run_stage_via_dvc`.

    No Prefect result caching (`NO_CACHE`): DVC is the cache, and two caches could disagree.
    Retries are set per run by the flow (`Task.with_options`), because whether a stage is
    "transient" depends on the configuration (ingest from S3 is, from a local folder is not);
    `transient_only` keeps a failed check or gate from ever being retried.
    """
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE
    from prefect.runtime import task_run

    def _run(project_dir: str = ".", force: bool = False) -> dict[str, Any]:
        outcome = run_stage_via_dvc(stage, project_dir, force=force, logger=get_run_logger(),
                                    attempt=task_run.run_count or 1)
        return outcome.to_dict()

    _run.__name__ = _run.__qualname__ = stage
    _run.__doc__ = description
    return task(_run, name=stage, description=description, cache_policy=NO_CACHE, persist_result=False,
                retry_condition_fn=transient_only)


def push_task() -> Any:
    """Prefect task `dvc-push`: uploads are network I/O, so up to 3 retries with backoff."""
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE

    def dvc_push_task(project_dir: str = ".") -> dict[str, Any]:
        return dvc_push(project_dir, logger=get_run_logger())

    return task(dvc_push_task, name="dvc-push", cache_policy=NO_CACHE, persist_result=False, retries=3,
                description="Push every DVC-cached output to the configured remote.")
