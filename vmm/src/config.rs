//! The guest's TOML config: what `vmm --config guest.toml` boots.
//!
//! Unknown fields are refused. Every error names the file and the field. Relative paths are
//! taken relative to the config file's directory.

use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The smallest guest memory we accept: below it Linux cannot unpack itself.
pub const MIN_MEMORY_MIB: u64 = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    pub kernel: KernelConfig,
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    #[serde(default)]
    pub interceptor: Vec<InterceptorConfig>,
    pub api: Option<ApiConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    512
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// bzImage, or an ELF vmlinux with a PVH entry note.
    pub path: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub id: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Interceptor instance ids, top (nearest the guest) to bottom (nearest the disk).
    #[serde(default)]
    pub interceptors: Vec<String>,
}

/// One interceptor instance: a plugin loaded by path, with its own config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptorConfig {
    pub id: String,
    /// The plugin's shared object.
    pub path: PathBuf,
    /// When set, the file's BLAKE3 (hex) must match before it is loaded.
    pub blake3: Option<String>,
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Handed to the plugin's create() as a JSON object.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_enabled() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub socket: PathBuf,
}

/// What the host allows, for validation.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub max_vcpus: u32,
    pub available_mib: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

impl VmConfig {
    /// Reads and parses `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut cfg = VmConfig::parse(&text, &file)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Parses TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<VmConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            // toml's message names the line, the column and the offending key.
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.kernel.path);
        if let Some(initrd) = self.kernel.initrd.as_mut() {
            fix(initrd);
        }
        for b in &mut self.block {
            fix(&mut b.path);
        }
        for i in &mut self.interceptor {
            fix(&mut i.path);
        }
        if let Some(api) = self.api.as_mut() {
            fix(&mut api.socket);
        }
    }

    /// Checks everything that can be checked before creating the VM.
    pub fn validate(&self, file: &str, host: HostLimits) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        let m = &self.machine;
        if m.vcpus == 0 {
            return Err(invalid("machine.vcpus", "must be at least 1".into()));
        }
        if m.vcpus > host.max_vcpus {
            return Err(invalid(
                "machine.vcpus",
                format!(
                    "{} is over this host's limit of {}",
                    m.vcpus, host.max_vcpus
                ),
            ));
        }
        if m.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "machine.memory_mib",
                format!(
                    "{} MiB is too small (at least {MIN_MEMORY_MIB})",
                    m.memory_mib
                ),
            ));
        }
        if m.memory_mib > host.available_mib {
            return Err(invalid(
                "machine.memory_mib",
                format!(
                    "{} MiB is more than the host's available {} MiB",
                    m.memory_mib, host.available_mib
                ),
            ));
        }
        require_file(&self.kernel.path).map_err(|e| invalid("kernel.path", e))?;
        if let Some(initrd) = &self.kernel.initrd {
            require_file(initrd).map_err(|e| invalid("kernel.initrd", e))?;
        }
        let mut ids = HashSet::new();
        for (i, b) in self.block.iter().enumerate() {
            let field = |name: &str| format!("block[{i}].{name}");
            if !valid_id(&b.id) {
                return Err(invalid(
                    &field("id"),
                    format!("{:?}: use letters, digits, '-' and '_'", b.id),
                ));
            }
            if !ids.insert(b.id.as_str()) {
                return Err(invalid(&field("id"), format!("{:?} is used twice", b.id)));
            }
            require_file(&b.path).map_err(|e| invalid(&field("path"), e))?;
        }
        self.validate_interceptors(file)
    }

    /// Instance ids are unique; each chain names known instances; an instance serves one
    /// disk (it sits over that disk's layers below); pins are BLAKE3 hex.
    fn validate_interceptors(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            message,
        };
        let mut ids = HashSet::new();
        for (i, ic) in self.interceptor.iter().enumerate() {
            if !valid_id(&ic.id) {
                return Err(invalid(
                    format!("interceptor[{i}].id"),
                    format!("{:?}: use letters, digits, '-' and '_'", ic.id),
                ));
            }
            if !ids.insert(ic.id.as_str()) {
                return Err(invalid(
                    format!("interceptor[{i}].id"),
                    format!("{:?} is used twice", ic.id),
                ));
            }
            if let Some(pin) = &ic.blake3 {
                if pin.len() != 64 || !pin.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(invalid(
                        format!("interceptor[{i}].blake3"),
                        "must be 64 hex digits".into(),
                    ));
                }
            }
        }
        let mut used: std::collections::HashMap<&str, &str> = Default::default();
        for (i, b) in self.block.iter().enumerate() {
            for (j, id) in b.interceptors.iter().enumerate() {
                let field = format!("block[{i}].interceptors[{j}]");
                if !ids.contains(id.as_str()) {
                    return Err(invalid(field, format!("no [[interceptor]] has id {id:?}")));
                }
                if let Some(other) = used.insert(id, &b.id) {
                    return Err(invalid(
                        field,
                        format!(
                            "{id:?} already serves block {other:?}; an instance serves one disk (add another [[interceptor]] with the same path)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
}

fn require_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || is_block_device(&m) => Ok(()),
        Ok(_) => Err(format!("{} is not a file", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn is_block_device(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_block_device()
}

/// The host's limits: KVM's vCPU limit (given by the caller) and `MemAvailable`.
pub fn host_available_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        max_vcpus: 8,
        available_mib: 4096,
    };

    fn dir_with_files() -> (tempdir::Dir, String) {
        let d = tempdir::Dir::new();
        std::fs::write(d.0.join("bzImage"), b"k").unwrap();
        std::fs::write(d.0.join("disk.img"), b"d").unwrap();
        std::fs::write(d.0.join("disk2.img"), b"d").unwrap();
        let file = d.0.join("guest.toml").display().to_string();
        (d, file)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vmm-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn load(text: &str) -> (Result<(), ConfigError>, tempdir::Dir) {
        let (d, file) = dir_with_files();
        std::fs::write(&file, text).unwrap();
        let r = VmConfig::load(Path::new(&file)).and_then(|c| c.validate(&file, HOST));
        (r, d)
    }

    fn err(text: &str) -> String {
        load(text).0.unwrap_err().to_string()
    }

    const GOOD: &str = r#"
        [machine]
        vcpus = 2
        memory_mib = 512
        [kernel]
        path = "bzImage"
        cmdline = "console=ttyS0"
        [[block]]
        id = "root"
        path = "disk.img"
        read_only = true
        [[block]]
        id = "data"
        path = "disk2.img"
        [api]
        socket = "vmm.sock"
    "#;

    #[test]
    fn a_good_config_loads_with_paths_resolved() {
        let (d, file) = dir_with_files();
        std::fs::write(&file, GOOD).unwrap();
        let cfg = VmConfig::load(Path::new(&file)).unwrap();
        cfg.validate(&file, HOST).unwrap();
        assert_eq!(cfg.machine.vcpus, 2);
        assert_eq!(cfg.kernel.path, d.0.join("bzImage"));
        assert_eq!(cfg.block.len(), 2);
        assert!(cfg.block[0].read_only && !cfg.block[1].read_only);
        assert_eq!(cfg.api.unwrap().socket, d.0.join("vmm.sock"));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = err(&GOOD.replace("vcpus = 2", "vcpus = 2\ncpus = 3"));
        assert!(e.contains("guest.toml") && e.contains("cpus"), "{e}");
        let e = err(&GOOD.replace("read_only = true", "readonly = true"));
        assert!(e.contains("readonly"), "{e}");
    }

    #[test]
    fn each_invalid_value_names_its_field() {
        for (from, to, field) in [
            ("vcpus = 2", "vcpus = 0", "machine.vcpus"),
            ("vcpus = 2", "vcpus = 9", "machine.vcpus"),
            ("memory_mib = 512", "memory_mib = 16", "machine.memory_mib"),
            (
                "memory_mib = 512",
                "memory_mib = 999999",
                "machine.memory_mib",
            ),
            ("path = \"bzImage\"", "path = \"nope\"", "kernel.path"),
            (
                "path = \"disk2.img\"",
                "path = \"missing.img\"",
                "block[1].path",
            ),
            ("id = \"data\"", "id = \"root\"", "block[1].id"),
            ("id = \"data\"", "id = \"a,b\"", "block[1].id"),
            (
                "cmdline = \"console=ttyS0\"",
                "cmdline = \"x\"\ninitrd = \"none\"",
                "kernel.initrd",
            ),
        ] {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{from}");
            let e = err(&text);
            assert!(
                e.contains(field) && e.contains("guest.toml"),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn wrong_types_and_garbage_are_parse_errors() {
        for text in [
            GOOD.replace("vcpus = 2", "vcpus = \"two\""),
            GOOD.replace("vcpus = 2", "vcpus = -1"),
            "[kernel".to_string(),
            "\u{0}\u{1}garbage".to_string(),
            String::new(),
        ] {
            let e = err(&text);
            assert!(e.contains("guest.toml"), "{e}");
        }
    }
}
