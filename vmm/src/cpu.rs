//! vCPU state at boot: CPUID from the host's supported list, MSRs, FPU, 64-bit long mode
//! with identity-mapped page tables, and the local APIC's LINT pins.

use crate::layout::*;
use anyhow::{Context, Result};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;

/// Filters the host's supported CPUID for vCPU `id` of `count`.
pub fn set_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: u8, count: u8) -> Result<()> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    // KVM emulates the TSC-deadline timer but leaves its bit out of the supported list
    // (it is a capability). Without it the guest calibrates its local APIC timer against
    // the PIT at boot; where the host's timing jitters (a nested host) that check can fail,
    // and the guest then ticks on the PIT, a port I/O exit per timer event all its life.
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID, logical processor count, and the hypervisor bit.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31;
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            0xb => e.edx = u32::from(id), // x2APIC ID
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")
}

pub fn set_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),          // fast strings
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ];
    let msrs = Msrs::from_entries(&entries).context("MSR list")?;
    let n = vcpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
    if n != entries.len() {
        anyhow::bail!("KVM set {n} of {} boot MSRs", entries.len());
    }
    Ok(())
}

pub fn set_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("KVM_SET_FPU")
}

/// LINT0 delivers the PIC's ExtINT, LINT1 NMIs, as firmware would leave them.
pub fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 4;
    const MODE_EXTINT: u32 = 7;
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, byte) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *byte as _;
        }
    }
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU in 64-bit mode at `rip`, with the zero page in RSI.
pub fn set_boot_state(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Result<()> {
    // GDT: null, 64-bit code, data, TSS.
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64))
            .context("writing the GDT")?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))
        .context("writing the IDT")?;
    // Identity map of the first 1 GiB with 2 MiB pages.
    mem.write_obj(PDPTE | 3, GuestAddress(PML4))
        .context("page tables")?;
    mem.write_obj(PDE | 3, GuestAddress(PDPTE))
        .context("page tables")?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE + i * 8))
            .context("page tables")?;
    }

    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    sregs.cs = segment(0x08, 0xb, true);
    let data = segment(0x10, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut tr = segment(0x18, 0xb, false);
    tr.s = 0;
    sregs.tr = tr;
    sregs.cr3 = PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0001; // PG | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;

    let regs = kvm_regs {
        rflags: 2,
        rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")
}
