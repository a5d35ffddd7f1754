#!/usr/bin/env bash
# Runs an example as a world of two processes on this host, as a launcher would.
set -euo pipefail
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
MASTER_PORT=$port WORLD_SIZE=2 RANK=1 "$1" &
other=$!
MASTER_PORT=$port WORLD_SIZE=2 RANK=0 "$1"
wait $other
