//! The guest's TOML config: what `vmm --config guest.toml` boots.
//!
//! Unknown fields are refused. Every error is one bounded line naming the file and the
//! field (what the config says is echoed clipped, never whole). Relative paths are taken
//! relative to the config file's directory. Every size and count is bounded, against the
//! host where it takes the host's resources.

use crate::layout::{CMDLINE_MAX, HIMEM_START, MAX_IRQ, MMIO_GAP_START, VIRTIO_IRQ_BASE};
use serde::Deserialize;
use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

mod interceptor;
mod kernel;
mod landlock;
pub use interceptor::InterceptorConfig;
use kernel::check_initrd;
pub use kernel::{host_available_mib, kernel_kind, KernelKind};
pub use landlock::{LandlockConfig, MAX_LANDLOCK_PATHS};

/// The smallest guest memory we accept: below it Linux cannot unpack itself.
pub const MIN_MEMORY_MIB: u64 = 64;
/// The most guest memory a config may ask for (1 TiB), whatever the host has.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The most vCPUs: the MP table's APIC IDs are 8 bits, and the IOAPIC takes one.
pub const MAX_VCPUS: u32 = 254;
/// The most disks: one interrupt line each, from `VIRTIO_IRQ_BASE` to `MAX_IRQ`.
pub const MAX_BLOCKS: usize = (MAX_IRQ - VIRTIO_IRQ_BASE + 1) as usize;
/// The most `[[interceptor]]` entries: a full chain on every disk.
pub const MAX_INTERCEPTORS: usize = MAX_BLOCKS * compat::MAX_CHAIN;
/// The largest config file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The longest id (of a disk or an instance).
pub const MAX_ID_LEN: usize = 64;
/// The longest kernel command line the boot protocol takes (x86's COMMAND_LINE_SIZE, 2048
/// with its NUL; a bzImage may say less in its header), before the VMM's own words.
pub const MAX_CMDLINE: usize = 2047;
/// The most one disk's announcement adds to the command line:
/// ` virtio_mmio.device=4K@0xd0012000:23` is 36 bytes.
pub const CMDLINE_PER_DISK: usize = 40;
/// Where a messages's echo of the config is cut.
const ECHO_MAX: usize = 80;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    pub kernel: KernelConfig,
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub interceptor: Vec<InterceptorConfig>,
    pub api: Option<ApiConfig>,
    /// What may be opened once the guest runs, beyond the files named above.
    #[serde(default)]
    pub landlock: LandlockConfig,
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
    /// The I/O engine of the disk's queues.
    #[serde(default)]
    pub engine: Engine,
    /// Request queues the guest sees (VIRTIO_BLK_F_MQ): 1 to 16; unset, the vCPU count
    /// (at most 16). Every queue is served on the disk's one I/O thread.
    pub num_queues: Option<u16>,
    /// Open the image with O_DIRECT, past the host's page cache (refused where the file
    /// system cannot, e.g. tmpfs).
    #[serde(default)]
    pub direct: bool,
    /// Interrupt coalescing: the longest, in microseconds, a completed request waits for
    /// others of its queue still in flight before the guest is interrupted (0: at once; a
    /// queue with nothing else in flight always signals at once). At most 10,000.
    #[serde(default)]
    pub coalesce_us: u32,
    /// Threads of the disk's hook pool, which runs the pre hooks when every instance of
    /// the chain declares `F_CONCURRENT` (0, the default: none, every hook on the I/O
    /// thread; measured not to pay yet: docs/architecture.md). At most 64.
    pub hook_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub id: String,
    /// The host tap interface: opened if it exists, created otherwise.
    pub tap: String,
    /// The guest's MAC address, `52:54:00:12:34:56` (unicast, not all zero).
    pub mac: String,
    /// The link's MTU (68 to 9000; default 1500). The guest is told this less what its
    /// interceptors may add to a frame.
    pub mtu: Option<u16>,
    /// Interceptor instance ids, top (nearest the guest) to bottom (nearest the tap).
    #[serde(default)]
    pub interceptors: Vec<String>,
}

