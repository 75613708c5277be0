#!/usr/bin/env bash
# Stops a redis-server made by start.sh, then removes BASE. Idempotent: a server already gone is not an error.
# Usage: scripts/redis/stop.sh BASE [kill] [keep]
#   kill  SIGKILL by PID (a crash: unsaved data is lost) instead of SHUTDOWN
#   keep  SHUTDOWN SAVE (dump.rdb in BASE) and keep BASE, for `REDIS_BASE=BASE start.sh PORT`
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../stop_lib.sh"
stop_args redis "$@"

pid=$(cat "$BASE/redis.pid" 2>/dev/null || true)

if [[ -n $pid ]] && alive "$pid"; then
  mode=nosave
  ((keep)) && mode=save
  if ((kill)) || ! redis-cli -h 127.0.0.1 -p "$PORT" shutdown "$mode" >/dev/null 2>&1; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait_gone "$pid" 5 || { echo "redis/stop: PID $pid still alive" >&2; exit 1; }
fi
((keep)) || rm -rf "$BASE"
