//! Where the project's build outputs are. The shell scripts build them (cached by hash);
//! `build/` in the checkout holds stable symlinks to the current ones.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The checkout this harness was built from (`VMM_REPO_ROOT` overrides).
pub fn repo_root() -> PathBuf {
    match std::env::var_os("VMM_REPO_ROOT") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// `build/` of the checkout (`VMM_BUILD_DIR` overrides, as in scripts/lib.sh).
pub fn build_dir() -> PathBuf {
    match std::env::var_os("VMM_BUILD_DIR") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("build"),
    }
}

/// The guest kernel and root filesystem (guest-kernel/build.sh).
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub rootfs_ext4: PathBuf,
    pub initramfs: PathBuf,
}

/// The lab VM's kernel and initramfs (tests/lab/build-lab.sh).
#[derive(Clone, Debug)]
pub struct LabImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn existing(path: PathBuf, script: &str) -> Result<PathBuf> {
    std::fs::canonicalize(&path)
        .with_context(|| format!("{} is missing: run {script}", path.display()))
}

pub fn guest_image() -> Result<GuestImage> {
    let dir = build_dir().join("guest");
    let s = "guest-kernel/build.sh";
    Ok(GuestImage {
        bzimage: existing(dir.join("bzImage"), s)?,
        vmlinux: existing(dir.join("vmlinux"), s)?,
        rootfs_ext4: existing(dir.join("rootfs.ext4"), s)?,
        initramfs: existing(dir.join("initramfs.cpio.gz"), s)?,
    })
}

pub fn lab_image() -> Result<LabImage> {
    let dir = build_dir().join("lab");
    let s = "tests/lab/build-lab.sh";
    Ok(LabImage {
        kernel: existing(dir.join("vmlinuz"), s)?,
        initrd: existing(dir.join("initramfs.cpio.gz"), s)?,
    })
}

/// Runs one of the project's build scripts (each is cached by the hash of its inputs, so
/// this takes seconds when nothing changed). Its progress lines pass through to stderr.
pub fn run_build_script(relative: &str) -> Result<()> {
    let script = repo_root().join(relative);
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("{relative} failed ({status})");
    }
    Ok(())
}