/// The largest `mtu` of a `[[net]]` (a jumbo frame).
pub const MAX_MTU: u16 = 9000;

impl NetConfig {
    /// The MAC address, parsed.
    pub fn mac_bytes(&self) -> Result<[u8; 6], String> {
        let parts: Vec<&str> = self.mac.split(':').collect();
        let bad = || {
            format!(
                "{} is not a MAC address like 52:54:00:12:34:56",
                quoted(&self.mac)
            )
        };
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("{} is a multicast address", quoted(&self.mac)));
        }
        if mac == [0; 6] {
            return Err("00:00:00:00:00:00 is not an address".into());
        }
        Ok(mac)
    }

    pub fn link_mtu(&self) -> u16 {
        self.mtu.unwrap_or(devices::virtio::net::DEFAULT_MTU)
    }
}

impl BlockConfig {
    /// The queues this disk offers on a machine of `vcpus`.
    pub fn queues(&self, vcpus: u32) -> u16 {
        self.num_queues.unwrap_or_else(|| {
            u16::try_from(vcpus.clamp(1, u32::from(devices::virtio::block::MAX_QUEUES)))
                .unwrap_or(1)
        })
    }
}

/// `engine` of a `[[block]]`: `"auto"` (io_uring where the host allows it, else the
/// synchronous engine, said once at start), `"io_uring"` (an error where the host refuses
/// it) or `"sync"` (blocking preadv/pwritev on the disk's thread).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Auto,
    IoUring,
    Sync,
}

