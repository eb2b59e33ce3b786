#!/usr/bin/env bash
# Quick start, command 1: install, build, then run the main job. The default guest boots
# under real KVM (inside the lab VM on hosts without hardware KVM) and runs the fio jobs
# under QEMU, under plain vmm, and under vmm through the whole interceptor stack (cache over
# dedup over compression over encryption, configs/interceptors/cache-dedup-compress-
# encrypt.toml), side by side in one lab session; after the tables, what each layer did and
# what `vmm-img info` says of that disk. Then a real tree of files (a tar of the guest's own
# /usr and /lib) is written twice through the same stack, and `vmm-img` shows what the
# image holds and checks it. Extra arguments go to `lab bench` (--help).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bash "$REPO_ROOT/scripts/setup.sh"
bash "$REPO_ROOT/scripts/build.sh"
LAB="$REPO_ROOT/target/release/lab"
IMG_TOOL="$REPO_ROOT/target/release/vmm-img"
CHAIN="$REPO_ROOT/configs/interceptors/cache-dedup-compress-encrypt.toml"

# From here on a step that fails does not stop the demo: the next steps still run (a lab
# round whose guest hung leaves its rows out of the tables, the tree session and vmm-img
# run all the same), and the summary at the end names each step that failed (lib.sh).
step "fio under QEMU, plain vmm, and vmm through cache > dedup > zstd > enc, side by side"
# Two rounds in alternating order, so that running first or last in the lab session does not
# pass for a difference between the configurations (docs/benchmarks.md).
run_step "lab bench (fio under QEMU, vmm, vmm through the stack)" \
    "$LAB" bench --compare --rounds 2 --boots 3 --interceptors "$CHAIN" "$@"

step "a real tree written twice through the same stack (one more lab session)"
img="$BUILD_DIR/demo/stack.img"
mkdir -p "$(dirname "$img")"
rm -f "$img"
truncate -s 1G "$img"
run_step "lab guest (a tree written twice through the stack)" \
    "$LAB" guest --backend vmm --interceptors "$CHAIN" --data-disk "$img" \
    --task "tarcopy=16 tarcopy=200"
echo "image file: $(du -k --apparent-size "$img" | cut -f1) KiB, $(du -k "$img" | cut -f1) KiB allocated"

step "vmm-img info and check of that image (read-only; nothing is written back)"
run_step "vmm-img info" "$IMG_TOOL" info "$img" --interceptors "$CHAIN"
run_step "vmm-img check" "$IMG_TOOL" check "$img" --interceptors "$CHAIN"

steps_summary demo "the steps' own output above says why (a guest past its limit is reported with its threads, queues, KVM state and last KVM events: docs/lab.md)"
