#!/usr/bin/env bash
# Makes sure the services the test suite talks to are up on this machine:
#   PostgreSQL on 127.0.0.1:5432, trust auth, roles postgres and root, databases test and root;
#   Redis on 127.0.0.1:6379, keeping nothing on disk;
#   NATS (with JetStream) on 127.0.0.1:4222, for the access-log NATS sink.
# Starts what is down, installs what is missing from Debian's packages (as root), and waits
# until each answers. Prints nothing when everything already runs; exits non-zero with a
# message naming the service when one cannot be brought up.
# Usage: scripts/services.sh        (scripts/test.sh runs it first)
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
NATS_HOST=127.0.0.1
NATS_PORT=4222
WAIT_SECONDS=${SERVICES_WAIT_SECONDS:-60}

say() { printf 'services: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# wait_for WHAT COMMAND...: polls COMMAND until it succeeds, for at most WAIT_SECONDS.
wait_for() {
  local what=$1 tries=$((WAIT_SECONDS * 5))
  shift
  while ((tries-- > 0)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what is not ready after ${WAIT_SECONDS}s"
}

apt_updated=
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: apt-get not found"
  [ "$(id -u)" = 0 ] || die "cannot install $*: run as root (or install them yourself)"
  say "installing $* from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$apt_updated" ]; then
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
}

# ---- PostgreSQL -------------------------------------------------------------------------------

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }
pg_sql() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atqc "$1"; }
pg_version() { find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1; }

# Tests connect over TCP as postgres or root without a password. A cluster created by a
# package install asks for one (scram) on 127.0.0.1; turn on trust for loopback only.
pg_trust_loopback() {
  local hba=$1
  say "allowing passwordless (trust) connections from loopback in $hba"
  local tmp
  tmp=$(mktemp)
  {
    echo '# Added by scripts/services.sh: test databases on loopback, no passwords.'
    echo 'local all all trust'
    echo 'host all all 127.0.0.1/32 trust'
    echo 'host all all ::1/128 trust'
    cat "$hba"
  } >"$tmp"
  cat "$tmp" >"$hba"
  rm -f "$tmp"
}

ensure_postgres() {
  if ! pg_ready; then
    if ! command -v pg_ctlcluster >/dev/null || [ -z "$(pg_version)" ] || ! command -v psql >/dev/null; then
      apt_install postgresql postgresql-client
    fi
    local version
    version=$(pg_version)
    [ -n "$version" ] || die "PostgreSQL: no server found under /usr/lib/postgresql after install"
    if [ ! -d "/etc/postgresql/$version/main" ]; then
      say "creating PostgreSQL $version cluster 'main' on port $PG_PORT"
      pg_createcluster --port "$PG_PORT" "$version" main >/dev/null || die "PostgreSQL: pg_createcluster failed"
    fi
    # status exits 3 when stopped; "rejecting connections" while starting up needs only a wait.
    if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then
      say "starting PostgreSQL $version/main"
      pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
        die "PostgreSQL: pg_ctlcluster start failed (see /var/log/postgresql/)"
    fi
    wait_for "PostgreSQL on $PG_HOST:$PG_PORT" pg_ready
  fi

  if ! pg_sql 'select 1' >/dev/null 2>&1; then
    local version hba
    version=$(pg_version)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    [ -w "$hba" ] || die "PostgreSQL: cannot connect as postgres on $PG_HOST:$PG_PORT without a password, and $hba is not writable"
    pg_trust_loopback "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload || die "PostgreSQL: reload failed"
    wait_for "PostgreSQL trust authentication" pg_sql 'select 1'
  fi

  if [ "$(pg_sql "select count(*) from pg_roles where rolname = 'root'")" != 1 ]; then
    say "creating PostgreSQL role root"
    pg_sql 'create role root superuser login' >/dev/null || die "PostgreSQL: cannot create role root"
  fi
  local db
  for db in test root; do
    if [ "$(pg_sql "select count(*) from pg_database where datname = '$db'")" != 1 ]; then
      say "creating PostgreSQL database $db"
      pg_sql "create database $db" >/dev/null || die "PostgreSQL: cannot create database $db"
    fi
  done
}

# ---- Redis ------------------------------------------------------------------------------------

redis_ready() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

ensure_redis() {
  if command -v redis-cli >/dev/null && redis_ready; then return 0; fi
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server
  fi
  if redis_ready; then return 0; fi # the package's own service may have started it
  say "starting Redis on $REDIS_HOST:$REDIS_PORT"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind "$REDIS_HOST" -::1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log ||
    die "Redis: redis-server failed to start (see /var/log/redis/ci.log)"
  wait_for "Redis on $REDIS_HOST:$REDIS_PORT" redis_ready
}

# ---- NATS -------------------------------------------------------------------------------------

# A NATS server greets every client with an `INFO {...}` line.
nats_ready() { timeout 2 bash -c "exec 3<>/dev/tcp/$NATS_HOST/$NATS_PORT && head -c 4 <&3" 2>/dev/null | grep -q INFO; }

ensure_nats() {
  if nats_ready; then return 0; fi
  if ! command -v nats-server >/dev/null; then
    apt_install nats-server
  fi
  if nats_ready; then return 0; fi # the package's own service may have started it
  say "starting NATS on $NATS_HOST:$NATS_PORT"
  mkdir -p /var/lib/nats-server
  setsid nohup nats-server -a "$NATS_HOST" -p "$NATS_PORT" -js -sd /var/lib/nats-server \
    -l /var/log/nats-server.log >/dev/null 2>&1 </dev/null &
  wait_for "NATS on $NATS_HOST:$NATS_PORT" nats_ready
}

ensure_postgres
ensure_redis
ensure_nats
