//! The Intel MultiProcessor table (MPS 1.4): tells the guest its CPUs, the IOAPIC and how
//! the ISA interrupts 0-23 reach it. Without it (and without ACPI) Linux sees one CPU and
//! no IOAPIC.

use crate::layout::{EBDA_START, MAX_IRQ};
use anyhow::{bail, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `cpus` vCPUs, to live at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > 254 {
        bail!("MP table: {cpus} CPUs is out of range");
    }
    let ioapic_id = cpus; // APIC IDs 0..cpus are the CPUs
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = vec![
            0u8,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 },
        ];
        e.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        e.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        e.extend_from_slice(&[0u8; 8]);
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for irq in 0..=MAX_IRQ as u8 {
        // type, irq type, flags (conforming), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]); // LINT0 of CPU 0
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]); // LINT1 of all CPUs
    count += 2;

    let table_addr = base + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"VMM         ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4, checksum, features
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<()> {
    let bytes = build(cpus, EBDA_START)?;
    if EBDA_START + bytes.len() as u64 > 0xa0000 {
        bail!("MP table for {cpus} CPUs does not fit below 640 KiB");
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .context("writing the MP table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 8] {
            let b = build(cpus, EBDA_START).unwrap();
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let table = &b[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
            assert_eq!(
                u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64,
                EBDA_START + 16
            );
        }
        assert!(build(0, EBDA_START).is_err());
    }
}
