# Sourced by scripts/rmq/stop.sh and scripts/redis/stop.sh: the argument parsing, the checks on BASE and the
# process waits they share.

alive() { [[ -e /proc/$1 ]] && ! grep -qs '^State:[[:space:]]*Z' "/proc/$1/status"; }

wait_gone() {   # wait_gone PID TIMEOUT_S
  local i
  for ((i = 0; i < $2 * 20; i++)); do alive "$1" || return 0; sleep 0.05; done
  return 1
}

# stop_args NAME "$@": NAME is rmq or redis. Sets BASE, kill (0/1), keep (0/1); exits 0 when BASE is gone
# already, 1 when BASE was not made by NAME/start.sh, 2 on an unknown argument; else sources BASE/ports.
stop_args() {
  local name=$1 arg
  shift
  BASE=${1:?usage: stop.sh BASE [kill] [keep]}
  shift
  kill=0 keep=0
  for arg in "$@"; do
    case $arg in
      kill) kill=1 ;;
      keep) keep=1 ;;
      *) echo "$name/stop: unknown argument $arg" >&2; exit 2 ;;
    esac
  done
  [[ -d $BASE ]] || exit 0
  [[ -f $BASE/.xo-csi-$name ]] || { echo "$name/stop: $BASE was not made by start.sh; not touching it" >&2; exit 1; }
  # shellcheck source=/dev/null
  source "$BASE/ports"
}
