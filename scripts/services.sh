#!/usr/bin/env bash
# Local RabbitMQ (with management) and Redis for the demo and manual runs, outside the test suite:
# state dirs and a sourceable .run/services.env (AMQP_URL, RABBITMQ_MANAGEMENT_URL, REDIS_URL).
# Usage: scripts/services.sh up|down|status
# Env:   RMQ_PORT (5672), RMQ_MGMT_PORT (15672), REDIS_PORT (6379), READY_TIMEOUT_S (90)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUN=.run
ENV_FILE=$RUN/services.env
RMQ_PORT=${RMQ_PORT:-5672}
RMQ_MGMT_PORT=${RMQ_MGMT_PORT:-15672}
REDIS_PORT=${REDIS_PORT:-6379}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-90}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up() {
  if [[ -f $ENV_FILE ]]; then
    echo "services: already up (scripts/services.sh down first)"
    cat "$ENV_FILE"
    return
  fi
  local port
  for port in "$RMQ_PORT" "$RMQ_MGMT_PORT" "$REDIS_PORT"; do
    port_open "$port" && { echo "services: port $port is taken; set RMQ_PORT/RMQ_MGMT_PORT/REDIS_PORT" >&2; exit 1; }
  done
  mkdir -p "$RUN"
  local rmq_base redis_base
  redis_base=$(scripts/redis/start.sh "$REDIS_PORT" | tail -1)
  echo "REDIS_BASE=$redis_base" >"$ENV_FILE.partial"
  rmq_base=$(scripts/rmq/start.sh "$RMQ_PORT" "$RMQ_MGMT_PORT" | tail -1)
  echo "RMQ_BASE=$rmq_base" >>"$ENV_FILE.partial"
  REDIS_BASE=$redis_base scripts/redis/wait_ready.sh "$REDIS_PORT" "$READY_TIMEOUT_S"
  RMQ_BASE=$rmq_base scripts/rmq/wait_ready.sh "$RMQ_PORT" "$READY_TIMEOUT_S" "$RMQ_MGMT_PORT"
  cat >>"$ENV_FILE.partial" <<EOT
RMQ_PORT=$RMQ_PORT
RMQ_MGMT_PORT=$RMQ_MGMT_PORT
REDIS_PORT=$REDIS_PORT
AMQP_URL=amqp://guest:guest@127.0.0.1:$RMQ_PORT/
RABBITMQ_MANAGEMENT_URL=http://127.0.0.1:$RMQ_MGMT_PORT
REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
EOT
  mv "$ENV_FILE.partial" "$ENV_FILE"
  cat "$ENV_FILE"
}

down() {
  local file
  for file in "$ENV_FILE" "$ENV_FILE.partial"; do
    [[ -f $file ]] || continue
    (
      source "$file"
      [[ -n ${RMQ_BASE:-} ]] && scripts/rmq/stop.sh "$RMQ_BASE" kill
      [[ -n ${REDIS_BASE:-} ]] && scripts/redis/stop.sh "$REDIS_BASE"
      true
    )
    rm -f "$file"
  done
  echo "services: down"
}

status() {
  [[ -f $ENV_FILE ]] || { echo "services: down"; return 1; }
  source "$ENV_FILE"
  local ok=0
  port_open "$RMQ_PORT" && echo "rabbitmq: up on $RMQ_PORT" || { echo "rabbitmq: not answering on $RMQ_PORT"; ok=1; }
  port_open "$REDIS_PORT" && echo "redis: up on $REDIS_PORT" || { echo "redis: not answering on $REDIS_PORT"; ok=1; }
  return $ok
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
