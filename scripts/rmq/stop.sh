#!/usr/bin/env bash
# Stops a node made by start.sh, by the PIDs in BASE (rabbit.pid, launcher.pid), then removes BASE.
# Usage: scripts/rmq/stop.sh BASE [kill] [keep]
#   kill  SIGKILL (1-2 s) instead of SIGTERM (~8 s with the management plugin; SIGKILL after 30 s)
#   keep  keep BASE (mnesia: durable queues, vhosts, users) and epmd, for `RMQ_BASE=BASE start.sh PORT [MGMT]`
# Without keep, also ends the epmd that start.sh started (BASE/epmd.pid), unless other nodes still use it.
# Idempotent: a node already gone is not an error.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../stop_lib.sh"
stop_args rmq "$@"
export ERL_EPMD_PORT=${ERL_EPMD_PORT:-4369}

# Graceful: SIGTERM to beam (rabbit shuts down cleanly). Then, or at once for kill, SIGKILL to the process
# group led by the launcher (start.sh made it a session leader): beam, its helpers and the launcher shell.
beam=$(cat "$BASE/rabbit.pid" 2>/dev/null || true)
launcher=$(cat "$BASE/launcher.pid" 2>/dev/null || true)
if ((!kill)) && [[ -n $beam ]] && alive "$beam"; then
  kill -TERM "$beam" 2>/dev/null || true
  wait_gone "$beam" 30 || echo "rmq/stop: beam $beam still running 30 s after SIGTERM; killing it" >&2
fi
if [[ -n $launcher ]]; then
  kill -KILL -- "-$launcher" 2>/dev/null || true
  wait_gone "$launcher" 10 || echo "rmq/stop: launcher $launcher still alive" >&2
fi
if [[ -n $beam ]]; then
  kill -KILL "$beam" 2>/dev/null || true   # same group; in case the launcher was gone already
  wait_gone "$beam" 10 || echo "rmq/stop: beam $beam still alive" >&2
fi

if ((keep)); then
  rm -f "$BASE/rabbit.pid" "$BASE/launcher.pid"
  exit 0
fi

epmd_pid=$(cat "$BASE/epmd.pid" 2>/dev/null || true)
if [[ -n $epmd_pid ]] && alive "$epmd_pid" && [[ $(cat "/proc/$epmd_pid/comm") == epmd ]]; then
  others=$(epmd -names 2>/dev/null | grep '^name ' | grep -v "^name rmq$PORT at" || true)
  if [[ -z $others ]]; then
    kill "$epmd_pid" && wait_gone "$epmd_pid" 5 || true
  else
    echo "rmq/stop: leaving epmd $epmd_pid running, still used by: $others" >&2
  fi
fi
rm -rf "$BASE"
