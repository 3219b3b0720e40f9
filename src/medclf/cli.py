"""`medclf <stage>`: the same stage declaration (`medclf.pipeline.invoke`) that DVC and Prefect run.

Every exit of `medclf <stage>` leaves its outcome in a small result file, `catalog.STAGE_RESULT`
(`<cache_dir>/runs/<stage>.json`, or the path in MEDCLF_STAGE_RESULT), written atomically:

    {"stage": "train", "token": "<MEDCLF_RUN_TOKEN>", "exit_code": 0, "seconds": 41.2, "result": {...}}
    {"stage": "evaluate", "token": "...", "exit_code": 3, "seconds": 9.1,
     "error": {"stage": "evaluate", "error_type": "GateFailed", "message": "...", "transient": false,
               "exit_code": 3}}

The orchestrator (tasks/common.py) reads that file, never the stage's stdout: the token it passes in the
environment tells it the file is this invocation's. Under a token the file is first written with
`"status": "running"`, so a process that was killed (no final record) is told from a stage DVC never
started. Exit codes: 0 ok, 2 config error, 3 deterministic stage failure (a failed gate or check: a retry
fails identically), 75 transient (EX_TEMPFAIL: network, throttling, a server down, the project locked by
another run), 1 anything else.
Whether an error is transient is said where it is raised (`transient` on the exception, see
`is_transient`), not guessed from its text. Nothing heavy is imported at module level, so
`medclf --help` answers at once.

A stage command holds the project lock (medclf/infra/lock.py) while it runs, unless the flow that started it holds
it (its token in MEDCLF_PROJECT_LOCK): a second run on the checkout fails fast (MEDCLF_LOCK_TIMEOUT: wait),
naming the holder, and leaves the holder's outputs and result file alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medclf import __version__
from medclf.infra.lock import STAGE_TIMEOUT, LockBusy, project_lock, timeout
from medclf.pipeline import PIPELINE

if TYPE_CHECKING:
    from medclf.config import Settings

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_STAGE, EXIT_TEMPFAIL = 0, 1, 2, 3, 75
RUN_TOKEN_ENV = "MEDCLF_RUN_TOKEN"
"""Set by the orchestrator: copied into the result file, so it knows the file is from this invocation."""
SECRET_ENV = "MEDCLF_AUDIT_SECRET"
"""The promotion service's webhook secret, when no --secret-file is given."""
RESULT_FILE_ENV = "MEDCLF_STAGE_RESULT"
"""Where to write the result file instead of `catalog.STAGE_RESULT` (the orchestrator sets it, so even a
params.yaml that does not load, and so has no `cache_dir`, gets its structured error)."""
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "INTERNAL_ERROR",
}


def _network_types() -> tuple[type[BaseException], ...]:
    """Exception types of a connection that failed or timed out; third-party ones only if already imported
    (an exception of a library that was never imported cannot be in the chain)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("botocore.exceptions", ("ConnectionError", "HTTPClientError")),
        ("requests.exceptions", ("ConnectionError", "Timeout")),
        ("urllib3.exceptions", ("ProtocolError", "NewConnectionError", "TimeoutError")),
        ("socket", ("gaierror",)),
    ):
        mod = sys.modules.get(module)
        found += [t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type)]
    return tuple(found)


def _status_transient(err: BaseException) -> bool | None:
    """A service's answer that says "later": HTTP 429/5xx, or a throttling/unavailable error code."""
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code in _THROTTLED or (isinstance(status, int) and (status == 429 or status >= 500))
    http = getattr(err, "code", None)  # urllib.error.HTTPError
    if isinstance(http, int) and isinstance(err, OSError) and http >= 400:
        return http == 429 or http >= 500
    mlflow_code = getattr(err, "error_code", None)  # MlflowException
    if isinstance(mlflow_code, str) and mlflow_code:
        return mlflow_code in _THROTTLED
    return None


def is_transient(err: BaseException) -> bool | None:
    """Is another attempt worth it? True / False when known, None when nothing says.

    Walks the exception and its causes: the first `transient` attribute (a bool, set on the class or the
    instance where the error is raised: `TrackingUnavailable`, `SourceChanged`, a `SourceError` of a
    failed download, `GateFailed`, `ValidationFailed` ...) decides; a `UnicodeError` (a file name that is
    not valid UTF-8) is not; else a failed connection or timeout, or a service answering 429/5xx/throttling,
    anywhere in the chain, is transient."""
    seen: set[int] = set()
    cur: BaseException | None = err
    unknown = True
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        flag = getattr(cur, "transient", None)
        if isinstance(flag, bool):
            return flag
        if isinstance(cur, UnicodeError):  # a name or text that cannot be encoded fails the same way again
            return False
        if isinstance(cur, _network_types()):
            return True
        said = _status_transient(cur)
        if said:
            return True
        unknown = unknown and said is None
        reason = getattr(cur, "reason", None)  # urllib's URLError wraps the socket error it met
        cur = (
            cur.__cause__
            or (None if cur.__suppress_context__ else cur.__context__)
            or (reason if isinstance(reason, BaseException) else None)
        )
    return None if unknown else False


