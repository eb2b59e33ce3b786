//! Landlock: which files each kind of thread may open once it runs (docs/security.md,
//! "Landlock"), in the style of Cloud Hypervisor's `--landlock`.
//!
//! Everything the config names for the VM itself (kernel, initrd, images, taps, plugins
//! loaded at start, the API socket) is opened at start, before any thread is confined. The
//! rulesets are built then, from the config, one per kind of thread; each thread restricts
//! itself first thing, before its seccomp filter (which forbids the calls) and before it
//! starts any other, which inherit its domain. What each kind may open afterwards:
//!
//! - vCPUs and the stdin thread: nothing;
//! - devices' threads (every plugin hook, `create` included): read the instance configs'
//!   `*_file` values (key files), `[landlock] read_paths` and `/proc/meminfo`;
//! - the API's threads: read plugins under `[landlock] plugin_dirs` (the loader copies them
//!   into a sealed memfd, which Landlock does not govern, and opens that), the system's
//!   library folders for their dependencies, and `/proc/meminfo`;
//! - the main thread (it ends the VM): remove files in the API socket's folder.
//!
//! A kernel without Landlock, or with an older ABI, gets what it has: one line at start
//! says what is not confined.

use crate::config::VmConfig;
use crate::seccomp::ThreadKind;
use landlock::{
    make_bitflags, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, ABI,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The Landlock ABI whose file rights the vmm handles: reading, writing, making and
/// removing files, linking across folders (2), truncating (3), device ioctls (5).
pub const ABI_USED: ABI = ABI::V5;

/// What the dynamic loader reads for a plugin's own dependencies (libc, libgcc_s...): the
/// system's library folders and its cache. Only those that exist are allowed.
pub const LOADER_PATHS: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
];

/// Whether the vmm confines its threads' file access (`--landlock`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LandlockMode {
    /// Each thread may open only what its kind needs; a kernel without Landlock, or with an
    /// older ABI, gives what it has (said at start).
    #[default]
    On,
    /// No Landlock rules (seccomp still applies).
    Off,
}

/// A path and what may be done beneath it.
pub type Grant = (PathBuf, BitFlags<AccessFs>);

/// The rulesets of every thread kind, built once at start.
pub struct Rulesets {
    /// Per kind (`ThreadKind::ALL`'s order); empty when off or where the kernel has none.
    per_kind: Vec<RulesetCreated>,
    /// The line said at start, if something is not confined.
    note: Option<String>,
}

impl std::fmt::Debug for Rulesets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rulesets")
            .field("kinds", &self.per_kind.len())
            .field("note", &self.note)
            .finish()
    }
}

/// Reading a file, or the files and listing beneath a folder.
fn read_access(path: &Path) -> BitFlags<AccessFs> {
    if path.is_dir() {
        make_bitflags!(AccessFs::{ReadFile | ReadDir})
    } else {
        make_bitflags!(AccessFs::{ReadFile})
    }
}

/// What `kind` may open once it runs, from `cfg`; `api_socket` is the socket the API serves.
/// Paths that do not exist are left out (they allow nothing; a plugin that names a missing
/// key file is told so by its own open).
pub fn grants(kind: ThreadKind, cfg: &VmConfig, api_socket: Option<&Path>) -> Vec<Grant> {
    let read =
        |p: &Path| -> Option<Grant> { p.exists().then(|| (p.to_path_buf(), read_access(p))) };
    let mut out = Vec::new();
    match kind {
        ThreadKind::Vcpu | ThreadKind::Stdin => {}
        ThreadKind::Device => {
            let files = cfg.interceptor.iter().flat_map(|i| i.files());
            let paths = files.chain(cfg.landlock.read_paths.iter().map(PathBuf::as_path));
            out.extend(paths.chain([Path::new("/proc/meminfo")]).filter_map(read));
        }
        ThreadKind::Api => {
            let dirs = cfg.landlock.plugin_dirs.iter().map(PathBuf::as_path);
            let loader = LOADER_PATHS.iter().map(Path::new);
            out.extend(
                dirs.chain(loader)
                    .chain([Path::new("/proc/meminfo")])
                    .filter_map(read),
            );
        }
        ThreadKind::Main => {
            // A bare file name is in the working folder.
            let folder = api_socket
                .and_then(Path::parent)
                .map(|p| {
                    if p.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        p
                    }
                })
                .filter(|p| p.is_dir());
            out.extend(folder.map(|f| (f.to_path_buf(), make_bitflags!(AccessFs::{RemoveFile}))));
        }
    }
    out
}

