#!/usr/bin/env bash
# Installs what `make test` and `make demo` need, idempotently: Debian packages (only those missing),
# the virtualenv .venv and the project in editable mode (again only when pyproject.toml changed).
# Usage: scripts/bootstrap.sh [--venv-only]     (--venv-only skips the Debian packages, e.g. for `make lint`)
# Set XOCSI_SKIP_APT=1 to skip the Debian packages (e.g. when RabbitMQ/Redis come from Docker).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(rabbitmq-server redis-server e2fsprogs xfsprogs util-linux qemu-utils)
PYTHON=${BOOTSTRAP_PYTHON:-python3}   # the interpreter .venv is created from
VENV=.venv
STAMP=$VENV/.xo-csi-installed   # touched after a successful `pip install -e .[dev]`

say() { echo "bootstrap: $*" >&2; }

missing_packages() {
  local p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
  done
}

install_system_packages() {
  if ! command -v dpkg-query >/dev/null; then
    say "not a Debian system: skipping apt; make sure RabbitMQ and Redis are available (or a Docker engine)"
    return
  fi
  local missing
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]} == 0)) && return
  if ((EUID != 0)); then
    say "missing Debian packages: ${missing[*]}"
    say "run as root, or first: sudo apt-get install -y ${missing[*]}"
    say "(XOCSI_SKIP_APT=1 skips this check when the brokers come from a Docker engine)"
    exit 1
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
}

create_venv() {
  [[ -x $VENV/bin/python ]] && return
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    say "$PYTHON is $("$PYTHON" -V 2>&1); Python >= 3.11 is required (set BOOTSTRAP_PYTHON=/path/to/python3.11)"
    exit 1
  fi
  say "creating $VENV with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV"
}

install_project() {
  [[ -f $STAMP && ! pyproject.toml -nt $STAMP ]] && return
  say "installing the project and its dev dependencies into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  touch "$STAMP"
}

if [[ ${1:-} != --venv-only && ${XOCSI_SKIP_APT:-0} != 1 ]]; then
  install_system_packages
fi
create_venv
install_project
