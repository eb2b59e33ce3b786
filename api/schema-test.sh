#!/bin/sh
# Schema testing (docs/api.md, "Schema testing"): schemathesis against docs/api.yaml and a
# live server (the `serve` example: a stand-in VM, two disks over temporary files, a counter
# and a cache instance on vda), bridged to a loopback TCP port. Not part of CI.
#
#   python3 -m venv /tmp/st && /tmp/st/bin/pip install schemathesis
#   api/schema-test.sh [extra schemathesis options]
set -eu
cd "$(dirname "$0")/.."
ST=${ST:-/tmp/st/bin/schemathesis}
PORT=${PORT:-8787}
SOCK=$(mktemp -u /tmp/vmm-api-st.XXXXXX.sock)
cargo build -q -p interceptor-counter -p interceptor-cache -p vmm-api --example serve
LIB=$PWD/target/debug
./target/debug/examples/serve --sock "$SOCK" --tcp "127.0.0.1:$PORT" \
    --plugin "count=$LIB/libinterceptor_counter.so" --plugin "cache=$LIB/libinterceptor_cache.so" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -f "$SOCK"' EXIT
sleep 1
"$ST" --config-file api/schemathesis.toml run docs/api.yaml --url "http://127.0.0.1:$PORT" \
    --checks all --max-examples 50 --seed 1 --workers 1 --no-color "$@"
