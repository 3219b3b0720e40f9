#!/usr/bin/env bash
# The embedded MLflow tracking server: SQLite backend + local artifact store under mlflow/ by default.
#   bash mlflow/server.sh start|stop|status
# Environment: MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1),
#   MLFLOW_ARTIFACTS_DESTINATION (default mlflow/artifacts; s3://bucket/prefix works, with
#   MLFLOW_S3_ENDPOINT_URL for MinIO),
#   MEDCLF_DB=postgres: the backend store is the database `mlflow` of the local PostgreSQL cluster that
#   deploy/postgres.sh creates and starts in .pg/ (docs/ORCHESTRATION.md, "Scaling out"; `stop` leaves the
#   cluster up: deploy/servers.sh stop stops it),
#   MLFLOW_BACKEND_STORE_URI (an explicit URI wins over both, e.g. postgresql+psycopg://user:pw@db-host/mlflow
#   for a shared PostgreSQL server; the password is masked in what this script prints),
#   MLFLOW_AUTH=1 to enable basic auth (mlflow/basic_auth.ini; change the admin password first! Its users
#   database goes to MLFLOW_STORE_DIR/basic_auth.db; needs mlflow[auth], i.e. Flask-WTF; the Flask secret is
#   MLFLOW_FLASK_SERVER_SECRET_KEY, else one kept in MLFLOW_STORE_DIR/flask_secret_key),
#   MLFLOW_STORE_DIR (default mlflow/store: SQLite file, server log and pid file),
#   MEDCLF_AUDIT_PORT (5055): the promotion service (`medclf promotion-service`, docs/PROMOTION.md "Promotion check
#   and audit"), started beside MLflow once it is up: it registers MLflow's `model_version_alias.created` webhook
#   (idempotently, by name) and checks and records every `champion` move, the MLflow UI's included. Its log is
#   MLFLOW_STORE_DIR/audit.log, the audit trail MLFLOW_STORE_DIR/audit/promotions.jsonl (append-only), the webhook's
#   HMAC secret MLFLOW_STORE_DIR/webhook_secret (created once). MEDCLF_AUDIT=0: not started. With MLFLOW_AUTH=1 it
#   needs an admin's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment (else not started).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${MLFLOW_PORT:-5000}"
host="${MLFLOW_HOST:-127.0.0.1}"
store="${MLFLOW_STORE_DIR:-$here/store}"
mkdir -p "$store"
pidfile="$store/server.pid"
db="${MEDCLF_DB:-sqlite}"
case "$db" in sqlite|postgres) ;; *) echo "MEDCLF_DB is sqlite (the default) or postgres, not '$db'" >&2; exit 2 ;; esac
backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$here/artifacts}"
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac
mlflow_bin="$(command -v mlflow || echo "$here/../.venv/bin/mlflow")"
# MLflow's server-side job runner (GenAI scorers, trace roll-ups; needs a database backend) is off unless asked
# for: medclf uses neither, and it costs a runner and several huey consumer processes on every start
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
audit="${MEDCLF_AUDIT:-1}"
aport="${MEDCLF_AUDIT_PORT:-5055}"
apidfile="$store/audit.pid"
root="$(cd "$here/.." && pwd)"
medclf_bin="$(command -v medclf || echo "$root/.venv/bin/medclf")"
py_bin="$root/.venv/bin/python"; [ -x "$py_bin" ] || py_bin="$(command -v python3)"
hex32() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
fernet_key() { "$py_bin" -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'; }
secret_file() {  # a private random value kept in the store, created once: $1 file, $2 the function printing one
  [ -s "$store/$1" ] || (umask 077; "$2" >"$store/$1")
}
if [ "$audit" = "1" ]; then
  # MLflow's webhook delivery refuses private and loopback addresses (SSRF protection, mlflow/webhooks/ssrf.py)
  # and plain http; the promotion service listens on 127.0.0.1 of this host, so this local server allows both
  export MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="${MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS:-true}"
  export MLFLOW_WEBHOOK_ALLOWED_SCHEMES="${MLFLOW_WEBHOOK_ALLOWED_SCHEMES:-http,https}"
  # the key MLflow encrypts webhook secrets with in its database: without a fixed one it draws a new one per
  # start, and after a restart it can no longer read (nor sign with) the secret it stored
  if [ -z "${MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY:-}" ]; then
    secret_file webhook_encryption_key fernet_key
    MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY="$(cat "$store/webhook_encryption_key")"
    export MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY
  fi
fi

up() { curl -fsS "http://$host:$port/health" >/dev/null 2>&1; }
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
masked() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"; }  # a URL's password, never printed
audit_up() { curl -fsS --max-time 5 "http://127.0.0.1:$aport/health" >/dev/null 2>&1; }
# status and "already running" ask a loaded machine: a few tries before calling the service down
audit_answers() { local i; for i in 1 2 3 4 5; do audit_up && return 0; sleep 1; done; return 1; }
audit_ours() { [ -f "$apidfile" ] && ps -ww -o args= -p "$(cat "$apidfile")" 2>/dev/null | grep -q "promotion-service"; }
start_audit() {  # the promotion service, once MLflow answers; a failure is reported, MLflow stays up
  [ "$audit" = "1" ] || return 0
  if audit_ours && audit_answers; then echo "promotion service already running on 127.0.0.1:$aport"; return 0; fi
  if [ "${MLFLOW_AUTH:-0}" = "1" ] && [ -z "${MLFLOW_TRACKING_USERNAME:-}" ]; then
    echo "promotion service NOT started: MLFLOW_AUTH=1 needs an admin's MLFLOW_TRACKING_USERNAME/PASSWORD" >&2
    return 0
  fi
  if audit_up; then echo "promotion service NOT started: port $aport is taken (MEDCLF_AUDIT_PORT)" >&2; return 0; fi
  secret_file webhook_secret hex32
  echo "== $(date -u +%FT%TZ) medclf: starting the promotion service on 127.0.0.1:$aport" >>"$store/audit.log"
  # from the checkout (its params.yaml and dvc.lock: "data still current"), in a session of its own
  # (a simple command put in the background: $! is the service itself, and no shell in between holds our stdout)
  (cd "$root" || exit 1
    MLFLOW_TRACKING_URI="http://$host:$port" setsid nohup "$medclf_bin" --params "$root/params.yaml" \
      promotion-service --host 127.0.0.1 --port "$aport" --secret-file "$store/webhook_secret" \
      --log "$store/audit/promotions.jsonl" </dev/null >>"$store/audit.log" 2>&1 &
    echo $! >"$apidfile")
  for _ in $(seq 1 90); do  # it answers once the webhook is registered
    if audit_up; then echo "promotion service: http://127.0.0.1:$aport (audit $store/audit/promotions.jsonl)"; return 0; fi
    kill -0 "$(cat "$apidfile")" 2>/dev/null || break
    sleep 1
  done
  echo "promotion service did not start; see $store/audit.log" >&2; tail -5 "$store/audit.log" >&2; return 0
}
stop_audit() {
  if audit_ours; then
    apid="$(cat "$apidfile")"
    kill -TERM -- "-$apid" 2>/dev/null || kill -TERM "$apid" 2>/dev/null || true  # its own session (setsid)
    for _ in $(seq 1 20); do kill -0 "$apid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$apid" 2>/dev/null || true
  fi
  rm -f "$apidfile"
}

case "${1:-start}" in
  start)
    if up; then echo "MLflow already running at http://$host:$port"; start_audit; exit 0; fi
    if [ -z "$backend" ]; then
      if [ "$db" = postgres ]; then
        bash "$here/../deploy/postgres.sh" start
        backend="$(bash "$here/../deploy/postgres.sh" url mlflow)"
      else
        backend="sqlite:///$store/mlflow.db"
      fi
    fi
    extra=()
    if [ "${MLFLOW_AUTH:-0}" = "1" ]; then
      # basic_auth.ini's relative sqlite:///mlflow/store/ means "beside the tracking store": rewritten to
      # $store, so the users database follows MLFLOW_STORE_DIR and does not depend on the current directory
      sed "s|^database_uri = sqlite:///mlflow/store/|database_uri = sqlite:///$store/|" \
        "$here/basic_auth.ini" >"$store/basic_auth.ini"
      export MLFLOW_AUTH_CONFIG_PATH="$store/basic_auth.ini"; extra+=(--app-name basic-auth)
      # the auth app refuses to start without a Flask secret (CSRF): one per store, created once, kept private
      if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
        if [ ! -s "$store/flask_secret_key" ]; then
          (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$store/flask_secret_key")
        fi
        MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$store/flask_secret_key")"; export MLFLOW_FLASK_SERVER_SECRET_KEY
      fi
    fi
    # the backend URI through the environment (mlflow's own MLFLOW_BACKEND_STORE_URI), not the command line:
    # a PostgreSQL URI holds a password, and every local user can read `ps`
    # appended, not truncated: a restart keeps the log of the run before it (what a failure needs)
    echo "== $(date -u +%FT%TZ) medclf: starting MLflow on $host:$port" >>"$store/server.log"
    MLFLOW_BACKEND_STORE_URI="$backend" nohup "$mlflow_bin" server --host "$host" --port "$port" --workers 1 \
      --artifacts-destination "$artifacts" "${extra[@]}" \
      >>"$store/server.log" 2>&1 &
    echo $! >"$pidfile"
    masked "$backend" >"$store/server.backend"
    for _ in $(seq 1 300); do
      if up; then echo "MLflow UI: http://$host:$port  (backend $(masked "$backend"))"; start_audit; exit 0; fi
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "MLflow server exited; see $store/server.log" >&2; tail -20 "$store/server.log" >&2; exit 1
      fi
      sleep 1
    done
    echo "MLflow server did not answer on http://$host:$port within 300 s; see $store/server.log" >&2
    exit 1 ;;
  stop)
    stop_audit
    if [ -f "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      # only if that pid is still an MLflow server (not a reused pid): TERM it and wait, since under load it
      # took ~30 s to exit and a restart on the same port must find it gone; then KILL it and what it started
      # (uvicorn, the job runner; listed first, as they are re-parented once it exits). Not a process group of
      # its own: callers that start this script in a session of their own (tests) reach the server through it.
      if ps -ww -o args= -p "$pid" 2>/dev/null | grep -q "mlflow.* server"; then
        kids="$(descendants "$pid")"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        # shellcheck disable=SC2086
        kill -KILL "$pid" $kids 2>/dev/null || true
      fi
      rm -f "$pidfile"
    fi
    pkill -f "mlflow server --host $host --port $port" 2>/dev/null || true
    echo "MLflow stopped" ;;
  status)
    rc=0
    if up; then echo "up: http://$host:$port  (backend $(cat "$store/server.backend" 2>/dev/null || echo '?'))"
    else echo "down"; rc=1; fi
    if [ "$audit" = "1" ]; then  # informational: the exit status is MLflow's
      if audit_ours && audit_answers; then echo "promotion service: up: http://127.0.0.1:$aport"
      else echo "promotion service: down"; fi
    fi
    exit $rc ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
