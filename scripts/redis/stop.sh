#!/usr/bin/env bash
# Stops a redis-server made by start.sh, then removes BASE. Idempotent: a server already gone is not an error.
# Usage: scripts/redis/stop.sh BASE [kill] [keep]
#   kill  SIGKILL by PID (a crash: unsaved data is lost) instead of SHUTDOWN
#   keep  SHUTDOWN SAVE (dump.rdb in BASE) and keep BASE, for `REDIS_BASE=BASE start.sh PORT`
set -euo pipefail

BASE=${1:?usage: stop.sh BASE [kill] [keep]}
shift
kill=0 keep=0
for arg in "$@"; do
  case $arg in
    kill) kill=1 ;;
    keep) keep=1 ;;
    *) echo "redis/stop: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[[ -d $BASE ]] || exit 0
[[ -f $BASE/.xo-csi-redis ]] || { echo "redis/stop: $BASE was not made by start.sh; not touching it" >&2; exit 1; }
source "$BASE/ports"

alive() { [[ -e /proc/$1 ]] && ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status"; }
pid=$(cat "$BASE/redis.pid" 2>/dev/null || true)

if [[ -n $pid ]] && alive "$pid"; then
  mode=nosave
  ((keep)) && mode=save
  if ((kill)) || ! redis-cli -h 127.0.0.1 -p "$PORT" shutdown "$mode" >/dev/null 2>&1; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  for _ in $(seq 200); do alive "$pid" || break; sleep 0.025; done
  alive "$pid" && { echo "redis/stop: PID $pid still alive" >&2; exit 1; }
fi
((keep)) || rm -rf "$BASE"
