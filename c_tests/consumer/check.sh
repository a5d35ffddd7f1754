#!/usr/bin/env bash
# Builds and runs a consumer of the installed package.
#   check.sh cmake|static|pkgconfig|cpp|readme PREFIX WORKDIR CMAKE SOURCE_DIR
set -euo pipefail
kind=$1 prefix=$2 work=$3 cmake=$4 src=$5
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work" && mkdir -p "$work"
cc=${CC:-cc}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

case $kind in
cmake)
    "$cmake" -S "$here" -B "$work" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
    "$cmake" --build "$work" >/dev/null
    "$work/app"
    ;;
static)
    "$cmake" -S "$here/static" -B "$work" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
    "$cmake" --build "$work" >/dev/null
    if ldd "$work/app" | grep -q librpcagent; then
        echo "the static build still loads librpcagent.so" >&2
        exit 1
    fi
    "$work/app"
    ;;
pkgconfig)
    export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
    # shellcheck disable=SC2046
    $cc -o "$work/app" "$here/main.c" $(pkg-config --cflags --libs rpcagent) -Wl,-rpath,"$prefix/lib"
    "$work/app"
    ;;
cpp)
    # The C++ wrapper is installed with the package.
    test -f "$prefix/include/rpcagent.hpp"
    export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
    # shellcheck disable=SC2046
    ${CXX:-c++} -std=c++17 -Wall -Werror -o "$work/hello" "$src/examples/hello.cpp" $(pkg-config --cflags --libs rpcagent) -Wl,-rpath,"$prefix/lib"
    bash "$src/examples/run_pair.sh" "$work/hello" | tee "$work/out"
    grep -qx "rank 0 got: 0 knar morf olleh" "$work/out"
    ;;
readme)
    # The C example in README.md, compiled exactly as written, run as a
    # world of two processes the way a launcher would start them.
    awk '/<!-- example:c -->/{f=1; next} f && /^```c/{next} f && /^```/{exit} f' "$src/README.md" > "$work/example.c"
    test -s "$work/example.c" || { echo "no C example in README.md" >&2; exit 1; }
    export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
    # shellcheck disable=SC2046
    $cc -Wall -Werror -o "$work/example" "$work/example.c" $(pkg-config --cflags --libs rpcagent) -Wl,-rpath,"$prefix/lib"
    port=$(free_port)
    MASTER_PORT=$port WORLD_SIZE=2 RANK=0 "$work/example" > "$work/rank0.out" &
    r0=$!
    MASTER_PORT=$port WORLD_SIZE=2 RANK=1 "$work/example" > "$work/rank1.out"
    wait $r0
    cat "$work/rank0.out" "$work/rank1.out"
    grep -qx "rank 0 got: hello from rank 0" "$work/rank0.out"
    grep -qx "rank 1 got: hello from rank 1" "$work/rank1.out"
    # And the C++ one.
    awk '/<!-- example:cpp -->/{f=1; next} f && /^```cpp/{next} f && /^```/{exit} f' "$src/README.md" > "$work/example.cpp"
    test -s "$work/example.cpp" || { echo "no C++ example in README.md" >&2; exit 1; }
    # shellcheck disable=SC2046
    ${CXX:-c++} -std=c++17 -Wall -Werror -o "$work/example_cpp" "$work/example.cpp" $(pkg-config --cflags --libs rpcagent) -Wl,-rpath,"$prefix/lib"
    bash "$src/examples/run_pair.sh" "$work/example_cpp" | tee "$work/cpp.out"
    grep -qx "rank 0 got: 0 knar morf olleh" "$work/cpp.out"
    ;;
*)
    echo "unknown kind $kind" >&2
    exit 2
    ;;
esac
