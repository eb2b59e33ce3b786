//! Builds the VM from a validated config and runs it until the guest resets.

use crate::config::VmConfig;
use crate::layout::*;
use crate::network::Nic;
use crate::probe::{KvmSlot, KvmView, VcpuProbe};
use crate::storage::Disk;
use crate::vcpu::Vcpu;
use crate::{boot, cpu, memory, mptable};
use anyhow::{bail, Context, Result};
use devices::bus::Bus;
use devices::legacy::{SerialConsole, I8042, I8042_PORT, SERIAL_IRQ, SERIAL_PORT};
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use devices::virtio::{
    Interrupt, MmioTransport, INTERRUPT_ACK_OFFSET, INTERRUPT_USED_RING, MMIO_SIZE,
};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
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
    /// SIGTERM or SIGINT: an orderly shutdown, as for a reset.
    Signal(i32),
}

/// SIGTERM and SIGINT, blocked in every thread (the mask is inherited, so this runs before
/// any thread starts) and read from a signalfd by the main thread: they become an orderly
/// shutdown instead of killing the process with requests in flight.
pub struct StopSignals(std::os::fd::OwnedFd);

impl StopSignals {
    pub fn block() -> Result<StopSignals> {
        // SAFETY: plain libc calls on a local, zero-initialized sigset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
            if fd < 0 {
                bail!("signalfd: {}", std::io::Error::last_os_error());
            }
            Ok(StopSignals(std::os::fd::FromRawFd::from_raw_fd(fd)))
        }
    }

    /// The signal that arrived (after `wait` said the fd is readable).
    fn read(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        // SAFETY: reads one signalfd_siginfo into a local of exactly that size.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n = libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            );
            (n == size as isize).then_some(info.ssi_signo as i32)
        }
    }
}

/// Waits until `exit` is written or a stop signal arrives.
fn wait(exit: &EventFd, signals: &StopSignals) -> Result<Option<i32>> {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: exit.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: polls two valid fds described by a local array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            bail!("waiting for the guest: {e}");
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Some(sig) = signals.read() {
                return Ok(Some(sig));
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = exit.read();
            return Ok(None);
        }
    }
}

/// Stops every vCPU thread: sets `stop`, then kicks each out of KVM_RUN until it ended
/// (a kick can land just before a thread enters KVM_RUN, so it repeats).
fn stop_vcpus(stop: &AtomicBool, threads: Vec<std::thread::JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    stop.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut left = threads;
    while !left.is_empty() && std::time::Instant::now() < deadline {
        for t in &left {
            if !t.is_finished() {
                // SAFETY: the thread has not been joined, so its pthread_t is valid.
                unsafe { libc::pthread_kill(t.as_pthread_t(), crate::vcpu::kick_signal()) };
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (done, running): (Vec<_>, Vec<_>) = left.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        left = running;
    }
    if !left.is_empty() {
        tracing::error!("{} vCPU thread(s) did not stop within 5 s", left.len());
    }
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
        let engines = std::mem::take(&mut *b.engines.lock().unwrap_or_else(|p| p.into_inner()));
        if engines.is_empty() {
            bail!("block {}: its engines are taken", b.id);
        }
        // One ioeventfd per queue: the guest writes the queue's index to QueueNotify.
        let mut kicks = Vec::with_capacity(engines.len());
        for q in 0..engines.len() as u32 {
            let kick = eventfd()?;
            vm.register_ioevent(&kick, &IoEventAddress::Mmio(base + VIRTIO_MMIO_NOTIFY), q)
                .context("KVM_IOEVENTFD")?;
            kicks.push(kick);
        }
        let device = Block::new(&b.id, b.stack.clone(), b.read_only, engines)
            .with_block_size(b.block_size)
            .with_queue_stats(b.queue_stats.clone())
            .with_interrupt_coalescing(b.coalesce)
            .with_context(|| format!("block {}: interrupt coalescing timers", b.id))?;
        let device = Box::new(device);
        // The guest's acknowledgement of a used-ring interrupt stays in KVM.
        let ack = eventfd()?;
        vm.register_ioevent(
            &ack,
            &IoEventAddress::Mmio(base + INTERRUPT_ACK_OFFSET),
            INTERRUPT_USED_RING,
        )
        .context("KVM_IOEVENTFD")?;
        let transport =
            MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irq)), kicks)
                .map_err(|e| anyhow::anyhow!("block {}: queue setup: {e:?}", b.id))?
                .with_kernel_ack(ack);
        mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)?;
        announce.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    Ok(announce)
}

