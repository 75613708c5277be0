#!/usr/bin/env bash
# Starts a private, daemonized redis-server on 127.0.0.1:PORT, without persistence (--save ''), with its
# pid file, log and dump in BASE, a fresh temp dir printed on the last line. Ready in ~20 ms: wait_ready.sh.
# Usage: scripts/redis/start.sh [PORT=6379]
# Env:   REDIS_BASE        reuse this dir (stopped with `stop.sh BASE keep`): the dump.rdb saved there is loaded
#        REDIS_REPLICA_OF  "HOST PORT": start as a replica of that server
set -euo pipefail

PORT=${1:-6379}
die() { echo "redis/start: $*" >&2; exit 1; }
command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"

if [[ -n ${REDIS_BASE:-} ]]; then
  BASE=$REDIS_BASE
  [[ -f $BASE/.xo-csi-redis ]] || die "$BASE was not made by start.sh"
else
  BASE=$(mktemp -d "${TMPDIR:-/tmp}/redis.XXXXXX")
  touch "$BASE/.xo-csi-redis"   # stop.sh refuses to rm -rf a dir without this marker
fi
echo "PORT=$PORT" >"$BASE/ports"

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --pidfile "$BASE/redis.pid" --logfile "$BASE/redis.log" --dir "$BASE" ${REDIS_REPLICA_OF:+--replicaof $REDIS_REPLICA_OF} \
  </dev/null >>"$BASE/launch.log" 2>&1 || die "launch failed: $(tail -5 "$BASE/launch.log")"
echo "$BASE"
