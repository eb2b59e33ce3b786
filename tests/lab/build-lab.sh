#!/usr/bin/env bash
# Build the lab VM (level 1): Debian's generic kernel (extracted with dpkg -x, never installed
# on the host) and a busybox initramfs holding the modules for 9p and KVM.
# Output: $BUILD_DIR/lab/vmlinuz and initramfs.cpio.gz, cached by the hash of the inputs.
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"

# The modules the lab loads; their dependencies are resolved from modules.dep.
WANT="virtio_pci 9p 9pnet_virtio kvm-amd kvm-intel tun veth bridge vhost_net"  # file names

kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
[ -n "$kpkg" ] || die "no linux-image package found for the lab (run scripts/setup.sh, which runs apt-get update)"
kver="${kpkg#linux-image-}"
here="$REPO_ROOT/tests/lab"
RECIPE="lab-1"
key="$(inputs_hash "$RECIPE $kpkg $(apt-cache policy "$kpkg" | awk '/Candidate/{print $2}') $(pkg_version busybox-static) $WANT" "$here/lab-init")"
out="$CACHE_DIR/lab-$key"
mkdir -p "$BUILD_DIR/lab"
lock_cache lab

if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
    step "lab image: cached ($out)"
else
    tmp="$out.tmp"; rm -rf "$tmp"; mkdir -p "$tmp/dl"
    step "lab image: downloading $kpkg (apt-get download)"
    (cd "$tmp/dl" && apt-get download "$kpkg" >/dev/null 2>&1) || die "apt-get download $kpkg failed"
    dpkg -x "$tmp"/dl/*.deb "$tmp/x"
    depmod -b "$tmp/x" "$kver"
    root="$tmp/x/lib/modules/$kver"
    tree="$tmp/tree"; mkdir -p "$tree"/{bin,proc,sys,dev,tmp,modules}
    cp /bin/busybox "$tree/bin/busybox"
    cp "$here/lab-init" "$tree/init"; chmod +x "$tree/init"
    # Load order: each module after its dependencies (modules.dep lists them).
    declare -A seen=()
    order=()
    visit() {
        local path="$1" dep
        [ -n "${seen[$path]:-}" ] && return; seen[$path]=1
        for dep in $(awk -v m="$path:" '$1 == m { $1 = ""; print }' "$root/modules.dep"); do visit "$dep"; done
        order+=("$path")
    }
    for m in $WANT; do
        path="$(awk -F: -v m="/$m.ko" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m {print $1; exit}' "$root/modules.dep")"
        [ -n "$path" ] || die "module $m not in $kpkg"
        visit "$path"
    done
    for path in "${order[@]}"; do
        name="$(basename "$path" .ko)"
        cp "$root/$path" "$tree/modules/$name.ko"
        echo "$name" >> "$tree/modules.order"
    done
    (cd "$tree" && find . | cpio -o -H newc --quiet | gzip -6 > "$tmp/initramfs.cpio.gz")
    cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
    echo "$kpkg" > "$tmp/kernel-package"
    rm -rf "$tmp/dl" "$tmp/x" "$tree"
    rm -rf "$out"; mv "$tmp" "$out"
    step "lab image: built ($kpkg; ${#order[@]} modules)"
fi
ln -sfn "$out/vmlinuz" "$BUILD_DIR/lab/vmlinuz"
ln -sfn "$out/initramfs.cpio.gz" "$BUILD_DIR/lab/initramfs.cpio.gz"
