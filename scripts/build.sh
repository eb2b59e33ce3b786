#!/usr/bin/env bash
# Builds the guest image, the lab image and the workspace (each step cached).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_ROOT/guest-kernel/build.sh"
bash "$REPO_ROOT/tests/lab/build-lab.sh"
step "cargo build --workspace --release"
cargo build --quiet --workspace --release --manifest-path "$REPO_ROOT/Cargo.toml"
# The data disk configs/guest.toml names.
[ -e "$BUILD_DIR/data.img" ] || truncate -s 1G "$BUILD_DIR/data.img"
# A blank disk for configs/guest-interceptors.toml (the remap plugin formats it). One left
# by an older checkout in remap's version 1 (refused since version 2) is made anew.
if [ -e "$BUILD_DIR/remap.img" ] && [ "$(od -An -tu4 -j8 -N4 "$BUILD_DIR/remap.img" | tr -d ' ')" = 1 ]; then
    rm -f "$BUILD_DIR/remap.img"
fi
[ -e "$BUILD_DIR/remap.img" ] || truncate -s 1G "$BUILD_DIR/remap.img"
# The example C plugin, from the header alone (docs/plugins.md).
step "cc interceptors/xor/xor.c -> target/release/libinterceptor_xor.so"
cc -shared -fPIC -O2 -Wall -Wextra -Werror -I "$REPO_ROOT/interceptors/include" \
    "$REPO_ROOT/interceptors/xor/xor.c" -o "$REPO_ROOT/target/release/libinterceptor_xor.so"
