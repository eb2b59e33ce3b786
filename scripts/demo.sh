#!/usr/bin/env bash
# Quick start, command 1: install, build, then run the main job: the default guest boots
# under real KVM (inside the lab VM on hosts without hardware KVM) and runs the fio jobs;
# prints boot time and the fio table. Extra arguments go to `lab bench` (see --help).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_ROOT/scripts/setup.sh"
bash "$REPO_ROOT/scripts/build.sh"
step "boot and fio under vmm and QEMU, side by side (about 3.5 min in the lab)"
exec "$REPO_ROOT/target/release/lab" bench --compare "$@"
