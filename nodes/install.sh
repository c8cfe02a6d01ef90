#!/usr/bin/env bash
# Install edgezmq on this board as a systemd service: edgezmq-node@NAME.
#
#   sudo nodes/install.sh NAME [CONFIG.yaml]
#
# 1. a virtualenv in $PREFIX (default /opt/edgezmq) with this checkout installed (+ metrics extra)
# 2. the unit /etc/systemd/system/edgezmq-node@.service and the config /etc/edgezmq/NAME.yaml
#    (CONFIG.yaml, or a minimal one to edit), via `edgezmq install-service`
# 3. systemctl daemon-reload && systemctl enable --now edgezmq-node@NAME
#
# Environment: PREFIX (venv location), PYTHON (interpreter, default python3),
# PIP_ARGS (extra pip arguments, e.g. an index for torch CPU wheels), EXTRAS (default metrics).
set -euo pipefail

usage() { echo "usage: sudo $0 NAME [CONFIG.yaml]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
name=$1
config=${2:-}
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || { echo "$0: bad name '$name' (letters, digits, . _ -)" >&2; exit 2; }
[[ -z $config || -f $config ]] || { echo "$0: no such config file: $config" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "$0: run as root (writes /opt, /etc)" >&2; exit 1; }

PREFIX=${PREFIX:-/opt/edgezmq}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-metrics}
src=$(cd "$(dirname "$0")/.." && pwd)

if [[ ! -x $PREFIX/bin/python ]]; then
    echo "creating virtualenv $PREFIX"
    "$PYTHON" -m venv "$PREFIX"
fi
echo "installing edgezmq from $src into $PREFIX"
# shellcheck disable=SC2086  # PIP_ARGS is a list of arguments
"$PREFIX/bin/pip" install --quiet ${PIP_ARGS:-} "${src}[${EXTRAS}]"

args=(install-service "$name" --exec "$PREFIX/bin/edgezmq")
if [[ -n $config ]]; then args+=(--config "$config"); fi
"$PREFIX/bin/edgezmq" "${args[@]}"
