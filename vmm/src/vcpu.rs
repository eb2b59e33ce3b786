//! The vCPU threads: run KVM_RUN, route port and MMIO exits to the buses, and report how
//! the guest ended (reset, shutdown, or an error).

use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// How a vCPU's run loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest reset or shut down: its normal exit.
    Reset,
    /// KVM failed or the guest did something we cannot run.
    Error,
    /// The VMM stopped it (shutdown by signal or API); it wakes nobody.
    Stopped,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing: the
/// interrupted KVM_RUN returns EINTR and the loop sees `stop`).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler (once, before the vCPU threads start).
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// Wakes the main thread. Only a wakeup: eventfd adds up concurrent writes (a reset
    /// command and the triple fault after it), so the value carries no meaning.
    pub exit: EventFd,
    /// Set before waking the main thread when this vCPU failed.
    pub failed: Arc<AtomicBool>,
    /// Set by the main thread to stop every vCPU (then it sends the kick signal).
    pub stop: Arc<AtomicBool>,
    /// The API's requests for this vCPU's state (`GET /vm/vcpus`), answered between runs.
    pub probe: Arc<crate::probe::VcpuProbe>,
}

impl Vcpu {
    pub fn run(mut self) {
        let end = self.run_loop();
        // Before the thread can be joined: the API kicks it no more.
        self.probe.retire();
        match end {
            VcpuEnd::Stopped => return,
            VcpuEnd::Error => self.failed.store(true, Ordering::SeqCst),
            VcpuEnd::Reset => {}
        }
        let _ = self.exit.write(1);
    }

    fn run_loop(&mut self) -> VcpuEnd {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return VcpuEnd::Stopped;
            }
            self.probe.serve(self.id, &self.fd);
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff); // nothing there: the bus floats high
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Hlt) => {}
                // A triple fault resets a PC; the guest's reset is its exit.
                Ok(VcpuExit::Shutdown) => return VcpuEnd::Reset,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    tracing::info!("vcpu{}: system event {kind}", self.id);
                    return VcpuEnd::Reset;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    eprintln!(
                        "vmm: vcpu{}: KVM entry failed (reason {reason:#x}, cpu {cpu})",
                        self.id
                    );
                    return VcpuEnd::Error;
                }
                Ok(VcpuExit::InternalError) => {
                    eprintln!("vmm: vcpu{}: KVM internal error", self.id);
                    return VcpuEnd::Error;
                }
                Ok(other) => {
                    eprintln!("vmm: vcpu{}: unexpected exit {other:?}", self.id);
                    return VcpuEnd::Error;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    eprintln!("vmm: vcpu{}: KVM_RUN failed: {e}", self.id);
                    return VcpuEnd::Error;
                }
            }
        }
    }
}
