#!/usr/bin/env bash
# Starts a world of 4 under mpirun; the program gets nothing but mpirun's
# environment (plus the rendezvous port, passed the launcher's way).
set -euo pipefail
mpirun=$1; shift
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# CI runs as root; Open MPI wants to be told that is fine.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec "$mpirun" -n 4 --oversubscribe -x MASTER_PORT="$port" "$@"
