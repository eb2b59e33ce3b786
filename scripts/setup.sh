#!/usr/bin/env bash
# Installs everything the project needs on Debian 12 (run as root): QEMU for the lab VM and
# as the peer VMM, the kernel source and its build tools, busybox and fio for the guest.
# Idempotent: it skips apt when every package is already there.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PACKAGES=(
    qemu-system-x86              # lab VM (TCG) and the "qemu" backend inside it
    qemu-utils                   # qemu-io and qemu-img: the image-lock test (QEMU refuses vmm's images)
    linux-source-6.1             # guest kernel source
    bc flex bison libelf-dev libssl-dev make gcc libc6-dev   # kernel build; gcc also builds
                                 # the guest's rawsend (guest-kernel/rootfs/rawsend.c)
    cpio xz-utils kmod file      # initramfs, module resolution
    busybox-static fio e2fsprogs # guest userland and root image
    openssl                      # the peer of the encryption benchmark (openssl speed)
    zstd b3sum                   # the peers of the compression and dedup benchmarks, and
                                 # zstd -3 beside the compression plugin in a guest test
    iproute2 iperf3 tcpdump      # taps and bridges in the lab, the network benchmark (in
                                 # the guest too), captures on the lab's bridge
    iputils-ping wget            # the guest's ping (-M do: what fits the link) and wget
    linux-perf                   # benches/lab-profile.sh: where the lab's CPUs go in a job
)
missing=()
for p in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
    step "setup: apt-get update"
    apt-get update -q >/dev/null
    if [ "${#missing[@]}" -gt 0 ]; then
        step "setup: apt-get install ${missing[*]} (about 1 min)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    step "setup: all ${#PACKAGES[@]} packages present"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
if ! cargo nextest --version >/dev/null 2>&1; then
    step "setup: cargo install cargo-nextest"
    cargo install --locked cargo-nextest >/dev/null
fi
