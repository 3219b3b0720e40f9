"""The promotion check and its audit: every move of a watched alias (`champion`) is checked and recorded.

`check` is the checklist (gates passed; raw data still the checkout's dvc.lock's, not for a rollback; not blocked,
nor older than a version blocked as a floor), `record` tags the verdict and appends it to the audit log, and
`PromotionService` receives MLflow's `model_version_alias.created` webhook for changes made in the MLflow UI: a
failed check puts the alias back. `registry.promote` runs the same check. docs/PROMOTION.md, "Promotion check and
audit", states the rules exactly."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WATCHED = ("champion",)
TAG_CHECK = "promotion.check"
TAG_BLOCKED = "medclf.blocked"
TAG_BLOCKED_FLOOR = "medclf.blocked_floor"
AUDIT_ENV = "MEDCLF_AUDIT_LOG"
WEBHOOK_NAME = "medclf-promotion-audit"
EVENT = "model_version_alias.created"
ALIAS_CREATED = ("model_version_alias", "created")
MAX_SKEW_S = 300
"""A delivery whose signed timestamp is further from now than this is refused (replay protection)."""
CLI_ECHO_S = 120
"""An alias event for a version `medclf promote` switched less than this ago is that promotion's echo."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def audit_path() -> Path:
    """$MEDCLF_AUDIT_LOG, else <MLFLOW_STORE_DIR or mlflow/store>/audit/promotions.jsonl (git-ignored)."""
    if os.environ.get(AUDIT_ENV):
        return Path(os.environ[AUDIT_ENV])
    return Path(os.environ.get("MLFLOW_STORE_DIR") or "mlflow/store") / "audit" / "promotions.jsonl"


def append_audit(record: dict[str, Any], path: Path | None = None) -> Path:
    """Append one JSON line (O_APPEND: a line is never interleaved with another writer's; fsync'd)."""
    path = path or audit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_audit(path: Path | None = None) -> list[dict[str, Any]]:
    """The audit log's records, oldest first ([] when there is none; a torn last line is skipped)."""
    path = path or audit_path()
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ----------------------------------------------------------------------------- the checklist
@dataclass(frozen=True)
class Verdict:
    """The checklist's outcome: (item, "ok" | "failed" | "unknown" | "skipped", detail) per item."""

    items: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(status != "failed" for _, status, _ in self.items)

    @property
    def reasons(self) -> list[str]:
        return [f"{item}: {detail}" for item, status, detail in self.items if status == "failed"]

    def word(self, forced: bool = False) -> str:
        if self.passed:
            return "passed"
        return "failed: " + "; ".join(self.reasons) + (" (forced)" if forced else "")

    def document(self) -> list[dict[str, str]]:
        return [{"item": i, "status": s, "detail": d} for i, s, d in self.items]


def _current_raw_md5(raw_data: str | None, lock: Path | None) -> str | None:
    from medclf.infra.tracking import raw_data_version

    if raw_data is None or lock is None or not lock.exists():
        return None
    try:
        return str(raw_data_version(raw_data, lock).get("md5") or "") or None
    except Exception as err:  # noqa: BLE001 - an unreadable dvc.lock is "unknown", not a crash
        log.warning("could not read %s: %s", lock, err)
        return None


