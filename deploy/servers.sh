#!/usr/bin/env bash
# The local servers of the embedded default, both at once: MLflow (SQLite under mlflow/, see
# mlflow/server.sh) and a Prefect API + UI whose database lives in .prefect/ (git-ignored).
#   bash deploy/servers.sh start|stop|status|prefect-url        (or: make servers / make stop-servers)
# MEDCLF_DB=postgres (opt in; SQLite stays the default): both servers keep their data in a local PostgreSQL
#   cluster that deploy/postgres.sh creates once in .pg/ (git-ignored) and starts on 127.0.0.1:5433, one
#   database each (mlflow, prefect); `stop` stops it too. An explicit MLFLOW_BACKEND_STORE_URI or
#   PREFECT_API_DATABASE_CONNECTION_URL (e.g. a shared PostgreSQL server) wins over the local cluster; the
#   connection URLs come from the environment only, never from params.yaml. docs/ORCHESTRATION.md, "Scaling out".
# Environment: PREFECT_PORT (4200), PREFECT_HOME (default .prefect in this checkout), MEDCLF_DB and
# deploy/postgres.sh's MEDCLF_PG_DIR, MEDCLF_PG_PORT, MEDCLF_PG_OS_USER, and
# mlflow/server.sh's MLFLOW_PORT, MLFLOW_STORE_DIR, MLFLOW_AUTH=1, MEDCLF_AUDIT_PORT, MEDCLF_AUDIT=0, ...
# mlflow/server.sh also starts and stops the promotion service beside MLflow (the check and audit of every
# `champion` move, the MLflow UI's included: docs/PROMOTION.md); `status` shows it on an "MLflow:" line.
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
db="${MEDCLF_DB:-sqlite}"
case "$db" in sqlite|postgres) ;; *) echo "MEDCLF_DB is sqlite (the default) or postgres, not '$db'" >&2; exit 2 ;; esac
pg() { bash "$root/deploy/postgres.sh" "$@"; }
# Prefect reads either name; an explicit one (a PostgreSQL server of your own) wins over the local cluster
prefect_db_url="${PREFECT_SERVER_DATABASE_CONNECTION_URL:-${PREFECT_API_DATABASE_CONNECTION_URL:-}}"

prefect_up() { curl -fsS "$api/health" >/dev/null 2>&1; }
# the local cluster serves whichever of the two databases was not given explicitly
needs_cluster() { [ "$db" = postgres ] && { [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ] || [ -z "$prefect_db_url" ]; }; }

case "${1:-start}" in
  start)
    if needs_cluster; then
      pg start
      [ -n "${MLFLOW_BACKEND_STORE_URI:-}" ] || { MLFLOW_BACKEND_STORE_URI="$(pg url mlflow)"; export MLFLOW_BACKEND_STORE_URI; }
      [ -n "$prefect_db_url" ] || prefect_db_url="$(pg url prefect)"
    fi
    # Prefect is launched first and MLflow started while it boots: the two start up side by side
    prefect_started=""
    if prefect_up; then
      echo "Prefect already running at http://$host:$port"
    else
      mkdir -p "$PREFECT_HOME"
      (
        if [ -n "$prefect_db_url" ]; then export PREFECT_API_DATABASE_CONNECTION_URL="$prefect_db_url"
          unset PREFECT_SERVER_DATABASE_CONNECTION_URL; fi
        # not `prefect server start --background`: that keeps no log we could show when it fails
        setsid nohup prefect server start --host "$host" --port "$port" >"$log" 2>&1 &
        echo $! >"$PREFECT_HOME/server.pid"
      )
      prefect_started=1
      sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#' <<<"${prefect_db_url:-sqlite (PREFECT_HOME)}" >"$PREFECT_HOME/server.backend"
    fi
    if ! bash "$root/mlflow/server.sh" start; then
      [ -z "$prefect_started" ] || kill -- "-$(cat "$PREFECT_HOME/server.pid")" 2>/dev/null || true
      exit 1
    fi
    if [ -n "$prefect_started" ]; then
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
      if ps -ww -o args= -p "$pid" 2>/dev/null | grep -q "prefect.* server"; then  # not a reused pid
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true  # its own process group (setsid)
        # wait for it (a restart on the same port must find it gone), then KILL what is left of the group
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
      fi
      rm -f "$PREFECT_HOME/server.pid"
    fi
    echo "Prefect stopped"
    bash "$root/mlflow/server.sh" stop
    pg stop ;;  # whatever MEDCLF_DB says now: a cluster left running is stopped
  status)
    rc=0
    bash "$root/mlflow/server.sh" status | sed 's/^/MLflow: /' || rc=1
    if prefect_up; then
      echo "Prefect: up: http://$host:$port  (database $(cat "$PREFECT_HOME/server.backend" 2>/dev/null || echo '?'))"
    else echo "Prefect: down"; rc=1; fi
    if [ "$db" = postgres ] || [ -d "${MEDCLF_PG_DIR:-$root/.pg}/data" ]; then
      pg status | sed 's/^/PostgreSQL: /' || { ! needs_cluster || rc=1; }
    fi
    exit $rc ;;
  prefect-url)
    if prefect_up; then echo "$api"; fi ;;
  *) echo "usage: $0 start|stop|status|prefect-url" >&2; exit 2 ;;
esac
