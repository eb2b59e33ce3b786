#!/usr/bin/env bash
# Quick start, command 1: install, build, then run the main job: the default guest boots
# under real KVM (inside the lab VM on hosts without hardware KVM) and runs the fio jobs;
# the third run stacks the example plugins (configs/interceptors/demo.toml) on the data disk;
# prints boot times, the fio tables and ratios. Extra arguments go to `lab bench` (--help).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_ROOT/scripts/setup.sh"
bash "$REPO_ROOT/scripts/build.sh"
step "boot and fio under QEMU, vmm, and vmm with interceptors (count over xor), side by side"
# Two rounds in alternating order, so that running first or last in the lab session does not
# pass for a difference between the configurations (docs/benchmarks.md).
exec "$REPO_ROOT/target/release/lab" bench --compare --rounds 2 --boots 3 \
    --interceptors "$REPO_ROOT/configs/interceptors/demo.toml" "$@"
