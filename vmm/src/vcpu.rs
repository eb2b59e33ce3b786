//! The vCPU threads: run KVM_RUN, route port and MMIO exits to the buses, and report how
//! the guest ended (reset, shutdown, or an error).

use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Values written to the VMM's exit eventfd.
pub const EXIT_RESET: u64 = 1;
pub const EXIT_ERROR: u64 = 2;

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: EventFd,
}

impl Vcpu {
    pub fn run(mut self) {
        let code = self.run_loop();
        let _ = self.exit.write(code);
    }

    fn run_loop(&mut self) -> u64 {
        loop {
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
                Ok(VcpuExit::Shutdown) => return EXIT_RESET,
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    tracing::info!("vcpu{}: system event {kind}", self.id);
                    return EXIT_RESET;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    eprintln!(
                        "vmm: vcpu{}: KVM entry failed (reason {reason:#x}, cpu {cpu})",
                        self.id
                    );
                    return EXIT_ERROR;
                }
                Ok(VcpuExit::InternalError) => {
                    eprintln!("vmm: vcpu{}: KVM internal error", self.id);
                    return EXIT_ERROR;
                }
                Ok(other) => {
                    eprintln!("vmm: vcpu{}: unexpected exit {other:?}", self.id);
                    return EXIT_ERROR;
                }
                Err(e) if e.errno() == libc_eintr() || e.errno() == libc_eagain() => {}
                Err(e) => {
                    eprintln!("vmm: vcpu{}: KVM_RUN failed: {e}", self.id);
                    return EXIT_ERROR;
                }
            }
        }
    }
}

const fn libc_eintr() -> i32 {
    4
}

const fn libc_eagain() -> i32 {
    11
}