def check(cl: Any, name: str, mv: Any, raw_data: str | None, lock: Path | None, rollback: bool = False) -> Verdict:
    """The checklist for version `mv` of `name` (module docstring); `lock` is the checkout's dvc.lock."""
    from medclf.release.versions import search_versions

    tags = mv.tags or {}
    items: list[tuple[str, str, str]] = []
    gates = tags.get("gates", "")
    items.append(("gates", "ok", "passed") if gates == "passed" else ("gates", "failed", f"gates tag is {gates!r}"))
    if rollback:
        items.append(("data", "skipped", "a rollback: not checked"))
    else:
        have, current = tags.get("raw_data_md5") or None, _current_raw_md5(raw_data, lock)
        if have is None or current is None:
            items.append(("data", "unknown", "no raw_data_md5 tag" if have is None else f"no ingest md5 in {lock}"))
        elif have == current:
            items.append(("data", "ok", f"raw data md5 {have} is dvc.lock's"))
        else:
            items.append(("data", "failed", f"trained on raw data md5 {have}, dvc.lock now has {current}"))
    if tags.get(TAG_BLOCKED):
        items.append(("blocked", "failed", f"v{mv.version} is blocked ({tags[TAG_BLOCKED]})"))
    else:
        floors = [
            v
            for v in search_versions(cl, name)
            if int(v.version) > int(mv.version)
            and (v.tags or {}).get(TAG_BLOCKED)
            and (v.tags or {}).get(TAG_BLOCKED_FLOOR) == "true"
        ]
        if floors:
            b = min(floors, key=lambda v: int(v.version))
            items.append(("blocked", "failed", f"past blocked floor v{b.version} ({b.tags[TAG_BLOCKED]})"))
        else:
            items.append(("blocked", "ok", "not blocked"))
    return Verdict(items)


