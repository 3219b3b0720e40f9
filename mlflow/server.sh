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
#   MLFLOW_STORE_DIR (default mlflow/store: SQLite file, server log and pid file).
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

up() { curl -fsS "http://$host:$port/health" >/dev/null 2>&1; }
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done; }
masked() { sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"; }  # a URL's password, never printed

case "${1:-start}" in
  start)
    if up; then echo "MLflow already running at http://$host:$port"; exit 0; fi
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
      if up; then echo "MLflow UI: http://$host:$port  (backend $(masked "$backend"))"; exit 0; fi
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "MLflow server exited; see $store/server.log" >&2; tail -20 "$store/server.log" >&2; exit 1
      fi
      sleep 1
    done
    echo "MLflow server did not answer on http://$host:$port within 300 s; see $store/server.log" >&2
    exit 1 ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      # only if that pid is still an MLflow server (not a reused pid): TERM it and wait, since under load it
      # took ~30 s to exit and a restart on the same port must find it gone; then KILL it and what it started
      # (uvicorn, the job runner; listed first, as they are re-parented once it exits). Not a process group of
      # its own: callers that start this script in a session of their own (tests) reach the server through it.
      if ps -o args= -p "$pid" 2>/dev/null | grep -q "mlflow.* server"; then
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
    if up; then echo "up: http://$host:$port  (backend $(cat "$store/server.backend" 2>/dev/null || echo '?'))"
    else echo "down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
