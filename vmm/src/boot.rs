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
            let rip = r.kernel_load.0 + 0x200;
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
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    // RAM: below the EBDA, then from 1 MiB up (split by the MMIO hole if needed).
    let ram_end = mem.last_addr().0 + 1;
    add_e820(&mut params, 0, EBDA_START)?;
    let low_end = ram_end.min(MMIO_GAP_START);
    add_e820(&mut params, HIMEM_START, low_end - HIMEM_START)?;
    if ram_end > MMIO_GAP_END {
        add_e820(&mut params, MMIO_GAP_END, ram_end - MMIO_GAP_END)?;
    }

    if let Some(path) = initrd {
        let mut f =
            File::open(path).with_context(|| format!("opening initrd {}", path.display()))?;
        let size = f.metadata()?.len();
        // At the top of low RAM, page-aligned, above the kernel.
        let addr = (low_end - size) & !0xfff;
        if size >= low_end || addr < loaded.kernel_end {
            bail!(
                "initrd {} ({size} bytes) does not fit in guest memory",
                path.display()
            );
        }
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .with_context(|| format!("loading initrd {}", path.display()))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .context("writing the zero page")?;
    Ok(BootEntry { rip })
}
