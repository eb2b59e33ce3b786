//! What the config's kernel and initrd files are: the kernel's format from its header (a
//! bzImage's command-line limit with it), an initrd that fits the guest's memory, and the
//! host's memory to bound the guest's.

use super::*;

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
pub(super) fn check_initrd(path: &Path, memory_mib: u64) -> Result<(), String> {
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
