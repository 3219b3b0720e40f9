"""The promotion check and audit (issue 27, point 2) against a real MLflow server and its real webhooks.

A UI-style alias change (the REST call the MLflow alias dialog makes) reaches the promotion service through MLflow's
`model_version_alias.created` webhook: a passing version gets its audit tag and one audit-log line, a failing one
is put back (or the alias removed) and marked. `medclf promote` goes through the same check.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import start_mlflow_server

pytestmark = pytest.mark.slow

SECRET = "test-secret-" + os.urandom(4).hex()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """MLflow (SQLite, webhooks to loopback allowed) + the promotion service in a thread; the audit log's path."""
    from mlflow import MlflowClient

    from medclf.release import promotion

    work = tmp_path_factory.mktemp("promo")
    audit = work / "audit" / "promotions.jsonl"
    old = os.environ.get(promotion.AUDIT_ENV)
    os.environ[promotion.AUDIT_ENV] = str(audit)
    env = {
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
    }
    lock = work / "dvc.lock"
    with start_mlflow_server(work, env=env) as uri:
        cl = MlflowClient(tracking_uri=uri, registry_uri=uri)
        service = promotion.PromotionService(cl, SECRET, str(work / "data/raw"), lock, promotion.WATCHED)
        server = promotion.make_server(service, "127.0.0.1", 0)
        service.worker.start()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        hook_url = f"http://127.0.0.1:{server.server_address[1]}/webhook"
        promotion.ensure_webhook(cl, hook_url, SECRET)
        promotion.ensure_webhook(cl, hook_url, SECRET)  # idempotent: updated, not duplicated
        try:
            yield {"uri": uri, "cl": cl, "audit": audit, "hook": hook_url, "work": work, "lock": lock}
        finally:
            server.shutdown()
            service.events.put(None)
            if old is None:
                os.environ.pop(promotion.AUDIT_ENV, None)
            else:
                os.environ[promotion.AUDIT_ENV] = old


def _version(cl, name: str, **tags: str) -> str:
    """A READY version of `name` (created with the model when needed) with these tags; no training."""
    from mlflow.exceptions import MlflowException

    from medclf.release.versions import wait_ready

    with contextlib.suppress(MlflowException):
        cl.create_registered_model(name)
    exp = cl.get_experiment_by_name("promo") or cl.get_experiment(cl.create_experiment("promo"))
    run = cl.create_run(exp.experiment_id)
    cl.set_terminated(run.info.run_id)
    mv = cl.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags=tags, description="D")
    wait_ready(cl, name, mv.version)
    return str(mv.version)


def _ui_set_alias(uri: str, name: str, alias: str, version: str) -> None:
    """What the MLflow UI's alias dialog sends."""
    body = json.dumps({"name": name, "alias": alias, "version": version}).encode()
    req = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/registered-models/alias", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _lines(audit: Path, name: str) -> list[dict]:
    if not audit.exists():
        return []
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r.get("model") == name]


