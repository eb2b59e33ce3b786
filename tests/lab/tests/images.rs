//! The guest and lab images build from Debian's packages and hold what the guests need.

mod common;

use std::path::Path;
use std::process::Command;

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `debugfs` view of one path inside an ext4 image: true when it exists.
fn ext4_has(image: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).contains("Inode:")
}

#[test]
fn guest_image_builds_with_kernel_fio_and_init() {
    if common::images_or_skip().is_none() {
        return;
    }
    let guest = common::repo().join("build/guest");

    let bz = read(&guest.join("bzImage"));
    assert_eq!(
        &bz[0x202..0x206],
        b"HdrS",
        "bzImage lacks the Linux boot protocol header"
    );
    let elf = read(&guest.join("vmlinux"));
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        62,
        "vmlinux is not x86_64"
    );

    // The options the VMMs rely on are built in, and there are no modules.
    let config = String::from_utf8(read(&guest.join("kernel.config"))).unwrap();
    for opt in [
        "CONFIG_64BIT=y",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        "CONFIG_VIRTIO_PCI=y",
        "CONFIG_VIRTIO_BLK=y",
        "CONFIG_VIRTIO_NET=y",
        "CONFIG_SERIAL_8250_CONSOLE=y",
        "CONFIG_SYSVIPC=y",
        "CONFIG_IO_URING=y",
        "CONFIG_EXT4_FS=y",
        "CONFIG_PVH=y",
        "# CONFIG_MODULES is not set",
    ] {
        assert!(
            config.lines().any(|l| l == opt),
            "guest kernel config lacks {opt}"
        );
    }

    let rootfs = guest.join("rootfs.ext4");
    let fs = read(&rootfs);
    assert_eq!(u16::from_le_bytes([fs[1080], fs[1081]]), 0xEF53, "not ext4");
    for path in [
        "/init",
        "/bin/busybox",
        "/usr/bin/fio",
        "/fio/verify-crc32c.fio",
        "/fio/all.list",
    ] {
        assert!(
            ext4_has(&rootfs, path),
            "{path} missing from the root image"
        );
    }
    // Every library fio needs, the dynamic loader included, is in the image.
    let ldd = Command::new("ldd")
        .arg("/usr/bin/fio")
        .output()
        .expect("ldd");
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let libs: Vec<&str> = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .collect();
    assert!(libs.iter().any(|l| l.contains("ld-linux")), "{ldd}");
    for lib in libs {
        assert!(
            ext4_has(&rootfs, lib),
            "{lib} (needed by fio) missing from the root image"
        );
    }
    // Every job named in all.list ships in the image.
    let all = std::fs::read_to_string(common::repo().join("benches/fio/all.list")).unwrap();
    for job in all.split_whitespace() {
        assert!(
            ext4_has(&rootfs, &format!("/fio/{job}.fio")),
            "job {job} missing"
        );
    }

    let initramfs = read(&guest.join("initramfs.cpio.gz"));
    assert_eq!(&initramfs[..2], b"\x1f\x8b", "initramfs is not gzip");
}

#[test]
fn lab_image_holds_kvm_and_9p_modules() {
    if common::images_or_skip().is_none() {
        return;
    }
    let lab = common::repo().join("build/lab");
    let kernel = read(&lab.join("vmlinuz"));
    assert_eq!(&kernel[0x202..0x206], b"HdrS");
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zcat '{}' | cpio -t --quiet",
            lab.join("initramfs.cpio.gz").display()
        ))
        .output()
        .expect("zcat | cpio");
    let list = String::from_utf8_lossy(&list.stdout);
    for f in [
        "init",
        "bin/busybox",
        "modules/kvm.ko",
        "modules/kvm-amd.ko",
        "modules/9p.ko",
        "modules/9pnet_virtio.ko",
    ] {
        assert!(
            list.lines().any(|l| l == f),
            "{f} missing from the lab initramfs:\n{list}"
        );
    }
}

#[test]
fn second_build_is_served_from_the_cache() {
    if common::images_or_skip().is_none() {
        return;
    }
    // images_or_skip built everything; building again must only find the cached outputs.
    for script in ["guest-kernel/build.sh", "tests/lab/build-lab.sh"] {
        let out = common::build(script).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !out.contains("make bzImage"),
            "{script} rebuilt the kernel:\n{out}"
        );
        assert!(
            !out.contains("built ("),
            "{script} rebuilt instead of using the cache:\n{out}"
        );
        assert!(out.contains("cached"), "{script}:\n{out}");
    }
}
