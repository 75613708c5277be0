#!/usr/bin/env bash
# Starts a private RabbitMQ node without systemd, as any user (root included): state lives in BASE, a fresh
# temp dir printed on the last line, and every listener (AMQP, management, distribution, epmd) is on loopback.
# Returns as soon as the node is launched: wait with wait_ready.sh, stop with stop.sh BASE.
# BASE/launcher.pid lives exactly as long as the node; its boot output is in BASE/log/console.log.
#
# Usage: scripts/rmq/start.sh [AMQP_PORT=5672] [MGMT_PORT]     (management plugin only when MGMT_PORT is given)
# Env:   RMQ_DIST_PORT     Erlang distribution port (default AMQP_PORT+20000)
#        RMQ_EXTRA_RABBIT  extra terms for the rabbit app, e.g. '{consumer_timeout, 3000}, {channel_tick_interval, 1000}'
#        RMQ_EPMD_PORT     epmd port (default 4369, shared with other nodes); a free port gives the node its own epmd
#        RMQ_COOKIE        the Erlang cookie (default: a random one made at the first start); nodes that form a
#                          cluster (RMQ_EXTRA_RABBIT='{cluster_nodes, ...}') must share it, and their epmd port
#        RMQ_BASE          reuse this dir (made by an earlier start.sh, stopped with `stop.sh BASE [kill] keep`):
#                          a restart on the same ports with durable queues and vhosts kept
# If no epmd answers, one is started on 127.0.0.1 and its PID kept in BASE/epmd.pid, so that stop.sh ends it.
set -euo pipefail

PORT=${1:-5672}
MGMT=${2:-}
DIST=${RMQ_DIST_PORT:-$((PORT + 20000))}
export ERL_EPMD_PORT=${RMQ_EPMD_PORT:-4369}   # read by epmd, the node and the CLI tools alike
RMQ_BIN=/usr/lib/rabbitmq/bin   # the real scripts; /usr/sbin/rabbitmq-* would `su rabbitmq`

BASE= fresh=0
die() {
  echo "rmq/start: $*" >&2
  if [[ -f $BASE/epmd.pid ]]; then kill "$(cat "$BASE/epmd.pid")" 2>/dev/null || true; fi
  ((fresh)) && rm -rf "$BASE"
  exit 1
}
[[ -x $RMQ_BIN/rabbitmq-server ]] || die "$RMQ_BIN/rabbitmq-server not found (apt-get install rabbitmq-server)"
((DIST < 65536)) || die "distribution port $DIST is out of range: set RMQ_DIST_PORT"

if [[ -n ${RMQ_BASE:-} ]]; then
  BASE=$RMQ_BASE
  [[ -f $BASE/.xo-csi-rmq ]] || die "$BASE was not made by start.sh"
else
  BASE=$(mktemp -d "${TMPDIR:-/tmp}/rmq.XXXXXX")
  fresh=1
  touch "$BASE/.xo-csi-rmq"   # stop.sh refuses to rm -rf a dir without this marker
fi
mkdir -p "$BASE/home" "$BASE/log" "$BASE/mnesia"
if [[ -n ${RMQ_COOKIE:-} ]]; then
  rm -f "$BASE/home/.erlang.cookie"
  (umask 077 && printf '%s' "$RMQ_COOKIE" >"$BASE/home/.erlang.cookie")
  chmod 400 "$BASE/home/.erlang.cookie"   # Erlang refuses a cookie file others can read
fi
rm -f "$BASE/rabbit.pid" "$BASE/launcher.pid"
printf 'PORT=%s\nMGMT=%s\nDIST=%s\nERL_EPMD_PORT=%s\n' "$PORT" "$MGMT" "$DIST" "$ERL_EPMD_PORT" >"$BASE/ports"

extra=${RMQ_EXTRA_RABBIT:+, $RMQ_EXTRA_RABBIT}
{
  echo "[{rabbit, [{tcp_listeners, [{\"127.0.0.1\", $PORT}]}, {loopback_users, []}$extra]}"
  [[ -n $MGMT ]] && echo " ,{rabbitmq_management, [{tcp_config, [{port, $MGMT}, {ip, \"127.0.0.1\"}]}]}"
  echo "]."
} >"$BASE/rabbitmq.config"
if [[ -n $MGMT ]]; then echo '[rabbitmq_management].' >"$BASE/enabled_plugins"; else echo '[].' >"$BASE/enabled_plugins"; fi

# HOME holds the Erlang cookie; CLI tools (rabbitmqctl) need the same HOME and RABBITMQ_NODENAME.
export HOME=$BASE/home \
  RABBITMQ_CONF_ENV_FILE=/dev/null \
  RABBITMQ_NODENAME=rmq$PORT@localhost \
  RABBITMQ_MNESIA_BASE=$BASE/mnesia \
  RABBITMQ_LOG_BASE=$BASE/log \
  RABBITMQ_PID_FILE=$BASE/rabbit.pid \
  RABBITMQ_NODE_PORT=$PORT \
  RABBITMQ_DIST_PORT=$DIST \
  RABBITMQ_CONFIG_FILE=$BASE/rabbitmq.config \
  RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/enabled_plugins \
  ERL_EPMD_ADDRESS=127.0.0.1 \
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"

# The node would start `epmd -daemon` itself, and it outlives the node: start it here to know its PID.
# (An epmd already running on ERL_EPMD_PORT is shared and left alone.)
if ! epmd -names >/dev/null 2>&1; then
  setsid nohup epmd -address 127.0.0.1 </dev/null >"$BASE/log/epmd.log" 2>&1 &
  echo $! >"$BASE/epmd.pid"
  for _ in $(seq 100); do epmd -names >/dev/null 2>&1 && break; sleep 0.02; done
fi

# Foreground mode, in the background of a new session: unlike -detached (whose boot errors go nowhere) the
# node's console output lands in log/console.log, and the launcher (the rabbitmq-server shell, which waits
# for beam) leads a process group that is the node: stop.sh can end it whole, a caller can watch its PID.
# Output to a file, as an inherited stdout would keep a caller's pipe open (e.g. `$(start.sh | tail -1)`).
setsid nohup "$RMQ_BIN/rabbitmq-server" </dev/null >>"$BASE/log/console.log" 2>&1 &
echo $! >"$BASE/launcher.pid"
echo "$BASE"
