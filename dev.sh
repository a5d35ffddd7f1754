#!/usr/bin/env bash
# The two commands a newcomer needs, from a fresh checkout:
#
#   ./dev.sh demo   install what is missing, build the library, run the demo
#   ./dev.sh test   install what is missing, run the whole test suite (CI runs this)
#
# Missing tools are installed with apt-get when run as root; otherwise the
# script prints the exact command to run and stops. Rust itself (cargo) is
# not a Debian package recent enough: it comes from rustup.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    echo "usage: $0 demo|test" >&2
    exit 2
}
[ $# -eq 1 ] || usage
verb=$1

# tool:Debian package, for what each verb runs.
demo_needs=(cc:gcc cmake:cmake)
test_needs=("${demo_needs[@]}" c++:g++ valgrind:valgrind pkg-config:pkg-config python3:python3
    mpirun:openmpi-bin ip:iproute2 srun:slurm-client slurmctld:slurmctld slurmd:slurmd munged:munge)
case $verb in
    demo) needs=("${demo_needs[@]}") ;;
    test) needs=("${test_needs[@]}") ;;
    *) usage ;;
esac

if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
    echo "dev.sh: cargo not found. Install Rust (1.88 or later) with rustup:" >&2
    echo "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    exit 1
fi

missing=()
for need in "${needs[@]}"; do
    command -v "${need%%:*}" >/dev/null || missing+=("${need#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "dev.sh: missing: ${missing[*]}. Install them, then run this again:" >&2
        echo "    sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "+ apt-get install -y ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

run() {
    echo "+ $*"
    eval "$*"
}
case $verb in
    demo) run 'cmake -S . -B build && cmake --build build -j2 && ./build/examples/ps_demo' ;;
    # Worlds of processes run twice: over shared memory (the default for
    # ranks on one host) and with RPCAGENT_TRANSPORT=tcp.
    test) run 'cargo test --locked && RPCAGENT_TRANSPORT=tcp cargo test --locked --test tcp_world --test failures --test connections && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2 && ctest --test-dir build --output-on-failure && RPCAGENT_TRANSPORT=tcp ctest --test-dir build --output-on-failure' ;;
esac
