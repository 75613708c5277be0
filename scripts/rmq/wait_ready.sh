#!/usr/bin/env bash
# Waits until a RabbitMQ node accepts AMQP connections (TCP poll every 0.1 s: the AMQP listener is the last
# boot step) and, when MGMT_PORT is given, until GET /api/overview answers 200. Exit 1 on timeout.
# Usage: scripts/rmq/wait_ready.sh PORT TIMEOUT_S [MGMT_PORT]
# Env:   RMQ_USER/RMQ_PASSWORD (default guest/guest); RMQ_BASE: print its log tail on timeout.
set -euo pipefail

PORT=${1:?usage: wait_ready.sh PORT TIMEOUT_S [MGMT_PORT]}
TIMEOUT=${2:?usage: wait_ready.sh PORT TIMEOUT_S [MGMT_PORT]}
MGMT=${3:-}
AUTH=$(printf '%s:%s' "${RMQ_USER:-guest}" "${RMQ_PASSWORD:-guest}" | base64 -w0)
start_ms=$(date +%s%3N)
deadline_ms=$((start_ms + TIMEOUT * 1000))

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

overview_ok() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET /api/overview HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Basic %s\r\n\r\n' "$AUTH" >&3
    IFS= read -r -t 5 status <&3 || exit 1
    [[ $status == *" 200 "* ]]
  ) 2>/dev/null
}

poll() {   # poll WHAT CMD...
  local what=$1; shift
  until "$@"; do
    if (($(date +%s%3N) > deadline_ms)); then
      echo "rmq/wait_ready: $what not ready after ${TIMEOUT}s" >&2
      [[ -n ${RMQ_BASE:-} ]] && tail -n 30 "$RMQ_BASE"/log/*.log >&2
      exit 1
    fi
    sleep 0.1
  done
}

poll "AMQP port $PORT" port_open "$PORT"
[[ -n $MGMT ]] && poll "management API on port $MGMT" overview_ok "$MGMT"
echo "rmq/wait_ready: ready after $(($(date +%s%3N) - start_ms)) ms" >&2
