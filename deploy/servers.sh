#!/usr/bin/env bash
# The local servers of the embedded default, both at once: MLflow (SQLite under mlflow/, see
# mlflow/server.sh) and a Prefect API + UI whose database lives in .prefect/ (git-ignored).
#   bash deploy/servers.sh start|stop|status|prefect-url        (or: make servers / make stop-servers)
# Environment: PREFECT_PORT (4200), PREFECT_HOME (default .prefect in this checkout), and
# mlflow/server.sh's MLFLOW_PORT, MLFLOW_STORE_DIR, MLFLOW_AUTH=1, ...
# `make retrain` uses this Prefect server when it is up (flow runs stay visible in the UI), and
# Prefect's ephemeral API otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH"
export PREFECT_HOME="${PREFECT_HOME:-$root/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
host=127.0.0.1
port="${PREFECT_PORT:-4200}"
api="http://$host:$port/api"
log="$PREFECT_HOME/server.log"
# the UI's own API address: without it the UI calls :4200 whatever PREFECT_PORT says ("Can't connect to Server API")
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-$api}"

prefect_up() { curl -fsS "$api/health" >/dev/null 2>&1; }

case "${1:-start}" in
  start)
    bash "$root/mlflow/server.sh" start
    if prefect_up; then
      echo "Prefect already running at http://$host:$port"
    else
      mkdir -p "$PREFECT_HOME"
      # not `prefect server start --background`: that keeps no log we could show when it fails
      setsid nohup prefect server start --host "$host" --port "$port" >"$log" 2>&1 &
      echo $! >"$PREFECT_HOME/server.pid"
      for _ in $(seq 1 240); do
        prefect_up && break
        if ! kill -0 "$(cat "$PREFECT_HOME/server.pid")" 2>/dev/null; then
          echo "Prefect server exited; see $log" >&2; tail -20 "$log" >&2; exit 1
        fi
        sleep 1
      done
      prefect_up || { echo "Prefect server did not answer on $api within 240 s; see $log" >&2; exit 1; }
    fi
    echo "Prefect UI: http://$host:$port  (PREFECT_API_URL=$api; make retrain uses it while it is up)" ;;
  stop)
    if [ -f "$PREFECT_HOME/server.pid" ]; then
      pid="$(cat "$PREFECT_HOME/server.pid")"
      kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true  # its own process group (setsid)
      rm -f "$PREFECT_HOME/server.pid"
    fi
    echo "Prefect stopped"
    bash "$root/mlflow/server.sh" stop ;;
  status)
    rc=0
    bash "$root/mlflow/server.sh" status | sed 's/^/MLflow: /' || rc=1
    if prefect_up; then echo "Prefect: up: http://$host:$port"; else echo "Prefect: down"; rc=1; fi
    exit $rc ;;
  prefect-url)
    if prefect_up; then echo "$api"; fi ;;
  *) echo "usage: $0 start|stop|status|prefect-url" >&2; exit 2 ;;
esac
