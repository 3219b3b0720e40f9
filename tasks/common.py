"""The one edge between Prefect and the stages: a DVC adapter that runs a stage *through DVC*.

DVC knows whether a stage's code, params and inputs changed, skips it when not, and records what ran in
`dvc.lock`; calling the stage ourselves would make a second, disagreeing record. So a task here only

1. asks DVC, in process (~0.2 s; a `dvc status` process takes 2-5 s), whether and why the stage is stale;
2. if it is, runs `dvc repro --single-item <stage>` as a child process (this interpreter's bin directory
   first on PATH, a fresh run token in its environment), its output streamed to the task log for people;
3. reads what the stage did from its result file (`catalog.STAGE_RESULT`, written by `medclf <stage>` on
   every exit, see medclf/cli.py), never from its output: the result, or a structured error that says
   whether it is transient. No file of this run: DVC restored the outputs from its run-cache, or never
   started the command; a file still saying "running": the process was killed (transient, resumable).

A child process, so a killed stage kills only the child and TensorFlow's memory is given back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import tempfile
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medclf.cli import RESULT_FILE_ENV, RUN_TOKEN_ENV
from tasks.env import patched_env, settings_or_none, source_env, venv_env

if TYPE_CHECKING:
    from medclf.infra.catalog import Artifact

TAIL_LINES = 15
# Colour codes (MLflow's warnings, tqdm): the Prefect UI shows them as "[33m" noise.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Start-up chatter relayed at DEBUG, not INFO: absl's pre-init notice and TF/XLA C++ INFO/WARNING lines
# (`I0000 00:00:17.. port.cc:153] oneDNN ...`: printed before TF_CPP_MIN_LOG_LEVEL is read) and tqdm
# progress steps short of 100 %. Errors (E/F lines) and everything else stay at INFO.
_CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} \d\d:\d\d:\d+\.\d+ "
    r"+\d+ [\w./-]+:\d+\]|To enable the following instructions: |.*\b\d{1,2}%\|.*\| *\d+/\d+ \[)"
)
UNCHANGED = "unchanged: code, params and inputs match dvc.lock"


class StageFailed(RuntimeError):
    """A stage failed; `error_type` and `transient` come from its structured error, not from its output.

    `error` is the one-line `medclf <stage>: Type: message` a person reads; `tail` the last lines of
    DVC's output, shown in the message for context only.
    """

    def __init__(
        self,
        stage: str,
        error_type: str,
        message: str,
        *,
        transient: bool,
        exit_code: int | None = None,
        tail: list[str] | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        self.stage, self.error_type, self.message, self.transient = stage, error_type, message, transient
        self.exit_code, self.tail, self.result = exit_code, list(tail or []), result
        self.error = f"medclf {stage}: {error_type}: {message}"
        body = "".join(f"\n    {line}" for line in self.tail)
        super().__init__(
            f"stage '{stage}' failed: {self.error}" + (f"\n  last lines of its output:{body}" if body else "")
        )

    @classmethod
    def from_run(cls, stage: str, record: dict[str, Any] | None, tail: list[str]) -> StageFailed:
        """Classify a failed `dvc repro` of `stage` by what its result file (`record`, this run's) says."""
        error = (record or {}).get("error")
        if isinstance(error, dict):
            detail = (record or {}).get("result")
            return cls(
                stage,
                str(error.get("error_type")),
                str(error.get("message")),
                transient=bool(error.get("transient")),
                exit_code=error.get("exit_code"),
                tail=tail,
                result=detail if isinstance(detail, dict) else None,
            )
        dvc_said = next((ln for ln in reversed(tail) if ln.startswith("ERROR")), "")  # shown, not parsed
        if (record or {}).get("status") == "running":  # it started and never reported: killed or crashed
            return cls(
                stage,
                "Killed",
                "the stage process ended without reporting an outcome (killed: "
                f"SIGKILL, OOM killer, preemption?); a retry resumes it. {dvc_said}".rstrip(),
                transient=True,
                tail=tail,
            )
        said = "the stage command succeeded, then DVC failed" if record else "DVC did not start the stage command"
        return cls(stage, "DvcError", f"{said}. {dvc_said}".rstrip(), transient=False, tail=tail)


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
    """The stage's own result, as `medclf <stage>` wrote it to its result file (catalog.STAGE_RESULT)."""
    command_seconds: float | None = None
    """Wall time of the `medclf <stage>` command itself, as it measured it (last attempt);
    `seconds - command_seconds` is what DVC + Prefect added around it."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def artifact_path(root: Path, artifact: Artifact, **fields: str) -> Path | None:
    """Where a catalog entry lives in the checkout at `root` (None when its params.yaml does not load)."""
    s = settings_or_none(root)
    if s is None:
        return None
    path = artifact.path(s.paths, **fields)
    return path if path.is_absolute() else Path(root) / path


def result_file(root: Path, stage: str) -> Path:
    """Where `medclf <stage>` writes its outcome for this checkout: `catalog.STAGE_RESULT` under the root
    (a temporary file when params.yaml does not load, so a config error still has its structured error)."""
    from medclf.infra import catalog

    path = artifact_path(root, catalog.STAGE_RESULT, stage=stage)
    return path or Path(tempfile.mkdtemp(prefix="medclf-run-")) / f"{stage}.json"


def read_result(path: Path, token: str) -> dict[str, Any] | None:
    """The result file if this invocation (`token`) wrote it, else None (absent, another run's, unreadable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("token") == token else None


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


def lock_entry(root: Path, stage: str) -> dict[str, Any] | None:
    """`stage`'s record in `<root>/dvc.lock` (the one reader of dvc.lock here), None when it has none."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    entry = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(stage)
    return entry if isinstance(entry, dict) else None


def merge_lock_entry(root: Path, stage: str, entry: dict[str, Any]) -> None:
    """Put one stage's record, produced elsewhere (the GPU worker), into this checkout's dvc.lock (atomically)."""
    import yaml

    from medclf.infra.io import atomic_file

    lock = Path(root) / "dvc.lock"
    data = (yaml.safe_load(lock.read_text()) if lock.exists() else None) or {"schema": "2.0", "stages": {}}
    data.setdefault("stages", {})[stage] = entry
    with atomic_file(lock) as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def plan(stage: str, root: Path, force: bool) -> str | None:
    """Why `stage` must run ("forced", "first run ...", DVC's reasons), or None when DVC says it is up to date."""
    entries = dvc_status(stage, root)
    if not entries and not force:
        return None
    if force:
        return "forced"
    return describe_status(entries) if lock_entry(root, stage) is not None else "first run (not in dvc.lock yet)"


def corrupted_outputs(stage: str, root: Path) -> list[str]:
    """The files of `stage`'s cached outputs whose bytes do not hash to dvc.lock's md5, each named by its path;
    their cache objects are removed (so DVC cannot serve them again). [] when every byte matches.

    DVC trusts a cache object whose size and mtime are unchanged (its state database), so a corrupted
    object with its old mtime (bit rot, a bad copy that kept times) is copied out by `dvc checkout` and by
    `dvc repro`'s run-cache restore, and `dvc status` then agrees. Hashing the restored bytes is the check.
    """
    from dvc.repo import Repo

    from medclf.infra.io import file_digest

    entry = lock_entry(root, stage) or {}
    with Repo(str(root)) as repo:
        cache = Path(repo.cache.local.path)
    bad: list[str] = []

    def obj(md5: str) -> Path:
        return cache / md5[:2] / md5[2:]

    def check(path: Path, md5: str, shown: str) -> None:
        if not path.is_file() or file_digest(path, algo="md5") != md5:
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
            files = json.loads(listing.read_bytes()) if file_digest(listing, algo="md5") == md5[:-4] else None
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


def run_stage_via_dvc(
    stage: str,
    project_dir: str | Path = ".",
    *,
    force: bool = False,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    env: dict[str, str] | None = None,
    attempt: int = 1,
) -> StageOutcome:
    """Skip `stage` if DVC says it is up to date, else `dvc repro --single-item` it and read its result file."""
    log = logger or logging.getLogger(f"medclf.tasks.{stage}")
    root = Path(project_dir).resolve()
    t0 = time.perf_counter()
    reason = plan(stage, root, force)
    if reason is None:
        log.info("%s: %s - skipped", stage, UNCHANGED)
        return StageOutcome(stage, "skipped", UNCHANGED, round(time.perf_counter() - t0, 2), attempt)
    log.info("%s: running (%s)", stage, reason)
    token, path = uuid.uuid4().hex, result_file(root, stage)
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        errors="replace",
        env=venv_env({**source_env(root), **(env or {}), RUN_TOKEN_ENV: token, RESULT_FILE_ENV: str(path)}),
    )
    assert proc.stdout is not None
    for raw in proc.stdout:  # relayed for people to read; nothing here is parsed
        line = _ANSI.sub("", raw).rstrip()
        if line:
            tail.append(line)
            log.log(logging.DEBUG if _CHATTER.match(line) else logging.INFO, "%s | %s", stage, line)
    rc = proc.wait()
    record = read_result(path, token)
    if rc != 0:
        raise StageFailed.from_run(stage, record, list(tail))
    if record is not None and "result" in record:
        result = record["result"] if isinstance(record["result"], dict) else None
        log.info("%s | result: %s", stage, result_line(result))
        return StageOutcome(
            stage, "ran", reason, round(time.perf_counter() - t0, 2), attempt, list(tail), result, record.get("seconds")
        )
    # success without a result of this run: DVC restored the outputs from its run-cache instead of running
    bad = corrupted_outputs(stage, root)
    if bad:  # DVC copied a cache object whose bytes are not its hash: never hand that on as data
        log.warning(
            "%s: %d restored file(s) do not match dvc.lock (corrupted DVC cache): %s; the corrupted "
            "cache entries were removed, recomputing the stage",
            stage,
            len(bad),
            ", ".join(bad[:5]),
        )
        again = run_stage_via_dvc(stage, root, force=True, logger=log, env=env, attempt=attempt)
        again.reason = f"{reason}; its run-cache outputs were corrupted ({', '.join(bad[:5])}): recomputed"
        return again
    return StageOutcome(
        stage,
        "restored",
        f"{reason} (outputs restored from DVC's run-cache, not recomputed)",
        round(time.perf_counter() - t0, 2),
        attempt,
        list(tail),
    )


def result_line(result: dict[str, Any] | None, width: int = 240) -> str:
    """A stage's result as one short log line: its scalar fields, floats at 3 decimals.

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


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry network/killed failures, never a failed check or gate."""
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:  # noqa: BLE001 - anything else (DVC lock, OS) is worth one more try
        return True
    return False


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
        outcome = run_stage_via_dvc(
            stage, project_dir, force=force, logger=get_run_logger(), attempt=task_run.run_count or 1
        )
        return outcome.to_dict()

    _run.__name__ = _run.__qualname__ = stage
    _run.__doc__ = description
    return task(
        name=stage,
        description=description,
        cache_policy=NO_CACHE,
        persist_result=False,
        retry_condition_fn=transient_only,
    )(_run)
