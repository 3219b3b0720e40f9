#!/usr/bin/env bash
# A local PostgreSQL cluster for the MLflow and Prefect servers: the opt-in `MEDCLF_DB=postgres` of
# deploy/servers.sh and mlflow/server.sh (docs/ORCHESTRATION.md, "Scaling out"). SQLite stays the default.
#   bash deploy/postgres.sh start|stop|status|url mlflow|url prefect
# start: `initdb` once (superuser medclf, a random password, scram-sha-256 for every connection), `pg_ctl start`
#   listening on 127.0.0.1:MEDCLF_PG_PORT only, then the databases `mlflow` and `prefect` (created once).
#   Every step is idempotent: a second start finds the cluster and the databases and keeps them.
# url: the SQLAlchemy URL of one database (password included: for the servers, not for a log).
# Environment: MEDCLF_PG_DIR (default .pg in this checkout, git-ignored: data/, run/ (unix socket),
#   password, postgres.log), MEDCLF_PG_PORT (default 5433, beside a system PostgreSQL's 5432),
#   MEDCLF_PG_OS_USER (only when run as root: PostgreSQL refuses to run as root, so the cluster is created and
#   run as this user through `runuser`; default the owner of an existing cluster, else `postgres` if that user
#   exists, else `nobody`. MEDCLF_PG_DIR's parent folders must let it through).
# Needs initdb and pg_ctl on PATH (Debian: postgresql-15, /usr/lib/postgresql/15/bin) and psycopg (pyproject.toml).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH"
pgdir="${MEDCLF_PG_DIR:-$root/.pg}"
data="$pgdir/data"
sock="$pgdir/run"
pwfile="$pgdir/password"
log="$pgdir/postgres.log"
port="${MEDCLF_PG_PORT:-5433}"
host=127.0.0.1
superuser=medclf
databases=(mlflow prefect)

need_binaries() {
  local b
  for b in initdb pg_ctl; do
    if ! command -v "$b" >/dev/null 2>&1; then
      echo "MEDCLF_DB=postgres: PostgreSQL's \`$b\` is not on PATH. Install PostgreSQL 15 (Debian: apt-get install" \
        "postgresql-15) and put its binaries on PATH (export PATH=/usr/lib/postgresql/15/bin:\$PATH), or set" \
        "MLFLOW_BACKEND_STORE_URI and PREFECT_API_DATABASE_CONNECTION_URL to a PostgreSQL server of your own," \
        "or leave MEDCLF_DB unset for SQLite." >&2
      exit 3
    fi
  done
}

# PostgreSQL refuses to run as root ("cannot be run as root"); CI and these machines run as root.
os_user=""
if [ "$(id -u)" = 0 ]; then
  if [ -n "${MEDCLF_PG_OS_USER:-}" ]; then os_user="$MEDCLF_PG_OS_USER"
  elif [ -d "$data" ] && [ "$(stat -c %u "$data")" != 0 ]; then os_user="$(stat -c %U "$data")"
  elif id -u postgres >/dev/null 2>&1; then os_user=postgres
  else os_user=nobody; fi
fi
# runuser lives in /usr/sbin, which a root PATH may lack; setpriv (util-linux too) where there is no runuser
runuser_bin="$(PATH="$PATH:/usr/sbin:/sbin" command -v runuser || true)"
as_owner() {
  if [ -z "$os_user" ]; then "$@"
  elif [ -n "$runuser_bin" ]; then "$runuser_bin" -u "$os_user" -- "$@"
  else setpriv --reuid="$os_user" --regid="$(id -g "$os_user")" --init-groups -- "$@"; fi
}

running() { [ -s "$data/PG_VERSION" ] && as_owner pg_ctl status -D "$data" >/dev/null 2>&1; }

url() {  # url DRIVER DATABASE
  [ -s "$pwfile" ] || { echo "no PostgreSQL cluster in $pgdir yet: run \`bash deploy/postgres.sh start\`" >&2; exit 1; }
  echo "postgresql+$1://$superuser:$(cat "$pwfile")@$host:$port/$2"
}

case "${1:-start}" in
  start)
    need_binaries
    mkdir -p "$pgdir"
    if [ -n "$os_user" ]; then
      chown "$os_user": "$pgdir"; chmod 700 "$pgdir"
      if ! as_owner test -w "$pgdir"; then
        echo "PostgreSQL cannot run as root, so it runs as '$os_user' (MEDCLF_PG_OS_USER), who cannot reach $pgdir:" \
          "one of its parent folders is closed to that user. Set MEDCLF_PG_DIR to a folder it can reach" \
          "(e.g. under /tmp), or MEDCLF_PG_OS_USER to another user." >&2
        exit 1
      fi
    fi
    if [ ! -s "$data/PG_VERSION" ]; then
      rm -rf "$data.init"
      if [ ! -s "$pwfile" ]; then
        (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$pwfile")
        [ -z "$os_user" ] || chown "$os_user": "$pwfile"
      fi
      # into a side folder, renamed when complete: an interrupted initdb leaves no half cluster behind
      if ! as_owner initdb -D "$data.init" -U "$superuser" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 \
        --no-locale >"$pgdir/initdb.log" 2>&1; then
        echo "initdb failed; see $pgdir/initdb.log" >&2; tail -20 "$pgdir/initdb.log" >&2; exit 1
      fi
      mv "$data.init" "$data"
      echo "PostgreSQL: created the cluster in $data"
    fi
    if running; then
      echo "PostgreSQL already running on $host:$port ($data)"
    else
      as_owner mkdir -p "$sock"
      if ! as_owner pg_ctl start -D "$data" -l "$log" -w -t 120 -o "-h $host -p $port -k '$sock'" >/dev/null; then
        echo "PostgreSQL did not start; see $log" >&2; tail -20 "$log" >&2; exit 1
      fi
      echo "PostgreSQL up on $host:$port ($data)"
    fi
    PGPASSWORD="$(cat "$pwfile")" python - "$host" "$port" "$superuser" "${databases[@]}" <<'PY'
import os, sys
import psycopg
host, port, user, *names = sys.argv[1:]
with psycopg.connect(host=host, port=int(port), user=user, password=os.environ["PGPASSWORD"], dbname="postgres",
                     autocommit=True) as conn:
    for name in names:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
            print(f"PostgreSQL: created database {name}")
PY
    ;;
  stop)
    [ -d "$data" ] || exit 0  # no cluster here, nothing to say
    if running; then
      as_owner pg_ctl stop -D "$data" -m fast -w -t 60 >/dev/null || as_owner pg_ctl stop -D "$data" -m immediate -w >/dev/null
      echo "PostgreSQL stopped"
    else
      echo "PostgreSQL not running"
    fi ;;
  status)
    if running; then echo "up: $host:$port ($data)"; else echo "down"; exit 1; fi ;;
  url)
    case "${2:-}" in
      mlflow) url psycopg mlflow ;;
      prefect) url asyncpg prefect ;;
      *) echo "usage: $0 url mlflow|prefect" >&2; exit 2 ;;
    esac ;;
  *) echo "usage: $0 start|stop|status|url mlflow|prefect" >&2; exit 2 ;;
esac
