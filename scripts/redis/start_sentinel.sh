#!/usr/bin/env bash
# Starts a private, daemonized Redis Sentinel on 127.0.0.1:PORT monitoring MASTER_HOST:MASTER_PORT under
# MASTER_NAME, with its config (which the sentinel rewrites as it learns), pid file and log in BASE, a fresh temp
# dir printed on the last line. Stop it with stop.sh BASE (like a server). Ready in ~20 ms: wait_ready.sh PORT.
# Usage: scripts/redis/start_sentinel.sh PORT MASTER_NAME MASTER_HOST MASTER_PORT QUORUM
# Env:   REDIS_SENTINEL_DOWN_AFTER_MS      silence before the primary is deemed down (default 1000; Redis: 30000)
#        REDIS_SENTINEL_FAILOVER_TIMEOUT_MS bound on one failover and pause between two (default 10000; Redis: 180000)
set -euo pipefail

usage="usage: start_sentinel.sh PORT MASTER_NAME MASTER_HOST MASTER_PORT QUORUM"
PORT=${1:?$usage} NAME=${2:?$usage} MASTER_HOST=${3:?$usage} MASTER_PORT=${4:?$usage} QUORUM=${5:?$usage}
die() { echo "redis/start_sentinel: $*" >&2; exit 1; }
command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"

BASE=$(mktemp -d "${TMPDIR:-/tmp}/redis-sentinel.XXXXXX")
touch "$BASE/.xo-csi-redis"   # stop.sh refuses to rm -rf a dir without this marker
echo "PORT=$PORT" >"$BASE/ports"
cat >"$BASE/sentinel.conf" <<CONF
port $PORT
bind 127.0.0.1
daemonize yes
pidfile $BASE/redis.pid
logfile $BASE/redis.log
dir $BASE
sentinel monitor $NAME $MASTER_HOST $MASTER_PORT $QUORUM
sentinel down-after-milliseconds $NAME ${REDIS_SENTINEL_DOWN_AFTER_MS:-1000}
sentinel failover-timeout $NAME ${REDIS_SENTINEL_FAILOVER_TIMEOUT_MS:-10000}
CONF
redis-server "$BASE/sentinel.conf" --sentinel </dev/null >>"$BASE/launch.log" 2>&1 \
  || die "launch failed: $(tail -5 "$BASE/launch.log")"
echo "$BASE"
