#!/usr/bin/env bash
# Waits until redis on 127.0.0.1:PORT answers PING (poll every 20 ms). Exit 1 on timeout.
# Usage: scripts/redis/wait_ready.sh PORT TIMEOUT_S      Env: REDIS_BASE: print its log tail on timeout.
set -euo pipefail

PORT=${1:?usage: wait_ready.sh PORT TIMEOUT_S}
TIMEOUT=${2:?usage: wait_ready.sh PORT TIMEOUT_S}
deadline_ms=$(($(date +%s%3N) + TIMEOUT * 1000))
until redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; do
  if (($(date +%s%3N) > deadline_ms)); then
    echo "redis/wait_ready: no PONG on port $PORT after ${TIMEOUT}s" >&2
    [[ -n ${REDIS_BASE:-} ]] && tail -n 30 "$REDIS_BASE/redis.log" >&2
    exit 1
  fi
  sleep 0.02
done