def error_record(stage: str, err: BaseException) -> dict[str, Any]:
    """The structured error of a failed stage: {stage, error_type, message, transient, exit_code}."""
    from medclf.config import ConfigError

    transient = False if isinstance(err, ConfigError) else is_transient(err)
    code = (
        EXIT_CONFIG
        if isinstance(err, ConfigError)
        else EXIT_TEMPFAIL
        if transient
        else EXIT_STAGE
        if transient is False
        else EXIT_ERROR
    )
    return {
        "stage": stage,
        "error_type": type(err).__name__,
        "message": str(err),
        "transient": bool(transient),
        "exit_code": code,
    }


def result_path(stage: str, settings: Settings | None) -> Path | None:
    """Where this invocation's result file goes: MEDCLF_STAGE_RESULT, else `catalog.STAGE_RESULT`."""
    if os.environ.get(RESULT_FILE_ENV):
        return Path(os.environ[RESULT_FILE_ENV])
    if settings is None:
        return None
    from medclf.infra import catalog

    return catalog.STAGE_RESULT.path(settings.paths, stage=stage)


def write_result(path: Path | None, record: dict[str, Any]) -> None:
    """Write the result file atomically (never fails the stage: its outputs are already committed)."""
    if path is None:
        return
    from medclf.infra.io import write_json

    try:
        write_json(path, {**record, "token": os.environ.get(RUN_TOKEN_ENV)})
    except OSError as err:
        logging.getLogger("medclf.cli").warning("could not write the result file %s: %s", path, err)


def _settings(args: argparse.Namespace) -> Settings:
    from medclf.config import load_settings

    return load_settings(args.params)


def _register_from_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """`medclf register --from-exp NAME`: the one way an experiment is released. `dvc exp apply NAME` brings its
    params, dvc.lock and outputs into the workspace, then `dvc repro --force --single-item register` registers it as
    a main-line run would (so dvc.lock records the registration), its version tagged with the experiment's name."""
    import subprocess

    from medclf.stages.register import EXPERIMENT_ENV, FROM_EXPERIMENT_ENV

    root = Path(args.params).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != EXPERIMENT_ENV} | {FROM_EXPERIMENT_ENV: args.from_exp}
    for cmd in (["dvc", "exp", "apply", args.from_exp], ["dvc", "repro", "--force", "--single-item", "register"]):
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            said = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}) in {root}: {' | '.join(said)}")
    from medclf.infra import catalog

    args.settings = _settings(args)
    return {"experiment": args.from_exp, **catalog.REGISTER.load(args.settings.paths)}


