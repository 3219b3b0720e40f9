#!/usr/bin/env bash
# The embedded MLflow tracking server: SQLite backend + local artifact store under mlflow/.
#   bash mlflow/server.sh start|stop|status
# Environment: MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1),
#   MLFLOW_ARTIFACTS_DESTINATION (default mlflow/artifacts; s3://bucket/prefix works, with
#   MLFLOW_S3_ENDPOINT_URL for MinIO), MLFLOW_BACKEND_STORE_URI (default sqlite; postgresql://... scales out),
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
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$store/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$here/artifacts}"
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac
mlflow_bin="$(command -v mlflow || echo "$here/../.venv/bin/mlflow")"

up() { curl -fsS "http://$host:$port/health" >/dev/null 2>&1; }

case "${1:-start}" in
  start)
    if up; then echo "MLflow already running at http://$host:$port"; exit 0; fi
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
    nohup "$mlflow_bin" server --host "$host" --port "$port" --workers 1 \
      --backend-store-uri "$backend" --artifacts-destination "$artifacts" "${extra[@]}" \
      >"$store/server.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 300); do
      if up; then echo "MLflow UI: http://$host:$port  (backend $backend)"; exit 0; fi
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "MLflow server exited; see $store/server.log" >&2; tail -20 "$store/server.log" >&2; exit 1
      fi
      sleep 1
    done
    echo "MLflow server did not answer on http://$host:$port within 300 s; see $store/server.log" >&2
    exit 1 ;;
  stop)
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
    pkill -f "mlflow server --host $host --port $port" 2>/dev/null || true
    echo "MLflow stopped" ;;
  status)
    if up; then echo "up: http://$host:$port"; else echo "down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
