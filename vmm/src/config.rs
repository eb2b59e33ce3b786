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

    /// Instance ids are unique; each chain names known instances; an instance serves one
    /// disk (it sits over that disk's layers below); pins are BLAKE3 hex.
    fn validate_interceptors(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            message,
        };
        if self.interceptor.len() > MAX_INTERCEPTORS {
            return Err(invalid(
                "interceptor".into(),
                format!(
                    "{} entries; at most {MAX_INTERCEPTORS} (a full chain on every disk)",
                    self.interceptor.len()
                ),
            ));
        }
        let mut ids = HashSet::new();
        for (i, ic) in self.interceptor.iter().enumerate() {
            if !valid_id(&ic.id) {
                return Err(invalid(format!("interceptor[{i}].id"), bad_id(&ic.id)));
            }
            if !ids.insert(ic.id.as_str()) {
                return Err(invalid(
                    format!("interceptor[{i}].id"),
                    format!("{} is used twice", quoted(&ic.id)),
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
        let chains = self
            .block
            .iter()
            .enumerate()
            .map(|(i, b)| ("block", i, &b.id, &b.interceptors))
            .chain(
                self.net
                    .iter()
                    .enumerate()
                    .map(|(i, n)| ("net", i, &n.id, &n.interceptors)),
            );
        for (kind, i, device, chain) in chains {
            for (j, id) in chain.iter().enumerate() {
                let field = format!("{kind}[{i}].interceptors[{j}]");
                if !ids.contains(id.as_str()) {
                    return Err(invalid(
                        field,
                        format!("no [[interceptor]] has id {}", quoted(id)),
                    ));
                }
                if let Some(other) = used.insert(id, device) {
                    return Err(invalid(
                        field,
                        format!(
                            "{} already serves device {}; an instance serves one device (add another [[interceptor]] with the same path)",
                            quoted(id),
                            quoted(other)
                        ),
                    ));
                }
            }
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

/// What kind of kernel a file holds, from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelKind {
    /// A bzImage ("HdrS" at 0x202); `cmdline_size` from its header (boot protocol 2.06 on).
    BzImage { cmdline_size: Option<usize> },
    /// A 64-bit little-endian ELF vmlinux.
    Elf,
}

/// Where the setup header's magic is, and what it says.
const HDRS_OFFSET: usize = 0x202;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const BOOT_VERSION_OFFSET: usize = 0x206;
const CMDLINE_SIZE_OFFSET: usize = 0x238;

/// Reads the start of `path` and says which kernel it is, or why it is none.
pub fn kernel_kind(path: &Path) -> Result<KernelKind, String> {
    let mut head = Vec::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .and_then(|f| {
            f.take(CMDLINE_SIZE_OFFSET as u64 + 4)
                .read_to_end(&mut head)
        })
        .map_err(|e| format!("{}: {e}", shown(path)))?;
    let u16_at = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(HDRS_MAGIC) {
        let cmdline_size = match u16_at(BOOT_VERSION_OFFSET) {
            Some(v) if v >= 0x0206 => u32_at(CMDLINE_SIZE_OFFSET).map(|n| n as usize),
            _ => None,
        };
        return Ok(KernelKind::BzImage { cmdline_size });
    }
    if head.starts_with(b"\x7fELF") {
        // EI_CLASS 2: 64-bit; EI_DATA 1: little-endian.
        return if head.get(4) == Some(&2) && head.get(5) == Some(&1) {
            Ok(KernelKind::Elf)
        } else {
            Err(format!(
                "{} is an ELF file but not a 64-bit little-endian one: not an x86-64 kernel",
                shown(path)
            ))
        };
    }
    Err(format!(
        "{} is not a kernel: neither a bzImage (no \"HdrS\" at 0x202) nor an ELF vmlinux",
        shown(path)
    ))
}

/// The initrd goes at the top of the guest's low memory, above the kernel (loaded at 1 MiB):
/// one that cannot fit there even beside the smallest kernel is refused here, naming it
/// (the boot checks it exactly against the kernel it loaded).
fn check_initrd(path: &Path, memory_mib: u64) -> Result<(), String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", shown(path)))?
        .len();
    let low_end = memory_mib
        .checked_mul(1 << 20)
        .map_or(MMIO_GAP_START, |b| b.min(MMIO_GAP_START));
    let room = low_end.saturating_sub(HIMEM_START);
    if size >= room {
        return Err(format!(
            "{} is {size} bytes, more than the guest's low memory holds above the kernel \
             ({room} bytes with memory_mib = {memory_mib})",
            shown(path)
        ));
    }
    Ok(())
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

    /// The start of a bzImage: its setup header's magic, boot protocol 2.15 and the
    /// command-line size it takes; enough for `validate`, not to boot.
    fn fake_bzimage(cmdline_size: u32) -> Vec<u8> {
        let mut k = vec![0u8; 0x1000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
        k
    }

    fn dir_with_files() -> (tempdir::Dir, String) {
        let d = tempdir::Dir::new();
        std::fs::write(d.0.join("bzImage"), fake_bzimage(2047)).unwrap();
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
            (
                "path = \"disk2.img\"",
                "path = \"disk2.img\"\nnum_queues = 17",
                "block[1].num_queues",
            ),
            (
                "path = \"disk2.img\"",
                "path = \"disk2.img\"\ncoalesce_us = 10001",
                "block[1].coalesce_us",
            ),
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

    /// Two good cards, then each field of the second made wrong in turn: the error names
    /// the field and says what is wrong with the value.
    #[test]
    fn each_invalid_net_value_names_its_field_and_why() {
        let nets = format!(
            "{GOOD}\n[[net]]\nid = \"net0\"\ntap = \"vmtap0\"\nmac = \"52:54:00:00:00:01\"\n\
             [[net]]\nid = \"net1\"\ntap = \"vmtap1\"\nmac = \"52:54:00:00:00:02\"\nmtu = 9000\n"
        );
        let (r, _d) = load(&nets);
        r.unwrap();
        for (from, to, field, why) in [
            ("id = \"net1\"", "id = \"net0\"", "net[1].id", "used twice"),
            ("id = \"net1\"", "id = \"data\"", "net[1].id", "used twice"),
            ("id = \"net1\"", "id = \"a b\"", "net[1].id", "a b"),
            (
                "tap = \"vmtap1\"",
                "tap = \"vmtap0\"",
                "net[1].tap",
                "serves another",
            ),
            ("tap = \"vmtap1\"", "tap = \"\"", "net[1].tap", "1 to 15"),
            (
                "tap = \"vmtap1\"",
                "tap = \"a-tap-name-too-long\"",
                "net[1].tap",
                "1 to 15",
            ),
            (
                "tap = \"vmtap1\"",
                "tap = \"../x\"",
                "net[1].tap",
                "[A-Za-z0-9_.-]",
            ),
            (
                "mac = \"52:54:00:00:00:02\"",
                "mac = \"52:54:00:00:00\"",
                "net[1].mac",
                "not a MAC",
            ),
            (
                "mac = \"52:54:00:00:00:02\"",
                "mac = \"52:54:00:00:00:zz\"",
                "net[1].mac",
                "not a MAC",
            ),
            (
                "mac = \"52:54:00:00:00:02\"",
                "mac = \"52:54:00:00:00:002\"",
                "net[1].mac",
                "not a MAC",
            ),
            (
                "mac = \"52:54:00:00:00:02\"",
                "mac = \"01:00:5e:00:00:01\"",
                "net[1].mac",
                "multicast",
            ),
            (
                "mac = \"52:54:00:00:00:02\"",
                "mac = \"00:00:00:00:00:00\"",
                "net[1].mac",
                "not an address",
            ),
            ("mtu = 9000", "mtu = 67", "net[1].mtu", "68 to 9000"),
            ("mtu = 9000", "mtu = 9001", "net[1].mtu", "68 to 9000"),
            (
                "mtu = 9000",
                "mtu = 9000\ninterceptors = [\"nope\"]",
                "net[1]",
                "nope",
            ),
        ] {
            let text = nets.replace(from, to);
            assert_ne!(text, nets, "{from}");
            let e = err(&text);
            assert!(
                e.contains(field) && e.contains(why) && e.contains("guest.toml"),
                "{field}: {e}"
            );
        }
        for (text, why) in [
            (nets.replace("mtu = 9000", "mtu = 70000"), "mtu"),
            (nets.replace("mtu = 9000", "mtu = -1"), "mtu"),
            (
                nets.replace("mtu = 9000", "mtu = 9000\nqueues = 2"),
                "queues",
            ),
            (nets.replace("mac = \"52:54:00:00:00:02\"\n", ""), "mac"),
        ] {
            let e = err(&text);
            assert!(e.contains(why) && e.contains("guest.toml"), "{why}: {e}");
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

    fn err_with(text: &str, host: HostLimits) -> String {
        let (d, file) = dir_with_files();
        std::fs::write(&file, text).unwrap();
        let e = VmConfig::load(Path::new(&file))
            .and_then(|c| c.validate(&file, host))
            .unwrap_err()
            .to_string();
        drop(d);
        e
    }

    /// One line, bounded, naming the file and the field.
    fn assert_one_line(e: &str, field: &str) {
        assert!(
            e.contains("guest.toml") && e.contains(field),
            "{field}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.len() < 600, "{} bytes: {e}", e.len());
    }

    #[test]
    fn a_kernel_path_that_is_not_a_kernel_is_refused_naming_it() {
        let (d, file) = dir_with_files();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let mut elf32 = elf.clone();
        elf32[4] = 1;
        for (name, bytes, ok) in [
            ("k", b"k".to_vec(), false),
            ("text", b"#!/bin/sh\necho not a kernel\n".to_vec(), false),
            ("empty", Vec::new(), false),
            ("elf32", elf32, false),
            ("elf64", elf, true),
            ("bz", fake_bzimage(2047), true),
            ("short-bz", fake_bzimage(2047)[..0x210].to_vec(), true),
        ] {
            let path = d.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            let text = GOOD.replace("path = \"bzImage\"", &format!("path = {name:?}"));
            std::fs::write(&file, text).unwrap();
            let r = VmConfig::load(Path::new(&file)).and_then(|c| c.validate(&file, HOST));
            match (r, ok) {
                (Ok(()), true) => {}
                (Err(e), false) => {
                    let e = e.to_string();
                    assert_one_line(&e, "kernel.path");
                    assert!(e.contains("not") && e.contains(name), "{e}");
                }
                (r, _) => panic!("{name}: {r:?}"),
            }
        }
    }

    #[test]
    fn the_cmdline_is_printable_ascii_and_fits_the_boot_protocol_with_the_disks_words() {
        let with = |cmdline: &str| GOOD.replace("cmdline = \"console=ttyS0\"", cmdline);
        // GOOD has two disks: 80 bytes are kept for their words.
        let room = MAX_CMDLINE - 2 * CMDLINE_PER_DISK;
        load(&with(&format!("cmdline = \"{}\"", "a".repeat(room))))
            .0
            .unwrap();
        let e = err(&with(&format!("cmdline = \"{}\"", "a".repeat(room + 1))));
        assert_one_line(&e, "kernel.cmdline");
        assert!(
            e.contains(&format!("{} bytes is longer than the {room}", room + 1)),
            "{e}"
        );
        let e = err(&with(&format!("cmdline = \"{}\"", "a".repeat(300_000))));
        assert_one_line(&e, "kernel.cmdline");
        for bad in [
            r"a\u0000b",
            r"a\tb",
            r"a\nb",
            r"\u001b[31m",
            "caf\u{e9}",
            r"\u007f",
        ] {
            let e = err(&with(&format!("cmdline = \"{bad}\"")));
            assert_one_line(&e, "kernel.cmdline");
            assert!(e.contains("only printable ASCII"), "{bad}: {e}");
        }
        // A bzImage that takes less says so in its header.
        let (d, file) = dir_with_files();
        std::fs::write(d.0.join("bzImage"), fake_bzimage(255)).unwrap();
        std::fs::write(&file, with(&format!("cmdline = \"{}\"", "a".repeat(200)))).unwrap();
        let e = VmConfig::load(Path::new(&file))
            .and_then(|c| c.validate(&file, HOST))
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than the 175 "), "{e}");
    }

    #[test]
    fn the_config_file_must_be_a_regular_file_of_at_most_a_mib() {
        let d = tempdir::Dir::new();
        let fifo = d.0.join("fifo.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let big = d.0.join("big.toml");
        std::fs::write(&big, "#".repeat(MAX_CONFIG_BYTES as usize + 1)).unwrap();
        let binary = d.0.join("binary.toml");
        std::fs::write(&binary, b"[kernel]\npath = \"\xff\xfe\"\n").unwrap();
        for (path, want) in [
            (fifo.as_path(), "not a regular file"),
            (Path::new("/dev/zero"), "not a regular file"),
            (d.0.as_path(), "not a regular file"),
            (big.as_path(), "larger than 1024 KiB"),
            (binary.as_path(), "not UTF-8 text (byte 17)"),
        ] {
            let e = VmConfig::load(path).unwrap_err().to_string();
            assert!(
                e.starts_with(&path.display().to_string()) && e.contains(want),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn toml_errors_are_one_bounded_line_with_where_and_what() {
        let long = "x".repeat(200_000);
        for (text, want) in [
            (format!("{GOOD}\nbad = \"{long}"), "line 18"),
            (format!("{GOOD}\n{long} = 1"), "unknown field"),
            (
                GOOD.replace("vcpus = 2", "vcpus = \"two\""),
                "line 3, column 17",
            ),
            ("[kernel".to_string(), "line 1"),
            (
                format!("[kernel]\npath = \"\u{1b}[2J{long}\"\n"),
                "line 2, column 9",
            ),
        ] {
            let e = err(&text);
            assert!(
                e.contains("guest.toml") && e.contains(want),
                "{want}: {}",
                clip(&e, 300)
            );
            assert_eq!(e.lines().count(), 1, "{}", clip(&e, 300));
            assert!(e.len() < 400, "{} bytes: {}", e.len(), clip(&e, 300));
            assert!(!e.contains('\u{1b}'), "{e}");
        }
        let e = err(&GOOD.replace("vcpus = 2", "vcpus = \"two\""));
        assert!(e.contains("(at `vcpus = \"two\"`)"), "{e}");
    }

    #[test]
    fn an_initrd_too_large_for_the_guests_low_memory_is_refused() {
        let (d, file) = dir_with_files();
        let initrd = d.0.join("initrd");
        let f = std::fs::File::create(&initrd).unwrap();
        f.set_len(600 << 20).unwrap();
        let text = GOOD.replace("cmdline = \"console=ttyS0\"", "initrd = \"initrd\"");
        std::fs::write(&file, &text).unwrap();
        let e = VmConfig::load(Path::new(&file))
            .and_then(|c| c.validate(&file, HOST))
            .unwrap_err()
            .to_string();
        assert_one_line(&e, "kernel.initrd");
        assert!(
            e.contains("629145600 bytes, more than the guest's low memory"),
            "{e}"
        );
        f.set_len(100 << 20).unwrap();
        VmConfig::load(Path::new(&file))
            .and_then(|c| c.validate(&file, HOST))
            .unwrap();
    }

    #[test]
    fn counts_and_sizes_have_hard_bounds_whatever_the_host_says() {
        let big_host = HostLimits {
            max_vcpus: 100_000,
            available_mib: u64::MAX,
        };
        let e = err_with(&GOOD.replace("vcpus = 2", "vcpus = 255"), big_host);
        assert_one_line(&e, "machine.vcpus");
        let e = err_with(
            &GOOD.replace("memory_mib = 512", &format!("memory_mib = {}", u64::MAX)),
            big_host,
        );
        assert_one_line(&e, "machine.memory_mib");
        assert!(e.contains("the most a guest may have"), "{e}");
        // Twenty disks: one more than there are interrupt lines.
        let mut many = GOOD.replace("cmdline = \"console=ttyS0\"", "");
        for i in 0..MAX_BLOCKS - 1 {
            many.push_str(&format!("[[block]]\nid = \"d{i}\"\npath = \"disk.img\"\n"));
        }
        let e = err(&many);
        assert_one_line(&e, "block:");
        assert!(e.contains("20 disks; a guest has at most 19"), "{e}");
        let chain: Vec<String> = (0..=compat::MAX_CHAIN)
            .map(|i| format!("\"i{i}\""))
            .collect();
        let e = err(&GOOD.replace(
            "read_only = true",
            &format!("read_only = true\ninterceptors = [{}]", chain.join(", ")),
        ));
        assert_one_line(&e, "block[0].interceptors");
        // A huge id is refused, echoed clipped.
        let e = err(&GOOD.replace(
            "id = \"data\"",
            &format!("id = \"{}\"", "a".repeat(100_000)),
        ));
        assert_one_line(&e, "block[1].id");
        let e = err(&GOOD.replace(
            "id = \"data\"",
            &format!("id = \"{}\"", "é".repeat(100_000)),
        ));
        assert_one_line(&e, "block[1].id");
    }
}