def _run_stage(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.pipeline import invoke

    if getattr(args, "from_exp", None):  # before the lock: the `dvc repro` it runs takes it
        return _register_from_experiment(args)
    args.settings = _settings(args)
    args.hold.enter_context(
        project_lock(
            args.settings.paths,
            f"medclf {args.command}",
            wait=timeout(STAGE_TIMEOUT),
            log=logging.getLogger("medclf.cli"),
        )
    )
    return invoke(args.command, args.settings)


def _promote(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.release.registry import promote

    return promote(_settings(args), version=args.version, alias=args.alias, by=args.by, force=args.force)


def _rollback(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.release.registry import rollback

    return rollback(_settings(args), alias=args.alias, by=args.by, force=args.force)


def _block(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.release import promotion
    from medclf.release.registry import client

    settings = _settings(args)
    return promotion.block(client(settings), settings.registry.model_name, str(args.version), args.why, args.floor)


def _promotion_service(args: argparse.Namespace) -> dict[str, Any]:
    """Serve the webhook receiver until interrupted (`mlflow/server.sh start` runs it beside MLflow)."""
    from medclf.release import promotion
    from medclf.release.registry import client

    settings = _settings(args)
    if args.log:
        os.environ[promotion.AUDIT_ENV] = args.log
    secret = Path(args.secret_file).read_text().strip() if args.secret_file else os.environ.get(SECRET_ENV, "")
    if not secret:
        raise RuntimeError(f"no webhook secret: give --secret-file or set {SECRET_ENV}")
    lock = Path(args.params).resolve().parent / "dvc.lock"
    promotion.run_service(
        client(settings, attempts=60),
        args.host,
        args.port,
        secret,
        settings.paths.raw_data,
        lock,
        aliases=tuple(args.alias or promotion.WATCHED),
        register=not args.no_register,
    )
    return {"stopped": True}


def _predict(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.release.predict import predict_paths

    return predict_paths(args.paths, model_uri=args.model, out=args.out, settings=_settings(args))


def _demo_data(args: argparse.Namespace) -> dict[str, Any]:
    from medclf.sources.demo import write_demo_folder

    return write_demo_folder(_settings(args).ingest.source.synthetic, Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medclf",
        description="Medical image classification pipeline. Not for clinical use without regulatory clearance.",
    )
    p.add_argument("--version", action="version", version=f"medclf {__version__}")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    stages = {}
    for name, decl in PIPELINE.items():  # wired from the declarations
        reads = ", ".join(a.name for a in decl.inputs) or "nothing"
        stages[name] = sub.add_parser(
            name,
            help=f"run the {name} stage (reads {reads}; params: {', '.join(decl.params)})",
            description=f"Writes {', '.join(a.name for a in decl.outputs + decl.metrics + decl.plots)}.",
        )
        stages[name].set_defaults(func=_run_stage)
    stages["register"].add_argument(
        "--from-exp",
        metavar="NAME",
        help="release DVC experiment NAME (`dvc exp run` never registers): dvc exp apply NAME, then register it",
    )
    pr = sub.add_parser("promote", help="move an alias (default: champion) to a model version")
    pr.add_argument("--version", required=True, type=int)
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--by", default=None, help="who promotes (recorded as a version tag; default: $USER)")
    pr.add_argument("--force", action="store_true", help="promote even when the promotion check fails (audited)")
    pr.set_defaults(func=_promote)
    rb = sub.add_parser("rollback", help="move an alias back to its previous version")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--by", default=None, help="who rolls back (recorded as a version tag; default: $USER)")
    rb.add_argument("--force", action="store_true", help="roll back even when the promotion check fails (audited)")
    rb.set_defaults(func=_rollback)
    bl = sub.add_parser("block", help="mark a model version as never to be promoted (tag medclf.blocked)")
    bl.add_argument("--version", required=True, type=int)
    bl.add_argument("--why", required=True, help="the reason, kept as the tag's value")
    bl.add_argument("--floor", action="store_true", help="and every older version: no rollback past this one")
    bl.set_defaults(func=_block)
    ps = sub.add_parser("promotion-service", help="check and audit alias changes made in the MLflow UI (webhook)")
    ps.add_argument("--host", default="127.0.0.1")
    ps.add_argument("--port", type=int, default=int(os.environ.get("MEDCLF_AUDIT_PORT", "5055")))
    ps.add_argument("--secret-file", default=None, help=f"the webhook's HMAC secret (default: ${SECRET_ENV})")
    ps.add_argument("--log", default=None, help="the audit log (default: $MEDCLF_AUDIT_LOG or mlflow/store/audit)")
    ps.add_argument("--alias", action="append", help="an alias to watch (repeatable; default: champion)")
    ps.add_argument("--no-register", action="store_true", help="do not create/update the MLflow webhook")
    ps.set_defaults(func=_promotion_service)
    pd_ = sub.add_parser("predict", help="classify images, folders or DICOM files")
    pd_.add_argument("paths", nargs="+")
    pd_.add_argument("--model", default=None, help="model URI (default: models:/<register.model_name>@champion)")
    pd_.add_argument("--out", default="predictions.csv")
    pd_.set_defaults(func=_predict)
    dd = sub.add_parser("demo-data", help="write the SYNTHETIC demo phantoms as a PNG class folder")
    dd.add_argument("out")
    dd.set_defaults(func=_demo_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.ExitStack() as args.hold:  # a stage's project lock, released once its result file is written
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from medclf.config import ConfigError

    stage = args.command if args.command in PIPELINE else None
    args.settings = None
    t0 = time.perf_counter()
    if stage and os.environ.get(RUN_TOKEN_ENV):  # killed before the end: the orchestrator finds "running"
        write_result(result_path(stage, None), {"stage": stage, "status": "running", "pid": os.getpid()})
    try:
        result = args.func(args)
    except Exception as err:  # every stage error reaches the user as one clear line + cause
        # refused by the lock: the default result file is the holder's, only an orchestrator's own path is ours
        if stage and not (isinstance(err, LockBusy) and not os.environ.get(RESULT_FILE_ENV)):
            record = error_record(stage, err)
            body: dict[str, Any] = {"stage": stage, "exit_code": record["exit_code"], "error": record}
            detail = getattr(err, "result", None)  # a failed check still has its report (ValidationFailed)
            if isinstance(detail, dict):
                body["result"] = detail
            write_result(result_path(stage, args.settings), {**body, "seconds": round(time.perf_counter() - t0, 3)})
        if isinstance(err, ConfigError):
            print(f"medclf: {err}", file=sys.stderr)
            return EXIT_CONFIG
        if args.verbose:
            raise
        print(f"medclf {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return int(error_record(args.command, err)["exit_code"])
    if stage:
        path, seconds = result_path(stage, args.settings), round(time.perf_counter() - t0, 3)
        write_result(path, {"stage": stage, "exit_code": EXIT_OK, "seconds": seconds, "result": result})
        if os.environ.get(RUN_TOKEN_ENV):  # the orchestrator reads the file and logs the result itself
            print(f"medclf {stage}: done in {seconds:.1f} s; result in {path}")
            return EXIT_OK
    print(json.dumps(result, indent=2, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