impl Engine {
    pub fn choice(self) -> block::EngineChoice {
        match self {
            Engine::Auto => block::EngineChoice::Auto,
            Engine::IoUring => block::EngineChoice::IoUring,
            Engine::Sync => block::EngineChoice::Sync,
        }
    }
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

/// `text` for a one-line message: control characters escaped, cut after `max` characters.
pub fn clip(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A config string quoted for a message, clipped.
fn quoted(text: &str) -> String {
    format!("\"{}\"", clip(text, ECHO_MAX))
}

/// A path for a message, clipped.
fn shown(path: &Path) -> String {
    clip(&path.display().to_string(), 2 * ECHO_MAX)
}

impl VmConfig {
    /// Reads and parses `path`, resolving relative paths against its directory. Only a
    /// regular file of at most [`MAX_CONFIG_BYTES`] is read, opened without blocking (a
    /// FIFO must not hang the start, a device like /dev/zero must not be read forever).
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let file = path.display().to_string();
        let text = read_bounded(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut cfg = VmConfig::parse(&text, &file)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Parses TOML text; `file` names it in errors. The error is one bounded line: the
    /// line and column, toml's message and the start of the line it is on, clipped.
    pub fn parse(text: &str, file: &str) -> Result<VmConfig, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
            file: file.to_string(),
            message: parse_message(text, &e),
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
        // A tap is a name, not a path.
        for i in &mut self.interceptor {
            fix(&mut i.path);
            i.resolve_files(base);
        }
        self.landlock.resolve_paths(base);
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
        let max_vcpus = host.max_vcpus.min(MAX_VCPUS);
        if m.vcpus > max_vcpus {
            return Err(invalid(
                "machine.vcpus",
                format!("{} is over this host's limit of {max_vcpus}", m.vcpus),
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
        if m.memory_mib > MAX_MEMORY_MIB {
            return Err(invalid(
                "machine.memory_mib",
                format!(
                    "{} MiB is more than the most a guest may have ({MAX_MEMORY_MIB} MiB)",
                    m.memory_mib
                ),
            ));
        }
        require_file(&self.kernel.path).map_err(|e| invalid("kernel.path", e))?;
        let kernel = kernel_kind(&self.kernel.path).map_err(|e| invalid("kernel.path", e))?;
        self.validate_cmdline(&kernel)
            .map_err(|e| invalid("kernel.cmdline", e))?;
        if let Some(initrd) = &self.kernel.initrd {
            require_file(initrd).map_err(|e| invalid("kernel.initrd", e))?;
            check_initrd(initrd, m.memory_mib).map_err(|e| invalid("kernel.initrd", e))?;
        }
        if self.block.len() > MAX_BLOCKS {
            return Err(invalid(
                "block",
                format!(
                    "{} disks; a guest has at most {MAX_BLOCKS} (one interrupt line each)",
                    self.block.len()
                ),
            ));
        }
        if self.block.len() + self.net.len() > MAX_BLOCKS {
            return Err(invalid(
                "net",
                format!(
                    "{} disks and {} network cards; a guest has at most {MAX_BLOCKS} devices \
                     (one interrupt line each)",
                    self.block.len(),
                    self.net.len()
                ),
            ));
        }
        let mut ids = HashSet::new();
        for (i, b) in self.block.iter().enumerate() {
            let field = |name: &str| format!("block[{i}].{name}");
            if !valid_id(&b.id) {
                return Err(invalid(&field("id"), bad_id(&b.id)));
            }
            if !ids.insert(b.id.as_str()) {
                return Err(invalid(
                    &field("id"),
                    format!("{} is used twice", quoted(&b.id)),
                ));
            }
            require_file(&b.path).map_err(|e| invalid(&field("path"), e))?;
            let max_queues = devices::virtio::block::MAX_QUEUES;
            if b.num_queues.is_some_and(|n| n == 0 || n > max_queues) {
                return Err(invalid(
                    &field("num_queues"),
                    format!("must be 1 to {max_queues}"),
                ));
            }
            let max_coalesce = devices::virtio::block::MAX_COALESCE_US;
            if b.coalesce_us > max_coalesce {
                return Err(invalid(
                    &field("coalesce_us"),
                    format!("must be 0 to {max_coalesce} (microseconds)"),
                ));
            }
            if b.hook_threads
                .is_some_and(|n| n > compat::MAX_HOOK_THREADS_SET)
            {
                return Err(invalid(
                    &field("hook_threads"),
                    format!("must be 0 to {}", compat::MAX_HOOK_THREADS_SET),
                ));
            }
            if b.interceptors.len() > compat::MAX_CHAIN {
                return Err(invalid(
                    &field("interceptors"),
                    format!(
                        "{} instances; a chain has at most {}",
                        b.interceptors.len(),
                        compat::MAX_CHAIN
                    ),
                ));
            }
        }
        let mut taps = HashSet::new();
        for (i, n) in self.net.iter().enumerate() {
            let field = |name: &str| format!("net[{i}].{name}");
            if !valid_id(&n.id) {
                return Err(invalid(&field("id"), bad_id(&n.id)));
            }
            if !ids.insert(n.id.as_str()) {
                return Err(invalid(
                    &field("id"),
                    format!("{} is used twice", quoted(&n.id)),
                ));
            }
            let tap_ok = (1..=devices::virtio::net::tap::MAX_NAME).contains(&n.tap.len())
                && n.tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !tap_ok {
                return Err(invalid(
                    &field("tap"),
                    format!(
                        "{} must be 1 to {} characters of [A-Za-z0-9_.-]",
                        quoted(&n.tap),
                        devices::virtio::net::tap::MAX_NAME
                    ),
                ));
            }
            if !taps.insert(n.tap.as_str()) {
                return Err(invalid(
                    &field("tap"),
                    format!("{} serves another [[net]]", quoted(&n.tap)),
                ));
            }
            n.mac_bytes().map_err(|e| invalid(&field("mac"), e))?;
            let min = devices::virtio::net::MIN_MTU;
            if n.mtu.is_some_and(|m| !(min..=MAX_MTU).contains(&m)) {
                return Err(invalid(
                    &field("mtu"),
                    format!("must be {min} to {MAX_MTU}"),
                ));
            }
            if n.interceptors.len() > compat::MAX_CHAIN {
                return Err(invalid(
                    &field("interceptors"),
                    format!(
                        "{} instances; a chain has at most {}",
                        n.interceptors.len(),
                        compat::MAX_CHAIN
                    ),
                ));
            }
        }
        self.landlock
            .validate()
            .map_err(|(field, message)| invalid(&field, message))?;
        self.validate_interceptors(file)
    }

    /// The command line: printable ASCII only (the boot protocol passes bytes, the kernel
    /// parses words; a NUL would end it early), and short enough for the kernel with the
    /// words the VMM adds for each disk.
    fn validate_cmdline(&self, kernel: &KernelKind) -> Result<(), String> {
        let cmdline = &self.kernel.cmdline;
        if let Some((at, c)) = cmdline
            .char_indices()
            .find(|&(_, c)| !(' '..='~').contains(&c))
        {
            return Err(format!(
                "byte {at} is {}: only printable ASCII (space to '~') may appear",
                clip(&c.escape_unicode().to_string(), 12)
            ));
        }
        let limit = match kernel {
            KernelKind::BzImage {
                cmdline_size: Some(n),
            } if *n > 0 => MAX_CMDLINE.min(*n),
            _ => MAX_CMDLINE,
        }
        .min(CMDLINE_MAX - 1);
        let added = (self.block.len() + self.net.len()).saturating_mul(CMDLINE_PER_DISK);
        let room = limit.saturating_sub(added);
        if cmdline.len() > room && self.block.is_empty() {
            return Err(format!(
                "{} bytes is longer than the {limit} the boot protocol allows",
                cmdline.len()
            ));
        }
        if cmdline.len() > room {
            return Err(format!(
                "{} bytes is longer than the {room} the boot protocol leaves ({limit}, less \
                 {CMDLINE_PER_DISK} for each of the {} disks' virtio_mmio.device= words)",
                cmdline.len(),
                self.block.len()
            ));
        }
        Ok(())
    }
}

/// A config file's text: a regular file, opened without blocking, at most
/// [`MAX_CONFIG_BYTES`], UTF-8.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let too_big = || {
        Error::new(
            ErrorKind::InvalidData,
            format!(
                "larger than {} KiB, the most a config may be",
                MAX_CONFIG_BYTES >> 10
            ),
        )
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    // Bounded even if the file grows while it is read.
    (&file).take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::new(
            ErrorKind::InvalidData,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

/// toml's error as one bounded line: where, what, and the start of that line of the file.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let what = clip(
        &e.message().split_whitespace().collect::<Vec<_>>().join(" "),
        2 * ECHO_MAX,
    );
    let Some(span) = e.span() else {
        return what;
    };
    let at = span.start.min(text.len());
    let before = text.get(..at).unwrap_or("");
    let line = before.matches('\n').count().saturating_add(1);
    let line_start = before.rfind('\n').map_or(0, |i| i.saturating_add(1));
    let column = text
        .get(line_start..at)
        .map_or(0, |s| s.chars().count())
        .saturating_add(1);
    let source = text
        .get(line_start..)
        .and_then(|s| s.lines().next())
        .unwrap_or("")
        .trim();
    if source.is_empty() {
        format!("line {line}, column {column}: {what}")
    } else {
        format!(
            "line {line}, column {column}: {what} (at `{}`)",
            clip(source, ECHO_MAX)
        )
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
}

fn bad_id(id: &str) -> String {
    format!(
        "{}: use 1 to {MAX_ID_LEN} letters, digits, '-' and '_'",
        quoted(id)
    )
}

fn require_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || is_block_device(&m) => Ok(()),
        Ok(_) => Err(format!("{} is not a file", shown(path))),
        Err(e) => Err(format!("{}: {e}", shown(path))),
    }
}

fn is_block_device(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_block_device()
}

#[cfg(test)]
mod tests;