/// The kernel's Landlock ABI: 0 without Landlock (not built in, or not enabled at boot).
pub fn kernel_abi() -> i32 {
    // SAFETY: a null attribute of size 0 with LANDLOCK_CREATE_RULESET_VERSION (1) creates
    // nothing: the call returns the ABI version, or -1 with errno.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    i32::try_from(v).unwrap_or(0).max(0)
}

/// What a kernel of Landlock ABI `abi` leaves unconfined, as the start line says it; None
/// when it confines all the vmm asks.
pub fn shortfall(abi: i32) -> Option<String> {
    if abi <= 0 {
        return Some(
            "this kernel has no Landlock (not built in, or not in its `lsm=` list): file \
             access is not confined; seccomp still limits each thread's calls"
                .into(),
        );
    }
    let missing: Vec<&str> = [
        (2, "linking and renaming across folders (ABI 2)"),
        (3, "truncating (ABI 3)"),
        (5, "device ioctls (ABI 5)"),
    ]
    .iter()
    .filter(|(needs, _)| abi < *needs)
    .map(|(_, what)| *what)
    .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "this kernel offers Landlock ABI {abi}: opening, making and removing files is \
             confined; not confined: {}",
            missing.join(", ")
        )
    })
}

impl Rulesets {
    /// Builds every kind's ruleset from `cfg` (nothing when `mode` is off or the kernel has
    /// no Landlock). An error names the path that cannot be allowed.
    pub fn build(
        mode: LandlockMode,
        cfg: &VmConfig,
        api_socket: Option<&Path>,
    ) -> Result<Rulesets, String> {
        let abi = kernel_abi();
        if mode == LandlockMode::Off {
            let note = "off (--landlock off): every thread may open any file the vmm's user can";
            return Ok(Rulesets {
                per_kind: Vec::new(),
                note: Some(note.into()),
            });
        }
        if abi == 0 {
            return Ok(Rulesets {
                per_kind: Vec::new(),
                note: shortfall(abi),
            });
        }
        let mut per_kind = Vec::new();
        for kind in ThreadKind::ALL {
            let created = Ruleset::default()
                .handle_access(AccessFs::from_all(ABI_USED))
                .and_then(|r| r.create())
                .map_err(|e| format!("landlock: the {} ruleset: {e}", kind.name()))?;
            let mut created = created;
            for (path, access) in grants(kind, cfg, api_socket) {
                let fd =
                    PathFd::new(&path).map_err(|e| format!("landlock: {}: {e}", path.display()))?;
                created = created
                    .add_rule(PathBeneath::new(fd, access))
                    .map_err(|e| format!("landlock: {}: {e}", path.display()))?;
            }
            per_kind.push(created);
        }
        Ok(Rulesets {
            per_kind,
            note: shortfall(abi),
        })
    }

    /// The line to say at start where something is not confined.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Restricts the calling thread (and the threads it starts afterwards) to `kind`'s
    /// rules. Nothing when off or where the kernel has no Landlock.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), String> {
        let Some(ruleset) = ThreadKind::ALL
            .iter()
            .position(|k| *k == kind)
            .and_then(|i| self.per_kind.get(i))
        else {
            return Ok(());
        };
        let status = ruleset
            .try_clone()
            .map_err(|e| format!("landlock: the {} ruleset: {e}", kind.name()))?
            .restrict_self()
            .map_err(|e| format!("landlock: cannot restrict a {} thread: {e}", kind.name()))?;
        if status.ruleset == RulesetStatus::NotEnforced {
            return Err(format!(
                "landlock: the kernel did not enforce the {} ruleset",
                kind.name()
            ));
        }
        Ok(())
    }
}

static GLOBAL: OnceLock<Rulesets> = OnceLock::new();

/// Makes `rulesets` the process's, for [`apply_current`]. Only the first call counts.
pub fn install(rulesets: Rulesets) -> Result<(), String> {
    GLOBAL
        .set(rulesets)
        .map_err(|_| "landlock: the rulesets are already installed".to_string())
}

/// Restricts the calling thread to `kind`'s rules from the process's set ([`install`]);
/// with none installed, nothing (tests and tools that start no vmm).
pub fn apply_current(kind: ThreadKind) -> Result<(), String> {
    match GLOBAL.get() {
        Some(r) => r.apply(kind),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
