//! Builds the VM from a validated config and runs it until the guest resets.

use crate::config::VmConfig;
use crate::layout::*;
use crate::storage::Disk;
use crate::vcpu::Vcpu;
use crate::{boot, cpu, memory, mptable};
use anyhow::{bail, Context, Result};
use devices::bus::Bus;
use devices::legacy::{SerialConsole, I8042, I8042_PORT, SERIAL_IRQ, SERIAL_PORT};
use devices::virtio::block::Block;
use devices::virtio::{Interrupt, MmioTransport, MMIO_SIZE};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// QueueNotify register offset in a virtio-mmio window.
const VIRTIO_MMIO_NOTIFY: u64 = 0x50;

/// How the guest ended.
pub enum Outcome {
    Reset,
    Error,
}

pub fn eventfd() -> Result<EventFd> {
    EventFd::new(0).context("eventfd")
}

/// Adds the virtio-blk devices; returns the kernel command-line words announcing them.
fn add_block_devices(
    disks: &[Disk],
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
) -> Result<Vec<String>> {
    let mut announce = Vec::new();
    for (i, b) in disks.iter().enumerate() {
        let gsi = VIRTIO_IRQ_BASE + i as u32;
        if gsi > MAX_IRQ {
            bail!(
                "too many block devices (at most {})",
                MAX_IRQ - VIRTIO_IRQ_BASE + 1
            );
        }
        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE;
        let irq = eventfd()?;
        vm.register_irqfd(&irq, gsi).context("KVM_IRQFD")?;
        let kick = eventfd()?;
        vm.register_ioevent(
            &kick,
            &IoEventAddress::Mmio(base + VIRTIO_MMIO_NOTIFY),
            NoDatamatch,
        )
        .context("KVM_IOEVENTFD")?;
        let device = Box::new(Block::new(&b.id, b.stack.clone(), b.read_only));
        let transport = MmioTransport::new(
            device,
            mem.clone(),
            Arc::new(Interrupt::new(irq)),
            vec![kick],
        )
        .map_err(|e| anyhow::anyhow!("block {}: queue setup: {e:?}", b.id))?;
        mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)?;
        announce.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    Ok(announce)
}

/// Feeds the host's stdin to the serial console (for `shell` guests).
fn spawn_stdin(serial: Arc<Mutex<SerialConsole>>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let mut rest = &buf[..n];
                        while !rest.is_empty() {
                            let taken = serial
                                .lock()
                                .map(|mut s| s.enqueue_input(rest))
                                .unwrap_or(0);
                            rest = &rest[taken..];
                            if taken == 0 {
                                std::thread::sleep(std::time::Duration::from_millis(5));
                            }
                        }
                    }
                }
            }
        });
}

/// Runs the guest until it resets, a vCPU fails, or something writes `exit` (the API's
/// shutdown action).
pub fn run(cfg: &VmConfig, disks: &[Disk], exit: &EventFd) -> Result<Outcome> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    vm.set_tss_address(TSS_ADDR as usize)
        .context("KVM_SET_TSS_ADDR")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .context("KVM_CREATE_PIT2")?;
    let mem = memory::create(&vm, cfg.machine.memory_mib << 20)?;

    let mut pio = Bus::new();
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .context("KVM_IRQFD (serial)")?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        Box::new(std::io::stdout()),
    )));
    pio.insert(serial.clone(), SERIAL_PORT, 8)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.try_clone()?))),
        I8042_PORT,
        5,
    )?;
    spawn_stdin(serial);

    let mut mmio = Bus::new();
    let announce = add_block_devices(disks, &vm, &mem, &mut mmio)?;
    let mut cmdline = cfg.kernel.cmdline.clone();
    for word in announce {
        cmdline.push(' ');
        cmdline.push_str(&word);
    }
    let entry = boot::load(
        &mem,
        &cfg.kernel.path,
        cfg.kernel.initrd.as_deref(),
        cmdline.trim(),
    )?;

    let count = cfg.machine.vcpus as u8;
    mptable::write(&mem, count)?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let failed = Arc::new(AtomicBool::new(false));
    let mut vcpus = Vec::new();
    for id in 0..count {
        let fd = vm.create_vcpu(u64::from(id)).context("KVM_CREATE_VCPU")?;
        cpu::set_cpuid(&kvm, &fd, id, count)?;
        cpu::set_msrs(&fd)?;
        cpu::set_fpu(&fd)?;
        cpu::set_lint(&fd)?;
        if id == 0 {
            cpu::set_boot_state(&fd, &mem, entry.rip)?;
        }
        vcpus.push(Vcpu {
            id,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.try_clone()?,
            failed: failed.clone(),
        });
    }
    for v in vcpus {
        let id = v.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || v.run())
            .with_context(|| format!("starting vcpu{id}"))?;
    }
    // The first vCPU or device to finish wakes us; the process exit stops the others.
    exit.read().context("waiting for the guest")?;
    Ok(if failed.load(Ordering::SeqCst) {
        Outcome::Error
    } else {
        Outcome::Reset
    })
}