def _wait(pred, timeout: float = 15.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("not within the time limit")


def _holder(cl, name: str, alias: str = "champion") -> str | None:
    from medclf.release.versions import alias_version

    mv = alias_version(cl, name, alias)
    return None if mv is None else str(mv.version)


def test_ui_alias_on_passing_version_is_audited_within_seconds(stack):
    cl, name = stack["cl"], "ui-pass"
    v1 = _version(cl, name, gates="passed")
    t0 = time.time()
    _ui_set_alias(stack["uri"], name, "champion", v1)
    tags = _wait(lambda: (t := cl.get_model_version(name, v1).tags).get("champion.audit") and t)
    assert time.time() - t0 < 10
    assert tags["promotion.check"] == "passed"
    assert " by unknown via ui: passed" in tags["champion.audit"]
    (line,) = _wait(lambda: _lines(stack["audit"], name))
    assert line["version"] == v1 and line["alias"] == "champion" and line["verdict"] == "passed" and line["at"]
    assert {c["item"] for c in line["checks"]} == {"gates", "data", "blocked"}
    assert _holder(cl, name) == v1  # left where the UI put it
    # a second UI promotion: the first becomes previous-champion, as `medclf promote` does
    v2 = _version(cl, name, gates="passed")
    _ui_set_alias(stack["uri"], name, "champion", v2)
    _wait(lambda: len(_lines(stack["audit"], name)) == 2)
    assert _holder(cl, name, "previous-champion") == v1 and _holder(cl, name) == v2
    assert cl.get_model_version(name, v2).tags["champion.previous_version"] == v1


def test_ui_alias_on_failing_version_is_reverted_and_marked(stack):
    cl, name = stack["cl"], "ui-fail"
    v1 = _version(cl, name, gates="passed")
    _ui_set_alias(stack["uri"], name, "champion", v1)
    _wait(lambda: _lines(stack["audit"], name))
    bad = _version(cl, name, gates="failed")
    _ui_set_alias(stack["uri"], name, "champion", bad)
    _wait(lambda: cl.get_model_version(name, bad).tags.get("promotion.check"))
    mv = cl.get_model_version(name, bad)
    assert mv.tags["promotion.check"].startswith("failed: gates: gates tag is 'failed'")
    assert mv.description.startswith("D\n\n**Promotion check**") and "put back on version " + v1 in mv.description
    _wait(lambda: _holder(cl, name) == v1)  # reverted to the version that held it
    # the revert's own alias event is recognised, not checked again (no loop): its echo line, then quiet
    _wait(lambda: [r for r in _lines(stack["audit"], name) if r["verdict"] == "revert-echo"])
    time.sleep(2)
    verdicts = [r["verdict"] for r in _lines(stack["audit"], name)]
    assert verdicts == ["passed", "failed", "revert-echo"], verdicts
    assert _holder(cl, name) == v1


def test_ui_alias_with_no_previous_holder_is_removed(stack):
    cl, name = stack["cl"], "ui-first-bad"
    bad = _version(cl, name, gates="passed", **{"medclf.blocked": "missed the paediatric subgroup"})
    _ui_set_alias(stack["uri"], name, "champion", bad)
    _wait(lambda: _lines(stack["audit"], name))
    assert _holder(cl, name) is None
    tags = cl.get_model_version(name, bad).tags
    assert "blocked: v1 is blocked (missed the paediatric subgroup)" in tags["promotion.check"]
    assert "was removed" in cl.get_model_version(name, bad).description


def test_data_no_longer_current_fails_the_check(stack):
    from medclf.release import promotion

    cl, name, lock = stack["cl"], "data-check", stack["lock"]
    v = _version(cl, name, gates="passed", raw_data_md5="aaa.dir")
    mv = cl.get_model_version(name, v)
    raw = str(stack["work"] / "data/raw")
    assert dict((i, s) for i, s, _ in promotion.check(cl, name, mv, raw, lock).items)["data"] == "unknown"
    lock.write_text(f"schema: '2.0'\nstages:\n  ingest:\n    deps:\n    - path: {raw}\n      md5: bbb.dir\n")
    try:
        verdict = promotion.check(cl, name, mv, raw, lock)
        assert not verdict.passed and "trained on raw data md5 aaa.dir, dvc.lock now has bbb.dir" in verdict.word()
        assert promotion.check(cl, name, mv, raw, lock, rollback=True).passed  # not asked of a rollback
        lock.write_text(lock.read_text().replace("bbb.dir", "aaa.dir"))
        assert promotion.check(cl, name, mv, raw, lock).passed
    finally:
        lock.unlink()


def test_blocked_floor_refuses_older_versions_only(stack):
    from medclf.release import promotion

    cl, name = stack["cl"], "floor"
    v1, v2, v3 = (_version(cl, name, gates="passed") for _ in range(3))
    promotion.block(cl, name, v2, "trained on mislabeled data", floor=False, who="tester")
    assert promotion.check(cl, name, cl.get_model_version(name, v1), None, None).passed  # a plain block: v2 only
    assert not promotion.check(cl, name, cl.get_model_version(name, v2), None, None).passed
    promotion.block(cl, name, v2, "labels fixed after v2", floor=True, who="tester")
    verdict = promotion.check(cl, name, cl.get_model_version(name, v1), None, None, rollback=True)
    assert verdict.reasons == ["blocked: past blocked floor v2 (labels fixed after v2)"]
    assert promotion.check(cl, name, cl.get_model_version(name, v3), None, None).passed
    assert [r["verdict"] for r in _lines(stack["audit"], name)] == ["blocked", "blocked"]


def test_bad_signature_is_refused_and_not_audited(stack):
    cl, name = stack["cl"], "forged"
    v = _version(cl, name, gates="failed")
    body = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "data": {"name": name, "alias": "champion", "version": v},
        }
    ).encode()
    for headers in (
        {},
        {"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Delivery-Id": "x", "X-MLflow-Timestamp": str(int(time.time()))},
    ):
        req = urllib.request.Request(stack["hook"], body, {"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 401
    time.sleep(1)
    assert _lines(stack["audit"], name) == [] and "promotion.check" not in cl.get_model_version(name, v).tags


def test_verify_accepts_mlflow_signature_only_fresh():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    from medclf.release.promotion import verify

    stamp, payload = str(int(time.time())), '{"a": 1}'
    sig = _generate_hmac_signature("s3cret", "d-1", stamp, payload)
    headers = {"X-MLflow-Signature": sig, "X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": stamp}
    assert verify("s3cret", headers, payload.encode())
    assert not verify("other", headers, payload.encode())
    assert not verify("s3cret", headers, b'{"a": 2}')
    assert not verify("s3cret", headers, payload.encode(), at=time.time() + 3600)  # a replay, an hour later


def test_promote_refuses_a_failing_version_and_force_is_audited(stack, make_settings):
    from medclf.release import registry

    cl, name = stack["cl"], "cli-promote"
    settings = make_settings({"mlflow": {"tracking_uri": stack["uri"]}, "register": {"model_name": name}})
    good, bad = _version(cl, name, gates="passed"), _version(cl, name, gates="failed")
    assert registry.promote(settings, int(good), by="alice")["check"] == "passed"
    with pytest.raises(registry.RegistryError, match=r"fails the promotion check \(gates: gates tag is 'failed'\)"):
        registry.promote(settings, int(bad), by="bob")
    assert _holder(cl, name) == good
    out = registry.promote(settings, int(bad), by="bob", force=True)
    assert out["changed"] and out["check"].endswith("(forced)") and _holder(cl, name) == bad
    tags = cl.get_model_version(name, bad).tags
    assert tags["champion.audit"].endswith("by bob via cli: failed: gates: gates tag is 'failed' (forced)")
    time.sleep(3)  # the webhook of each CLI move reaches the service too: recognised, not reverted
    assert _holder(cl, name) == bad
    assert [(r["user"], r["via"], r["verdict"]) for r in _lines(stack["audit"], name)] == [
        ("alice", "cli", "passed"),
        ("bob", "cli, refused", "failed"),
        ("bob", "cli", "forced"),
    ]
    # a rollback to the good version passes its check; rolling back onto a blocked version is refused
    assert registry.rollback(settings, by="carol")["version"] == int(good)


def test_server_sh_starts_the_service_and_a_ui_change_is_checked_then_stop_leaves_nothing(tmp_path):
    """`mlflow/server.sh start` (what `make servers` runs): MLflow + the promotion service + the webhook; a UI
    promotion of a failing version is reverted within seconds; `stop` stops both."""
    import socket
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.conftest import ROOT, free_port

    port, aport, store = free_port(), free_port(), tmp_path / "store"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MEDCLF_AUDIT"))},
        "MLFLOW_PORT": str(port),
        "MEDCLF_AUDIT_PORT": str(aport),
        "MLFLOW_STORE_DIR": str(store),
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    script = [str(ROOT / "mlflow/server.sh")]

    def sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", *script, cmd], env=env, capture_output=True, text=True, timeout=400)

    try:
        out = sh("start")
        assert out.returncode == 0 and f"promotion service: http://127.0.0.1:{aport}" in out.stdout, out
        assert sh("start").returncode == 0  # again: both already running, the webhook not duplicated
        uri = f"http://127.0.0.1:{port}"
        cl = MlflowClient(tracking_uri=uri, registry_uri=uri)
        assert [h.name for h in cl.list_webhooks()] == ["medclf-promotion-audit"]
        assert (store / "webhook_secret").stat().st_mode & 0o077 == 0
        status = sh("status").stdout
        log = (store / "audit.log").read_text() if (store / "audit.log").exists() else "(no audit.log)"
        assert "promotion service: up" in status, f"{status}\n{log[-3000:]}"
        good, bad = _version(cl, "e2e", gates="passed"), _version(cl, "e2e", gates="not passed")
        _ui_set_alias(uri, "e2e", "champion", good)
        audit = store / "audit" / "promotions.jsonl"
        _wait(lambda: _lines(audit, "e2e"))
        _ui_set_alias(uri, "e2e", "champion", bad)
        _wait(lambda: cl.get_model_version("e2e", bad).tags.get("promotion.check", "").startswith("failed"))
        _wait(lambda: _holder(cl, "e2e") == good)
        pid = int((store / "audit.pid").read_text())
    finally:
        stopped = sh("stop")
    assert stopped.returncode == 0, stopped
    assert not Path(f"/proc/{pid}").exists() and not (store / "audit.pid").exists()
    for p in (port, aport):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0
