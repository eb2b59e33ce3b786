//! Guest physical memory layout (x86_64, Linux boot protocol).

/// GDT and IDT for the 64-bit entry.
pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x520;
/// The zero page (struct boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapped page tables for the first 1 GiB.
pub const PML4: u64 = 0x9000;
pub const PDPTE: u64 = 0xa000;
pub const PDE: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the extended BIOS data area: the MP table goes here; RAM below it.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: no RAM from 3 GiB to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio windows, one page each, from here.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio-mmio device; the serial console uses 4.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest GSI the IOAPIC has.
pub const MAX_IRQ: u32 = 23;
/// KVM's TSS (three pages), inside the MMIO hole.
pub const TSS_ADDR: u64 = 0xfffb_d000;
