//! The VM as the REST API sees it: what `GET /vm` reports, and the shutdown action.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

pub struct VmHandle {
    started: Instant,
    vcpus: u32,
    memory_mib: u64,
    /// Written to stop the guest: the main thread then flushes the disks and exits.
    exit: EventFd,
    stopping: AtomicBool,
}

impl VmHandle {
    pub fn new(vcpus: u32, memory_mib: u64, exit: EventFd) -> VmHandle {
        VmHandle {
            started: Instant::now(),
            vcpus,
            memory_mib,
            exit,
            stopping: AtomicBool::new(false),
        }
    }
}

impl vmm_api::VmControl for VmHandle {
    fn info(&self) -> vmm_api::VmInfo {
        vmm_api::VmInfo {
            state: if self.stopping.load(Ordering::SeqCst) {
                "ShuttingDown"
            } else {
                "Running"
            },
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            uptime: self.started.elapsed(),
        }
    }

    fn shutdown(&self) -> Result<(), String> {
        self.stopping.store(true, Ordering::SeqCst);
        self.exit
            .write(1)
            .map_err(|e| format!("cannot signal the VM to stop: {e}"))
    }
}
