//! Loads the kernel (bzImage, or ELF vmlinux), the initrd and the command line, and writes
//! the zero page with its e820 map.

use crate::layout::*;
use anyhow::{bail, Context, Result};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, KernelLoader};
use std::fs::File;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Where the boot vCPU starts.
pub struct BootEntry {
    pub rip: u64,
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64) -> Result<()> {
    let i = params.e820_entries as usize;
    if i >= params.e820_table.len() {
        bail!("too many e820 entries");
    }
    params.e820_table[i] = boot_e820_entry {
        addr,
        size,
        r#type: E820_RAM,
    };
    params.e820_entries += 1;
    Ok(())
}

/// Where an initrd of `size` bytes goes: at the top of low RAM (below `low_end`),
/// page-aligned, above the kernel's end; None when it does not fit there.
fn initrd_addr(low_end: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let addr = low_end.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry> {
    let mut file =
        File::open(kernel).with_context(|| format!("opening kernel {}", kernel.display()))?;
    let himem = Some(GuestAddress(HIMEM_START));
    // A bzImage enters at its 64-bit entry, 0x200 past the load address; an ELF vmlinux at
    // its ELF entry.
    let (loaded, rip) = match BzImage::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let rip = r
                .kernel_load
                .0
                .checked_add(0x200)
                .context("the bzImage's load address")?;
            (r, rip)
        }
        Err(bz) => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(|elf| {
                anyhow::anyhow!(
                    "{}: neither a bzImage ({bz}) nor an ELF kernel ({elf})",
                    kernel.display()
                )
            })?;
            let rip = r.kernel_load.0;
            (r, rip)
        }
    };

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    let mut cl = Cmdline::new(CMDLINE_MAX).context("command line buffer")?;
    cl.insert_str(cmdline).context("kernel command line")?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cl).context("writing the command line")?;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline
        .len()
        .checked_add(1)
        .and_then(|n| u32::try_from(n).ok())
        .context("kernel command line length")?;

    // RAM: below the EBDA, then from 1 MiB up (split by the MMIO hole if needed).
    let ram_end = mem
        .last_addr()
        .0
        .checked_add(1)
        .context("guest memory ends at the top of the address space")?;
    add_e820(&mut params, 0, EBDA_START)?;
    let low_end = ram_end.min(MMIO_GAP_START);
    let low_size = low_end
        .checked_sub(HIMEM_START)
        .context("guest memory ends below 1 MiB")?;
    add_e820(&mut params, HIMEM_START, low_size)?;
    if let Some(high_size) = ram_end.checked_sub(MMIO_GAP_END).filter(|&s| s > 0) {
        add_e820(&mut params, MMIO_GAP_END, high_size)?;
    }

    if let Some(path) = initrd {
        let mut f =
            File::open(path).with_context(|| format!("opening initrd {}", path.display()))?;
        let size = f.metadata()?.len();
        let too_big = || {
            anyhow::anyhow!(
                "initrd {} ({size} bytes) does not fit in guest memory: {} bytes are free \
                 between the kernel's end and the top of low memory",
                path.display(),
                low_end.saturating_sub(loaded.kernel_end)
            )
        };
        let addr = initrd_addr(low_end, loaded.kernel_end, size).ok_or_else(too_big)?;
        let (image, ramdisk_size, len) = match (
            u32::try_from(addr),
            u32::try_from(size),
            usize::try_from(size),
        ) {
            (Ok(a), Ok(s), Ok(l)) => (a, s, l),
            _ => return Err(too_big()),
        };
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
            .with_context(|| format!("loading initrd {}", path.display()))?;
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = ramdisk_size;
    }

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .context("writing the zero page")?;
    Ok(BootEntry { rip })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest ELF vmlinux linux-loader takes: one PT_LOAD of 16 bytes at 1 MiB.
    fn tiny_elf_kernel() -> Vec<u8> {
        let mut k = vec![0u8; 64 + 56 + 16];
        k[..4].copy_from_slice(b"\x7fELF");
        k[4] = 2; // 64-bit
        k[5] = 1; // little-endian
        k[6] = 1; // version
        k[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        k[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        k[20..24].copy_from_slice(&1u32.to_le_bytes());
        k[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // e_entry
        k[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        k[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        k[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        k[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut k[64..120];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&16u64.to_le_bytes()); // p_memsz
        k
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-boot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// An initrd larger than the guest's low memory used to panic on `low_end - size`
    /// (or, in a release build, wrap and load it at a wild address); it is a clear error.
    #[test]
    fn an_oversized_initrd_is_an_error_not_a_panic() {
        let dir = scratch("initrd");
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, tiny_elf_kernel()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let initrd = dir.join("initrd");
        let f = File::create(&initrd).unwrap();
        for (size, fits) in [
            (100u64 << 20, false),
            (64 << 20, false),
            ((63 << 20) - 16, false),
            (1 << 40, false),
            (1 << 20, true),
        ] {
            f.set_len(size).unwrap();
            let r = load(&mem, &kernel, Some(&initrd), "console=ttyS0");
            match (r, fits) {
                (Ok(_), true) => {}
                (Err(e), false) => {
                    let e = format!("{e:#}");
                    assert!(e.contains(&format!("({size} bytes) does not fit")), "{e}");
                }
                (r, _) => panic!("{size}: {:?}", r.err()),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_initrd_goes_page_aligned_at_the_top_of_low_memory_above_the_kernel() {
        assert_eq!(
            initrd_addr(64 << 20, 2 << 20, 4096),
            Some((64 << 20) - 4096)
        );
        assert_eq!(
            initrd_addr(64 << 20, 2 << 20, 4097),
            Some((64 << 20) - 8192)
        );
        assert_eq!(initrd_addr(64 << 20, 2 << 20, (62 << 20) + 1), None);
        assert_eq!(initrd_addr(64 << 20, 2 << 20, 62 << 20), Some(2 << 20));
        assert_eq!(initrd_addr(64 << 20, 2 << 20, u64::MAX), None);
    }
}
