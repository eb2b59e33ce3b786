#!/usr/bin/env bash
# Build the guest root filesystem: busybox + Debian's fio, iperf3, e2fsprogs (mkfs.ext4,
# e2fsck), ping and wget with their libraries, our init, our rawsend (hand-made frames, from
# rootfs/rawsend.c with the host's C compiler) and the fio job files. To add a tool: add its
# binary to TOOLS (its libraries follow by ldd), its package to the versions line (so the
# cache is rebuilt when it changes) and to scripts/setup.sh (docs/lab.md, "Guest tools"). Two forms of the same tree:
#   rootfs.ext4          read-only ext4 root disk (/dev/vda), the default
#   initramfs.cpio.gz    the same tree as an initramfs (kept for the boot-time comparison)
# Output: symlinks in $BUILD_DIR/guest/, cached by the hash of the inputs.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"

# Debian's binaries copied into the guest with their shared libraries.
TOOLS=(/usr/bin/fio /usr/bin/iperf3 /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/bin/ping /usr/bin/wget)
for bin in /bin/busybox "${TOOLS[@]}" /sbin/mkfs.ext4 /usr/bin/cpio; do
    [ -x "$bin" ] || die "$bin missing: run scripts/setup.sh"
done
command -v cc >/dev/null || die "cc missing (rawsend.c): run scripts/setup.sh"
busybox_path=/bin/busybox
# Debian's busybox-static installs /bin/busybox; make sure it is the static one
file -L "$busybox_path" 2>/dev/null | grep -q 'statically linked' || die "$busybox_path is not static (install busybox-static)"

here="$REPO_ROOT/guest-kernel"
versions="$(pkg_version busybox-static) $(pkg_version fio) $(pkg_version iperf3) $(pkg_version libc6) $(pkg_version e2fsprogs) $(pkg_version iputils-ping) $(pkg_version wget) $(cc --version | head -n 1)"
RECIPE="rootfs-5"
key="$(inputs_hash "$RECIPE $versions" "$here/rootfs/init" "$here/rootfs/rawsend.c" "$REPO_ROOT"/benches/fio/*)"
out="$CACHE_DIR/rootfs-$key"
mkdir -p "$BUILD_DIR/guest"
lock_cache rootfs

if [ -f "$out/rootfs.ext4" ] && [ -f "$out/initramfs.cpio.gz" ]; then
    step "guest rootfs: cached ($out)"
else
    step "guest rootfs: assembling busybox + fio + iperf3 + e2fsprogs + ping + wget + rawsend"
    tmp="$out.tmp"; rm -rf "$tmp"; tree="$tmp/tree"
    mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,etc,fio}
    cp "$busybox_path" "$tree/bin/busybox"
    for app in $("$busybox_path" --list); do
        [ -e "$tree/bin/$app" ] || ln -s busybox "$tree/bin/$app"
    done
    # The tools with their shared libraries and the dynamic loader, at the paths the
    # binaries expect
    mkdir -p "$tree/usr/sbin"
    # libs_of BIN: copies the libraries BIN links into the tree
    libs_of() {
        ldd "$1" | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}' | while read -r lib; do
            mkdir -p "$tree$(dirname "$lib")"
            cp -L "$lib" "$tree$lib"
        done
    }
    for bin in "${TOOLS[@]}"; do
        cp "$bin" "$tree$bin"
        libs_of "$bin"
    done
    # rawsend: frames no socket of the guest's stack sends (VLAN tag stacks, IPv6 extension
    # headers, forged sources) through an AF_PACKET socket, for the rawsend= task (net-filter's
    # lab tests). Linked against the host's glibc, which goes in with it.
    cc -O2 -Wall -Wextra -Werror -o "$tree/usr/bin/rawsend" "$here/rootfs/rawsend.c" \
        || die "compiling guest-kernel/rootfs/rawsend.c failed"
    libs_of "$tree/usr/bin/rawsend"
    # e2fsprogs under the names people type, ahead of busybox's own mke2fs in PATH
    for name in mke2fs mkfs.ext4 mkfs.ext2; do ln -sfn /usr/sbin/mke2fs "$tree/bin/$name"; done
    for name in e2fsck fsck.ext4; do ln -sfn /usr/sbin/e2fsck "$tree/bin/$name"; done
    # Debian's ping (`-M do`, which busybox's lacks) and wget (busybox's crashes on a URL
    # without a port) stay at /usr/bin: busybox's shell runs its own applets for `ping` and
    # `wget` whatever PATH says, so init calls these by their paths.
    cp /etc/mke2fs.conf "$tree/etc/mke2fs.conf"
    cp "$here/rootfs/init" "$tree/init"
    cp "$REPO_ROOT"/benches/fio/* "$tree/fio/"
    printf 'root:x:0:0:root:/:/bin/sh\n' > "$tree/etc/passwd"
    printf 'root:x:0:\n' > "$tree/etc/group"

    step "guest rootfs: ext4 image and initramfs"
    mb=$(( $(du -sm "$tree" | cut -f1) * 5 / 4 + 16 ))
    mkfs.ext4 -q -F -E root_owner=0:0 -L guestroot -O ^has_journal -d "$tree" "$tmp/rootfs.ext4" "${mb}M" >/dev/null
    (cd "$tree" && find . | cpio -o -H newc --quiet | gzip -6 > "$tmp/initramfs.cpio.gz")
    rm -rf "$tree"
    rm -rf "$out"; mv "$tmp" "$out"
    step "guest rootfs: built (ext4 $(du -h --apparent-size "$out/rootfs.ext4" | cut -f1), initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1))"
fi
ln -sfn "$out/rootfs.ext4" "$BUILD_DIR/guest/rootfs.ext4"
ln -sfn "$out/initramfs.cpio.gz" "$BUILD_DIR/guest/initramfs.cpio.gz"
