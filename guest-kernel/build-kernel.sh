#!/usr/bin/env bash
# Build the minimal guest kernel from Debian's linux-source-6.1.
# Output: $BUILD_DIR/guest/bzImage and vmlinux (symlinks into a cache directory keyed by
# the hash of the config fragment, this script and the source package version).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"

SRC_PKG=linux-source-6.1
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
[ -f "$SRC_TAR" ] || die "$SRC_TAR missing: run scripts/setup.sh (installs $SRC_PKG)"

FRAGMENT="$REPO_ROOT/guest-kernel/guest.config"
RECIPE="kernel-1"
key="$(inputs_hash "$RECIPE $(pkg_version $SRC_PKG)" "$FRAGMENT")"
out="$CACHE_DIR/kernel-$key"
mkdir -p "$BUILD_DIR/guest"
lock_cache kernel

if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
    step "guest kernel: cached ($out)"
else
    src="$CACHE_DIR/src/linux-$(pkg_version $SRC_PKG)"
    if [ ! -f "$src/.extracted" ]; then
        step "guest kernel: extracting $SRC_TAR (about 1 min)"
        rm -rf "$src"; mkdir -p "$src"
        tar -xf "$SRC_TAR" -C "$src" --strip-components=1
        touch "$src/.extracted"
    fi
    obj="$CACHE_DIR/kernel-$key.obj"
    rm -rf "$obj"; mkdir -p "$obj"
    step "guest kernel: configuring (tinyconfig + guest-kernel/guest.config)"
    make -s -C "$src" O="$obj" ARCH=x86_64 tinyconfig >/dev/null
    "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$FRAGMENT" >/dev/null
    make -s -C "$src" O="$obj" ARCH=x86_64 olddefconfig >/dev/null
    # Every option of the fragment must have survived olddefconfig (a missing dependency
    # silently drops an option otherwise).
    missing=0
    while IFS= read -r line; do
        case "$line" in CONFIG_*=*) grep -qx "$line" "$obj/.config" || { echo "  not set: $line" >&2; missing=1; } ;; esac
    done < "$FRAGMENT"
    [ "$missing" = 0 ] || die "guest kernel config: options above were dropped by kconfig"
    step "guest kernel: make bzImage on $(nproc) cores (about 5 min cold)"
    make -s -C "$src" O="$obj" ARCH=x86_64 -j"$(nproc)" bzImage >"$obj/build.log" 2>&1 \
        || { tail -30 "$obj/build.log" >&2; die "guest kernel build failed (log: $obj/build.log)"; }
    mkdir -p "$out.tmp"
    cp "$obj/arch/x86/boot/bzImage" "$obj/vmlinux" "$obj/.config" "$out.tmp/"
    rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$obj"
    step "guest kernel: built ($(du -h "$out/bzImage" | cut -f1) bzImage)"
fi
ln -sfn "$out/bzImage" "$BUILD_DIR/guest/bzImage"
ln -sfn "$out/vmlinux" "$BUILD_DIR/guest/vmlinux"
ln -sfn "$out/.config" "$BUILD_DIR/guest/kernel.config"