/// Puts a virtio-net device on the MMIO bus for each card, after the `first` devices
/// already there; returns their `virtio_mmio.device=` words.
fn add_net_devices(
    nics: &[Nic],
    first: usize,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
) -> Result<Vec<String>> {
    let mut announce = Vec::new();
    for (i, n) in nics.iter().enumerate() {
        let slot = first + i;
        let gsi = VIRTIO_IRQ_BASE + slot as u32;
        if gsi > MAX_IRQ {
            bail!(
                "too many devices (at most {})",
                MAX_IRQ - VIRTIO_IRQ_BASE + 1
            );
        }
        let base = VIRTIO_MMIO_BASE + slot as u64 * MMIO_SIZE;
        let irq = eventfd()?;
        vm.register_irqfd(&irq, gsi).context("KVM_IRQFD")?;
        let mut kicks = Vec::with_capacity(2);
        for q in 0..2u32 {
            let kick = eventfd()?;
            vm.register_ioevent(&kick, &IoEventAddress::Mmio(base + VIRTIO_MMIO_NOTIFY), q)
                .context("KVM_IOEVENTFD")?;
            kicks.push(kick);
        }
        let Some(tap) = n.tap.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            bail!("net {}: its tap is taken", n.id);
        };
        let device = Net::new(
            &n.id,
            tap,
            n.mac,
            n.mtu,
            n.chain.clone(),
            n.io.clone(),
            n.counters.clone(),
        )
        .map_err(|e| anyhow::anyhow!(e))?
        .with_queue_stats(n.queue_stats.clone());
        let ack = eventfd()?;
        vm.register_ioevent(
            &ack,
            &IoEventAddress::Mmio(base + INTERRUPT_ACK_OFFSET),
            INTERRUPT_USED_RING,
        )
        .context("KVM_IOEVENTFD")?;
        let transport = MmioTransport::new(
            Box::new(device),
            mem.clone(),
            Arc::new(Interrupt::new(irq)),
            kicks,
        )
        .map_err(|e| anyhow::anyhow!("net {}: queue setup: {e:?}", n.id))?
        .with_kernel_ack(ack);
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
            crate::confine::current_thread(crate::seccomp::ThreadKind::Stdin);
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
/// `probe`, when given, is filled in once the VM and its vCPUs exist (the API reads KVM's
/// state through it).
pub fn run(
    cfg: &VmConfig,
    disks: &[Disk],
    nics: &[Nic],
    exit: &EventFd,
    signals: &StopSignals,
    probe: Option<&KvmSlot>,
) -> Result<Outcome> {
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
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

    let mut mmio = Bus::new();
    // Said once the VM will run (before the devices take the engines).
    let engine_line = crate::storage::engine_line(disks);
    let mut announce = add_block_devices(disks, &vm, &mem, &mut mmio)?;
    announce.extend(add_net_devices(nics, disks.len(), &vm, &mem, &mut mmio)?);
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
    // Only a VM that will run reads the host's stdin, and says which engine its disks use.
    if let Some(line) = engine_line {
        eprintln!("{line}");
    }
    spawn_stdin(serial);

    let count = cfg.machine.vcpus as u8;
    mptable::write(&mem, count)?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let failed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    crate::vcpu::install_kick_handler().context("installing the vCPU kick signal")?;
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
            stop: stop.clone(),
            probe: Arc::new(VcpuProbe::default()),
        });
    }
    let probes: Vec<Arc<VcpuProbe>> = vcpus.iter().map(|v| v.probe.clone()).collect();
    let mut threads = Vec::new();
    for v in vcpus {
        let id = v.id;
        let started = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                crate::confine::current_thread(crate::seccomp::ThreadKind::Vcpu);
                v.run()
            })
            .with_context(|| format!("starting vcpu{id}"));
        match started {
            Ok(t) => {
                use std::os::unix::thread::JoinHandleExt;
                probes[usize::from(id)].set_thread(t.as_pthread_t());
                threads.push(t);
            }
            Err(e) => {
                stop_vcpus(&stop, threads);
                return Err(e);
            }
        }
    }
    if let Some(slot) = probe {
        let _ = slot.set(KvmView {
            vm: vm.clone(),
            vcpus: probes,
        });
    }
    // The first vCPU to end (reset or failure), the API's shutdown or a stop signal wakes
    // us; then every vCPU stops before the disks are settled. Every thread has started:
    // the main thread takes its own filter now (a filter is inherited by later threads).
    crate::confine::current_thread(crate::seccomp::ThreadKind::Main);
    let woke = wait(exit, signals);
    stop_vcpus(&stop, threads);
    Ok(match woke? {
        Some(sig) => Outcome::Signal(sig),
        None if failed.load(Ordering::SeqCst) => Outcome::Error,
        None => Outcome::Reset,
    })
}
