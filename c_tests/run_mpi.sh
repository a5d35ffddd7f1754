#!/usr/bin/env bash
# Starts a world of 4 under mpirun; the program gets nothing but mpirun's
# environment (plus the rendezvous port, passed the launcher's way).
set -euo pipefail
mpirun=$1; shift
# mpirun passes the caller's environment on: none of it may pick the
# rendezvous, a rank or a size (the ranks take them from mpirun).
unset MASTER_ADDR MASTER_PORT RPCAGENT_MASTER_ADDR RPCAGENT_MASTER_PORT \
    RPCAGENT_RANK RPCAGENT_WORLD_SIZE RANK WORLD_SIZE
# A rendezvous port that was free a moment ago, below the kernel's ephemeral
# range (32768 and up) where the ranks' own listeners get theirs (as
# harness.h's free_port).
port=$(python3 - <<'PY'
import random, socket
while True:
    p = random.randrange(25000, 32768)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        break
    except OSError:
        pass
    finally:
        s.close()
print(p)
PY
)
# CI runs as root; Open MPI wants to be told that is fine.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec "$mpirun" -n 4 --oversubscribe -x MASTER_PORT="$port" "$@"