def record(
    cl: Any,
    name: str,
    version: str,
    alias: str,
    verdict: Verdict,
    via: str,
    who: str | None,
    when: str,
    forced: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Tag the verdict on the version (`promotion.check`, `<alias>.audit`) and append it to the audit log."""
    word = verdict.word(forced)
    cl.set_model_version_tag(name, version, TAG_CHECK, word[:5000])
    cl.set_model_version_tag(name, version, f"{alias}.audit", f"{when} by {who or 'unknown'} via {via}: {word}"[:5000])
    entry = {
        "at": when,
        "model": name,
        "version": str(version),
        "alias": alias,
        "user": who,
        "via": via,
        "verdict": "passed" if verdict.passed else ("forced" if forced else "failed"),
        "checks": verdict.document(),
        **extra,
    }
    append_audit(entry)
    return entry


def note_failure(cl: Any, name: str, version: str, text: str) -> None:
    """Append a "Promotion check" paragraph to the version's description (the existing text is kept)."""
    from medclf.release.model_card import DESCRIPTION_LIMIT, fit_description

    old = cl.get_model_version(name, version).description or ""
    kept = fit_description(old.rstrip(), DESCRIPTION_LIMIT - len(text) - 2) if old else ""
    cl.update_model_version(name, version, description=(kept + "\n\n" if kept else "") + text)


def block(cl: Any, name: str, version: str, why: str, floor: bool = False, who: str | None = None) -> dict[str, Any]:
    """Mark a version as never to be promoted (`medclf.blocked` = why; with `floor`, no older one either)."""
    when, who = now(), who or os.environ.get("USER") or "unknown"
    cl.set_model_version_tag(name, version, TAG_BLOCKED, why[:5000] or "blocked")
    cl.set_model_version_tag(name, version, TAG_BLOCKED_FLOOR, "true" if floor else "false")
    scope = "this version and every older one" if floor else "this version"
    note_failure(cl, name, version, f"**Blocked** ({when}, by {who}): {why}. No promotion of {scope}.")
    entry = {"at": when, "model": name, "version": version, "user": who, "via": "cli", "verdict": "blocked"}
    append_audit({**entry, "why": why, "floor": floor})
    return entry


# ----------------------------------------------------------------------------- the webhook receiver
def verify(secret: str, headers: Any, body: bytes, at: float | None = None) -> bool:
    """MLflow's HMAC-SHA256 over `<delivery id>.<timestamp>.<body>` (mlflow.webhooks.delivery), in constant time."""
    from mlflow.webhooks.constants import (
        WEBHOOK_DELIVERY_ID_HEADER,
        WEBHOOK_SIGNATURE_HEADER,
        WEBHOOK_SIGNATURE_VERSION,
        WEBHOOK_TIMESTAMP_HEADER,
    )

    names = (WEBHOOK_SIGNATURE_HEADER, WEBHOOK_DELIVERY_ID_HEADER, WEBHOOK_TIMESTAMP_HEADER)
    sig, delivery, stamp = (headers.get(h) for h in names)
    if not (sig and delivery and stamp):
        return False
    try:
        if abs((at or time.time()) - int(stamp)) > MAX_SKEW_S:
            return False
        content = f"{delivery}.{stamp}.{body.decode()}".encode()
    except (ValueError, UnicodeDecodeError):
        return False
    mac = base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(f"{WEBHOOK_SIGNATURE_VERSION},{mac}", str(sig))


class PromotionService:
    """Checks and records alias events; one worker thread handles them in order, so the answer is immediate."""

    def __init__(self, cl: Any, secret: str, raw_data: str | None, lock: Path | None, aliases: tuple[str, ...]):
        self.cl, self.secret, self.raw_data, self.lock, self.aliases = cl, secret, raw_data, lock, aliases
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.own: dict[tuple[str, str, str], float] = {}  # alias moves this service made: their echo is no event
        self.worker = threading.Thread(target=self._work, name="promotion-check", daemon=True)

    def _work(self) -> None:
        while (event := self.events.get()) is not None:
            try:
                self.handle(event)
            except Exception:  # noqa: BLE001 - one bad event is logged; the service goes on
                log.exception("promotion check of %s failed", event)

    def _holder_before(self, name: str, alias: str, version: str) -> str | None:
        """Who held `alias` before `version`: the audit log's last holder, else the newest `<alias>.promoted_at`."""
        for e in reversed(read_audit()):
            if e.get("model") == name and e.get("alias") == alias and e.get("holder"):
                return str(e["holder"]) if str(e["holder"]) != version else None
        from medclf.release.versions import search_versions

        stamps = [
            ((v.tags or {}).get(f"{alias}.promoted_at", ""), v.version)
            for v in search_versions(self.cl, name)
            if str(v.version) != version
        ]
        stamps = [s for s in stamps if s[0]]
        return str(max(stamps)[1]) if stamps else None

    def handle(self, event: dict[str, Any]) -> dict[str, Any] | None:
        from medclf.release.versions import PREVIOUS_PREFIX, alias_version

        data = event.get("data") or {}
        name, alias, version = str(data.get("name")), str(data.get("alias")), str(data.get("version"))
        if alias not in self.aliases:
            return None
        when, key = now(), (name, alias, version)
        if self.own.pop(key, 0.0) > time.time():
            echo = {"model": name, "version": version, "alias": alias, "via": "service", "holder": version}
            append_audit({"at": when, **echo, "verdict": "revert-echo"})
            return echo
        mv = self.cl.get_model_version(name, version)
        tags = mv.tags or {}
        if cli_echo(tags.get(f"{alias}.audit", "")):
            return {"model": name, "version": version, "verdict": "cli-echo"}  # `medclf promote` recorded it
        before = self._holder_before(name, alias, version)
        prev = alias_version(self.cl, name, PREVIOUS_PREFIX + alias)
        rollback = prev is not None and str(prev.version) == version
        verdict = check(self.cl, name, mv, self.raw_data, self.lock, rollback=rollback)
        via = "ui rollback" if rollback else "ui"
        if verdict.passed:
            self._passed(name, alias, version, before, rollback, when)
            return record(self.cl, name, version, alias, verdict, via, None, when, holder=version, replaced=before)
        if before is not None:
            self.own[(name, alias, before)] = time.time() + 600
            self.cl.set_registered_model_alias(name, alias, before)
            undone = f"`{alias}` was put back on version {before}"
        else:
            self.cl.delete_registered_model_alias(name, alias)
            undone = f"`{alias}` was removed (no version held it before)"
        reasons = "; ".join(verdict.reasons)
        note_failure(self.cl, name, version, f"**Promotion check** ({when}, {via}): failed: {reasons}. {undone}.")
        log.warning("%s v%s refused as %s: %s; %s", name, version, alias, reasons, undone)
        return record(self.cl, name, version, alias, verdict, via, None, when, holder=before, reverted_to=before)

    def _passed(self, name: str, alias: str, version: str, before: str | None, rollback: bool, when: str) -> None:
        """The bookkeeping `registry.promote` / `rollback` do, for a UI change: `previous-<alias>` and the tags."""
        from medclf.release.versions import PREVIOUS_PREFIX

        prev_alias = PREVIOUS_PREFIX + alias
        if rollback:  # as `registry.rollback`: previous-<alias> steps one further back
            older = (self.cl.get_model_version(name, version).tags or {}).get(f"{alias}.previous_version", "")
            if older and older != version:
                self.cl.set_registered_model_alias(name, prev_alias, older)
            else:
                self.cl.delete_registered_model_alias(name, prev_alias)
            self.cl.set_model_version_tag(name, version, f"{alias}.restored_at", when)
            return
        if before is not None:
            self.cl.set_registered_model_alias(name, prev_alias, before)
            self.cl.set_model_version_tag(name, before, f"{alias}.replaced_at", when)
        self.cl.set_model_version_tag(name, version, f"{alias}.promoted_by", "unknown (ui)")
        self.cl.set_model_version_tag(name, version, f"{alias}.promoted_at", when)
        self.cl.set_model_version_tag(name, version, f"{alias}.previous_version", before or "")

    def submit(self, event: dict[str, Any]) -> None:
        self.events.put(event)


def cli_echo(audit_tag: str) -> bool:
    """An `<alias>.audit` tag that `medclf promote` / `rollback` wrote less than `CLI_ECHO_S` ago."""
    stamp, _, rest = audit_tag.partition(" ")
    try:
        then = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return False
    by_cli = " via cli: " in rest or " via cli rollback: " in rest  # not "via cli, refused": nothing moved
    return by_cli and (dt.datetime.now(dt.UTC) - then).total_seconds() < CLI_ECHO_S


def make_server(service: PromotionService, host: str, port: int) -> ThreadingHTTPServer:
    """POST /webhook (signed MLflow deliveries: 401 on a bad signature, 202 once queued), GET /health."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: dict[str, Any]) -> None:
            blob = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer(200 if self.path == "/health" else 404, {"ok": self.path == "/health"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/webhook":
                return self._answer(404, {"error": "not found"})
            body = self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 20))
            if not verify(service.secret, self.headers, body):
                log.warning("refused a webhook delivery with a bad or missing signature from %s", self.client_address)
                return self._answer(401, {"error": "bad signature"})
            try:
                event = json.loads(body)
            except json.JSONDecodeError:
                return self._answer(400, {"error": "not JSON"})
            if isinstance(event, dict) and (event.get("entity"), event.get("action")) == ALIAS_CREATED:
                service.submit(event)
            self._answer(202, {"queued": True})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("%s " + format, self.client_address[0], *args)

    return ThreadingHTTPServer((host, port), Handler)


def ensure_webhook(cl: Any, url: str, secret: str, name: str = WEBHOOK_NAME) -> Any:
    """Create the webhook, or update the one of that name (URL, secret, event, active): idempotent."""
    for hook in cl.list_webhooks(max_results=1000):
        if hook.name == name:
            return cl.update_webhook(hook.webhook_id, url=url, events=[EVENT], secret=secret, status="ACTIVE")
    return cl.create_webhook(name, url, events=[EVENT], description="medclf promotion check and audit", secret=secret)


def run_service(
    cl: Any,
    host: str,
    port: int,
    secret: str,
    raw_data: str | None,
    lock: Path | None,
    aliases: tuple[str, ...] = WATCHED,
    register: bool = True,
    attempts: int = 60,
) -> None:
    """Serve until interrupted; with `register`, (re)register the webhook once the server listens."""
    service = PromotionService(cl, secret, raw_data, lock, aliases)
    server = make_server(service, host, port)
    service.worker.start()
    if register:
        url = f"http://{host}:{server.server_address[1]}/webhook"
        for i in range(attempts):
            try:
                ensure_webhook(cl, url, secret)
                log.info("webhook %s -> %s registered", WEBHOOK_NAME, url)
                break
            except Exception as err:  # noqa: BLE001 - MLflow may still be starting
                if i == attempts - 1:
                    raise
                log.info("webhook not registered yet (%s); retrying", err)
                time.sleep(1)
    log.info("promotion service on http://%s:%s (audit log %s)", host, server.server_address[1], audit_path())
    try:
        server.serve_forever()
    finally:
        service.events.put(None)
        server.server_close()
