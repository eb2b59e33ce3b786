#!/usr/bin/env bash
# Build the guest image: kernel and root filesystem (each cached by the hash of its inputs).
set -euo pipefail
here="$(dirname "$0")"
bash "$here/build-kernel.sh"
bash "$here/build-rootfs.sh"
